"""Concurrent mixed load against a real tritonserver, and a server that survives its stubs dying.

Before the serving core moved in-process (issue 10), the multi-threaded orchestrator reached its
engines over Triton BLS and Triton 2.51's Python backend corrupted its heap: at 32 mixed clients the
`orchestrator_stream` stub died (SIGSEGV / SIGABRT, `double free or corruption`) within two minutes,
and within STRESS_S seconds in the runs measured for this test.
"""

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest

from kvrelay.loadtest import stress
from kvrelay.server import procstats
from kvrelay.server.supervisor import Supervised

from .conftest import Running, deployment
from .test_server import CONTEXT

STRESS_CLIENTS = 32
STRESS_S = float(os.environ.get("KVRELAY_STRESS_S", 75))


@pytest.fixture(scope="module")
def busy(tmp_path_factory, test_profiles):
    r = Running(deployment(test_profiles), tmp_path_factory.mktemp("stress"))
    yield r.server
    r.close()


def test_32_mixed_clients_zero_errors_and_every_stub_alive(busy):
    before = {p.name: p.pid for p in procstats.server_tree(busy.proc.pid)}
    spec = stress.StressSpec(
        busy.http_url,
        busy.grpc_url,
        ("base", "code"),
        stress.source_contexts(6),
        clients=STRESS_CLIENTS,
        duration_s=STRESS_S,
        max_tokens=(2, 8),
        timeout_s=60,
        tenants=("a", "b"),
        server_pid=busy.proc.pid,
    )
    s = stress.summary(stress.run(spec))
    print(stress.render(s))
    assert s["errors"] == 0, s["errors_by_message"]
    assert all(s["by_kind"][k]["requests"] > 0 for k in stress.KINDS)
    after = {p.name: p.pid for p in procstats.server_tree(busy.proc.pid)}
    assert after == before, f"stubs died or were replaced: {before} -> {after}"
    assert busy.proc.poll() is None


def _load(server, stop: threading.Event, results: list):
    """Back-to-back HTTP /infer requests until stopped: ("ok" | HTTP status | error class, seconds).
    /infer, not /generate: Triton 2.51's generate endpoint answers 400 for every error code."""
    text = lambda name, v: {"name": name, "shape": [1], "datatype": "BYTES", "data": [v]}
    body = json.dumps(
        {
            "inputs": [
                text("text_input", "Summarise."),
                text("context", CONTEXT),
                text("variant_name", "code"),
                text("tenant", "k"),
                {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [4]},
            ]
        }
    ).encode()
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(
                urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/infer", body), timeout=60
            ) as r:
                out = {o["name"]: o["data"][0] for o in json.loads(r.read())["outputs"]}
                outcome = "ok" if out["output_tokens"] == 4 else "wrong answer"
        except urllib.error.HTTPError as e:
            outcome = f"HTTP {e.code}: {json.loads(e.read()).get('error', '')[:120]}"
        except OSError as e:
            outcome = type(e).__name__
        results.append((outcome, time.monotonic() - t0))
        if outcome != "ok":
            time.sleep(0.2)


@pytest.mark.parametrize("victim", ["orchestrator_stream", "orchestrator", "preprocessing"])
def test_a_killed_stub_under_load_is_noticed_and_the_server_restarts(tmp_path, test_profiles, victim):
    sup = Supervised(deployment(test_profiles), tmp_path, say=print).start()
    stop, results = threading.Event(), []
    loaders = [threading.Thread(target=_load, args=(sup.server, stop, results)) for _ in range(4)]
    try:
        for t in loaders:
            t.start()
        time.sleep(3)
        assert sup.problem() is None
        pid = next(p.pid for p in procstats.server_tree(sup.server.proc.pid) if p.name == victim)
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while sup.problem() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sup.problem() == f"stub {victim} died"
        t0 = time.monotonic()
        assert sup.check()  # restarts tritonserver on the same ports
        assert time.monotonic() - t0 < 60 and sup.problem() is None
        n = len(results)
        time.sleep(3)
        assert any(r == "ok" for r, _ in results[n:]), "no request succeeded after the restart"
    finally:
        stop.set()
        for t in loaders:
            t.join(90)
        sup.stop()
    assert all(not t.is_alive() for t in loaders), "a client hung"
    assert max(d for _, d in results) < 60, "a request hung instead of failing"
    failures = [r for r, _ in results if r != "ok"]
    print(f"{len(results)} requests, {len(failures)} failed during the restart: {sorted(set(failures))[:5]}")
    assert not any(f.startswith("HTTP 4") or f == "wrong answer" for f in failures), (
        "a server failure blamed on the client, or a wrong answer"
    )
