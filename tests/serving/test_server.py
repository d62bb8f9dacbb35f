"""The deployment through a real tritonserver: HTTP and gRPC, reuse, streaming, load, bad input."""

import json
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from kvrelay.server import client
from kvrelay.errors import KvRelayError

CONTEXT = open(__file__.replace("test_server.py", "../../kvrelay/model/kv_format.py"), encoding="utf-8").read()[:3000]


def tenant():
    return f"t-{uuid.uuid4().hex[:8]}"  # a fresh tenant: nothing published yet


def ask(server, model, question, tenant_, protocol="http", max_tokens=12, **kw):
    url = server.http_url if protocol == "http" else server.grpc_url
    return client.infer(
        url, question, max_tokens, protocol=protocol, model=model, context=CONTEXT, tenant=tenant_, **kw
    )


def test_http_and_grpc_answer_the_same(server):
    t = tenant()
    a = ask(server, "base", "What is a page?", t, "http")
    b = ask(server, "base", "What is a page?", t, "grpc")
    assert a.text == b.text and a.info["output_tokens"] == 12
    assert a.info["kv_route"] == "full: miss"


def test_second_variant_reuses_donor_kv_and_matches_its_own_prefill(server):
    t = tenant()
    donor = ask(server, "base", "Summarise.", t)
    assert donor.info["kv_route"].startswith("full")
    reuse = ask(server, "code", "What does pack_tensor do?", t)
    assert reuse.info["kv_donor_model"] == "base" and reuse.info["kv_route"].startswith("reuse")
    assert reuse.info["kv_recomputed_layers"] == 8 and reuse.info["kv_reused_tokens"] >= 512
    own = ask(server, "code", "What does pack_tensor do?", tenant())  # code alone, nothing to reuse
    assert own.info["kv_route"] == "full: miss"
    assert reuse.text == own.text  # recompute-all == full prefill


def test_partial_plan_reports_reused_and_recomputed_layers(server):
    t = tenant()
    ask(server, "code", "Summarise.", t)
    r = ask(server, "base", "Who produces pages?", t)
    assert (r.info["kv_donor_model"], r.info["kv_reused_layers"], r.info["kv_recomputed_layers"]) == ("code", 6, 2)


def test_tenants_never_see_each_others_pages(server):
    t1, t2 = tenant(), tenant()
    ask(server, "base", "Summarise.", t1)
    other = ask(server, "code", "Summarise.", t2)
    assert other.info["kv_route"] == "full: miss" and other.info["kv_donor_model"] == ""


def test_streaming_grpc_and_http(server):
    t = tenant()
    whole = ask(server, "base", "Explain block hashes.", t, max_tokens=10)
    chunks = []
    s = client.stream(
        server.grpc_url, "Explain block hashes.", 10, on_text=chunks.append, model="base", context=CONTEXT, tenant=t
    )
    assert s.chunks == 10 and "".join(chunks) == s.text == whole.text and s.ttft_s < s.latency_s
    body = json.dumps(
        {
            "text_input": "Explain block hashes.",
            "context": CONTEXT,
            "max_tokens": 4,
            "variant_name": "base",
            "stream": True,
            "tenant": t,
        }
    ).encode()
    with urllib.request.urlopen(
        urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble_stream/generate_stream", body), timeout=60
    ) as r:
        events = [json.loads(l[5:]) for l in r.read().decode().splitlines() if l.startswith("data:")]
    assert [e["output_tokens"] for e in events] == [1, 2, 3, 4]


def test_32_parallel_requests_no_errors(server):
    t = tenant()
    jobs = [("base" if i % 2 else "code", f"Question {i}?", "http" if i % 3 else "grpc") for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda j: ask(server, j[0], j[1], t, j[2], max_tokens=6), jobs))
    assert all(r.info["output_tokens"] == 6 for r in results)


def _raw_infer(server, inputs):
    body = json.dumps({"inputs": inputs}).encode()
    try:
        with urllib.request.urlopen(
            urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/infer", body), timeout=60
        ) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


TEXT = {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hello"]}


@pytest.mark.parametrize(
    "inputs,msg",
    [
        (
            [
                TEXT,
                {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [4]},
                {"name": "variant_name", "shape": [1], "datatype": "BYTES", "data": ["nope"]},
            ],
            "unknown model 'nope'",
        ),
        (
            [{**TEXT, "data": ["   "]}, {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [4]}],
            "text_input is empty",
        ),
        (
            [TEXT, {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [0]}],
            "max_tokens must be in 1..256",
        ),
        (
            [TEXT, {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [10**9]}],
            "max_tokens must be in 1..256",
        ),
        ([TEXT, {"name": "max_tokens", "shape": [1], "datatype": "FP32", "data": [4.0]}], "max_tokens"),
        ([TEXT, {"name": "max_tokens", "shape": [2], "datatype": "INT32", "data": [4, 4]}], "max_tokens"),
        (
            [
                {**TEXT, "data": ["word " * 5000]},
                {"name": "max_tokens", "shape": [1], "datatype": "INT32", "data": [4]},
            ],
            "exceeds the 4096-token context",
        ),
    ],
)
def test_bad_inputs_are_invalid_arg_and_the_server_keeps_serving(server, inputs, msg):
    status, body = _raw_infer(server, inputs)
    assert status == 400 and msg in body["error"], body
    ok = ask(server, "base", "still there?", tenant(), max_tokens=2)
    assert ok.info["output_tokens"] == 2


def test_grpc_bad_input_is_invalid_argument(server):
    with pytest.raises(KvRelayError, match="unknown model"):
        ask(server, "nope", "x", tenant(), "grpc")
    c = grpcclient.InferenceServerClient(server.grpc_url)
    i = grpcclient.InferInput("text_input", [1], "BYTES")
    i.set_data_from_numpy(np.array([b"hi"], dtype=object))
    m = grpcclient.InferInput("max_tokens", [1], "INT32")
    m.set_data_from_numpy(np.array([-3], dtype=np.int32))
    with pytest.raises(Exception) as e:
        c.infer("ensemble", [i, m])
    assert "INVALID_ARG" in str(e.value) and "max_tokens" in str(e.value)
    c.close()


def test_metrics_show_reuse(server):
    t = tenant()
    ask(server, "base", "Summarise.", t)
    ask(server, "code", "Summarise.", t)
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    hits = [
        l
        for l in text.splitlines()
        if l.startswith("kvrelay_store_hits_total")
        and 'donor="base"' in l
        and 'receiver="code"' in l
        and 'model="ensemble"' in l
    ]  # model = the entry point used
    assert hits and float(hits[0].split()[-1]) >= 1
    assert not [l for l in text.splitlines() if l.startswith("kvrelay_") and 'model="orchestrator_stream"' in l]
    assert "kvrelay_layers_recomputed_total" in text and "kvrelay_kv_bytes_moved_total" in text
    assert 'kvrelay_prefill_seconds_total{kind="reprefill"' in text


def test_a_prefix_cache_hit_is_its_own_route_not_a_full_prefill(server):
    t = tenant()
    ask(server, "code", "Summarise.", t)
    before = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    again = ask(server, "code", "Another question?", t, "grpc")
    assert again.info["kv_route"] == "prefix: own prefix: engine cache" and again.info["kv_reused_tokens"] >= 512
    after = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    count = lambda text, pred: sum(float(l.split()[-1]) for l in text.splitlines() if pred(l))
    is_prefix = lambda l: l.startswith("kvrelay_requests_total") and 'route="prefix"' in l and 'receiver="code"' in l
    is_full = lambda l: l.startswith("kvrelay_full_prefill_total") and 'receiver="code"' in l
    assert count(after, is_prefix) == count(before, is_prefix) + 1
    assert count(after, is_full) == count(before, is_full)


def _fetched_bytes(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(
        float(l.split()[-1])
        for l in text.splitlines()
        if l.startswith("kvrelay_kv_bytes_moved_total") and 'direction="fetch"' in l
    )


def test_a_repeat_reuse_does_not_move_the_donor_pages_again(server):
    t = tenant()
    ask(server, "code", "Summarise.", t)
    first = ask(server, "base", "Who produces pages?", t)
    moved = _fetched_bytes(server)
    again = ask(server, "base", "Who produces pages?", t)
    assert first.info["kv_route"].startswith("reuse") and "cached in the engine" not in first.info["kv_route"]
    assert again.info["kv_route"].startswith("reuse") and again.info["kv_route"].endswith(
        "hybrid KV cached in the engine"
    )
    assert again.text == first.text and again.info["kv_recomputed_layers"] == first.info["kv_recomputed_layers"] == 2
    assert _fetched_bytes(server) == moved


def test_a_request_waits_for_an_in_flight_prefill_of_its_context(server):
    t = tenant()
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda m: ask(server, m, "Who produces pages?", t), ["code", "base"])
    routes = sorted([a.info["kv_route"], b.info["kv_route"]])
    assert routes[0] == "full: miss", routes
    assert routes[1].startswith("reuse") and routes[1].endswith("(after an in-flight prefill)"), routes
