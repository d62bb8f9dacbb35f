"""kvrelay.loadtest: the workload generator and report math (unit), and one short real run of
`kvrelay loadtest` on the tiny family (two real servers, sharing off then on).

The real run is a subprocess: Locust monkey-patches whatever process imports it with gevent, and the
rest of the suite must not run under that."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from kvrelay.loadtest import report
from kvrelay.loadtest import workload as wl

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("base", "code", "legal")


def contexts(n=8):
    return [wl.Context(i, f"context {i}", 1000 + i, (f"q{i}a", f"q{i}b"), "test") for i in range(n)]


def spec(**kw):
    return wl.WorkloadSpec(**{"family": "tiny", "models": MODELS, "requests": 400, "contexts": 8, **kw})


# --- workload ------------------------------------------------------------------------------------


def test_zipf_weights_normalised_and_decreasing():
    w = wl.zipf_weights(10, 1.2)
    assert math.isclose(sum(w), 1.0) and all(a > b for a, b in zip(w, w[1:]))
    assert math.isclose(w[0] / w[1], 2**1.2)
    assert wl.zipf_weights(4, 0.0) == [0.25] * 4


def test_contexts_follow_zipf_and_variants_are_uniform():
    reqs = wl.generate(spec(requests=6000, zipf_s=1.0), contexts())
    by_ctx = Counter(r.context_id for r in reqs)
    w = wl.zipf_weights(8, 1.0)
    for cid in range(8):  # within 5 binomial standard deviations of the Zipf share
        p = w[cid]
        assert abs(by_ctx[cid] - 6000 * p) < 5 * math.sqrt(6000 * p * (1 - p)) + 1, (cid, by_ctx)
    by_model = Counter(r.model for r in reqs)
    assert set(by_model) == set(MODELS) and all(abs(n - 2000) < 200 for n in by_model.values())


def test_variants_follow_their_own_zipf_when_asked():
    models = tuple(f"m{i:02d}" for i in range(32))
    reqs = wl.generate(spec(models=models, requests=8000, variant_zipf_s=1.0), contexts())
    by_model, w = Counter(r.model for r in reqs), wl.zipf_weights(32, 1.0)
    for i, m in enumerate(models):  # within 5 binomial standard deviations of the Zipf share
        assert abs(by_model[m] - 8000 * w[i]) < 5 * math.sqrt(8000 * w[i] * (1 - w[i])) + 1, (m, by_model)


def test_same_seed_same_sequence_other_seed_differs():
    a, b = wl.generate(spec(seed=7), contexts()), wl.generate(spec(seed=7), contexts())
    assert a == b
    assert wl.generate(spec(seed=8), contexts()) != a


def test_bounds_count_lengths_questions_and_poisson_arrivals():
    ctxs = contexts()
    reqs = wl.generate(spec(requests=300, max_tokens=(8, 32), rate=5.0), ctxs)
    assert len(reqs) == 300 and [r.index for r in reqs] == list(range(300))
    assert all(8 <= r.max_tokens <= 32 for r in reqs) and {r.max_tokens for r in reqs} >= {8, 32}
    assert all(r.question in ctxs[r.context_id].questions for r in reqs)
    t = [r.arrival_s for r in reqs]
    assert all(b > a for a, b in zip(t, t[1:]))
    assert 300 / 5.0 * 0.7 < t[-1] < 300 / 5.0 * 1.3  # mean gap 1/rate
    assert all(r.arrival_s is None for r in wl.generate(spec(requests=5), ctxs))  # closed loop


def test_spec_validation():
    for bad in (
        dict(requests=0),
        dict(context_tokens=(10, 20)),
        dict(max_tokens=(9, 8)),
        dict(zipf_s=-1),
        dict(variant_zipf_s=-0.5),
        dict(rate=0.0),
        dict(models=()),
    ):
        with pytest.raises(Exception):
            spec(**bad).validate()


def test_schedule_count_and_time_bounds():
    now = [0.0]
    reqs = wl.generate(spec(requests=5), contexts())
    s = wl.Schedule(reqs, duration_s=10.0, clock=lambda: now[0])
    got = []
    while (r := s.next()) is not None:
        s.begin()
        now[0] += 1.0
        s.end()
        got.append(r.index)
    assert got == [0, 1, 2, 3, 4] and s.done and s.completed == 5 and s.window_s == pytest.approx(5.0)
    now[0] = 0.0
    s = wl.Schedule(wl.generate(spec(requests=100), contexts()), duration_s=3.0, clock=lambda: now[0])
    n = 0
    while s.next() is not None:
        n += 1
        now[0] += 1.0
    assert n == 3 and s.done  # stopped by time, not count


def test_schedule_poisson_waits_and_drops_arrivals_past_the_time_bound():
    now = [0.0]
    reqs = wl.generate(spec(requests=50, rate=2.0), contexts())
    s = wl.Schedule(reqs, duration_s=5.0, clock=lambda: now[0])
    r = s.next()
    assert s.wait_s(r) == pytest.approx(r.arrival_s)
    issued = 1 + sum(1 for _ in iter(s.next, None))
    assert issued == sum(1 for x in reqs if x.arrival_s < 5.0)


def test_warmup_is_separate_and_excluded_by_index_and_tenant():
    warm = wl.warmup_sequence(spec(warmup=2), [wl.Context(99, "w", 1000, ("a", "b", "c"))])
    assert [r.model for r in warm] == list(MODELS) * 2
    assert all(r.warmup and r.index < 0 and r.context_id == 99 and r.tenant.endswith("-warmup") for r in warm)


def test_synthetic_family_sends_token_ids_in_one_text():
    w = wl.build(
        wl.WorkloadSpec(
            "llama8b-random", ("base", "v1", "v2"), requests=6, contexts=2, context_tokens=(64, 80), warmup=1
        )
    )
    assert w.merge_context and w.context_source == "random token ids"
    text, ctx = w.payload(w.requests[0])
    assert ctx is None and all(t.isdigit() for t in text.split())
    c = w.context(w.requests[0].context_id)
    assert text.startswith(c.text + " ") and 64 <= c.tokens <= 80
    assert (
        wl.build(
            wl.WorkloadSpec(
                "llama8b-random", ("base", "v1", "v2"), requests=6, contexts=2, context_tokens=(64, 80), warmup=1
            )
        ).requests
        == w.requests
    )


# --- report math ---------------------------------------------------------------------------------


def test_percentile_matches_linear_interpolation():
    np = pytest.importorskip("numpy")
    xs = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0]
    for p in (0, 10, 50, 95, 99, 100):
        assert report.percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert report.percentile([], 50) is None and report.percentile([4.0], 99) == 4.0


def test_ratio():
    assert report.ratio(3.0, 2.0) == 1.5
    assert report.ratio(1.0, 0.0) is None and report.ratio(None, 1.0) is None


def rec(i, ok=True, route="full", lat=1.0, ttft=0.2, tokens=10, recomputed=0, text="x", model="code"):
    return {
        "index": i,
        "model": model,
        "ok": ok,
        "error": None if ok else "boom",
        "start_s": 100.0 + i,
        "latency_s": lat,
        "ttft_s": ttft,
        "output_tokens": tokens,
        "route": route,
        "route_reason": "r",
        "donor": "base" if route == "reuse" else "",
        "recomputed_layers": recomputed,
        "reused_tokens": 0,
        "text": text,
    }


def test_summarize_and_compare():
    recs = [rec(0), rec(1, route="reuse", recomputed=2), rec(2, route="restore"), rec(3, ok=False)]
    s = report.summarize(recs, window_s=2.0)
    assert set(report.SUMMARY_KEYS) <= set(s)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["requests_per_s"] == 1.5 and s["output_tokens_per_s"] == 15.0
    assert s["reuse_rate"] == pytest.approx(2 / 3, abs=1e-4) and s["mean_layers_recomputed"] == 2.0
    assert s["ttft_ms"]["p50"] == 200.0 and s["latency_ms"]["p95"] == 1000.0
    off = report.summarize([rec(0), rec(1)], window_s=2.0)
    c = report.compare({"off": off, "on": s})
    assert c["throughput_ratio"] == 1.5
    # a full-prefill route whose lower layers came from another model's blocks counts as shared
    recs = [rec(0), {**rec(1), "reused_tokens": 96}, {**rec(2, route="prefix"), "reused_tokens": 96}, rec(3)]
    shared = report.summarize(recs, window_s=1.0)  # own prefix hits are not sharing
    assert shared["shared_lower_layers_rate"] == 0.25 and shared["reuse_rate"] == 0.0
    assert s["shared_lower_layers_rate"] == 0.0  # store routes are counted as reuse, not here


def test_quality_compares_reuse_served_requests_with_sharing_off():
    off = [rec(i, text=f"answer {i}") for i in range(4)]
    on = [
        rec(0, text="answer 0"),
        rec(1, route="reuse", text="answer 1"),
        rec(2, route="reuse", text="answer two"),
        rec(3, ok=False),
    ]
    q = report.quality(off, on, sample=10)
    assert q["compared"] == 2 and q["exact_match"] == 50.0 and 50.0 < q["token_f1"] < 100.0
    assert q["all_requests"]["compared"] == 3
    assert report.quality(off, on, sample=1)["compared"] == 1


def test_cross_model_pairs_requests_sharing_could_serve():
    off = [
        rec(0),
        {**rec(1, ttft=0.5), "route_reason": "sharing off"},
        {**rec(2, ttft=0.7), "route_reason": "sharing off"},
    ]
    on = [rec(0), rec(1, route="reuse", ttft=0.1), rec(2, route="reuse", ttft=0.3)]
    x = report.cross_model(off, on)
    assert x["requests"] == 2 and x["served_by_reuse_with_sharing_on"] == 2
    assert x["ttft_p50_ms"] == {"off": 600.0, "on": 200.0}


def test_sharing_ceiling_counts_pairs_over_contexts():
    R = wl.Request
    reqs = [
        R(0, 1, "base", "q", 8),
        R(1, 1, "code", "q", 8),
        R(2, 1, "code", "q", 8),  # a repeat
        R(3, 2, "legal", "q", 8),
        R(4, 1, "legal", "q", 8),
    ]
    assert wl.sharing_ceiling(reqs) == {
        "distinct_contexts_requested": 2,
        "distinct_context_model_pairs": 4,
        "repeat_requests": 1,
        "full_prefill_ceiling": 2.0,
    }


# --- one real run --------------------------------------------------------------------------------


def test_loadtest_both_modes_on_real_servers(tmp_path, tiny_family):
    """--plan 2-4: every pair recomputes layers 2-4 (2 of 8), so the run's reuse figures are known."""
    out = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "kvrelay.cli",
        "loadtest",
        "--family",
        "tiny",
        "--plan",
        "2-4",
        "--requests",
        "10",
        "--contexts",
        "3",
        "--users",
        "3",
        "--warmup",
        "1",
        "--duration",
        "90",
        "--context-tokens",
        "1024-1536",
        "--max-tokens",
        "4-8",
        "--seed",
        "3",
        "--out",
        str(out),
        "--json",
        "--no-progress",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-4000:]
    s = json.loads(p.stdout)
    assert s["errors"] == 0 and isinstance(s["throughput_ratio"], float)
    for m in ("off", "on"):
        ms = s["modes"][m]
        assert set(report.SUMMARY_KEYS) <= set(ms) and ms["ok"] == 10 and ms["errors"] == 0
        assert ms["ttft_ms"]["n"] == 10 and ms["ttft_ms"]["p50"] <= ms["latency_ms"]["p95"]
    assert "reuse" not in s["modes"]["off"]["routes"] and s["modes"]["off"]["reuse_rate"] == 0
    assert s["modes"]["on"]["routes"].get("reuse", 0) >= 1 and s["modes"]["on"]["mean_layers_recomputed"] == 2.0
    assert s["quality"]["all_requests"]["compared"] == 10 and s["quality"]["compared"] >= 1
    assert s["cross_model"]["requests"] >= 1 and len(s["deployment"]["profiles"]) == 6
    w = s["workload"]
    assert (
        s["full_prefill_ceiling"]
        == w["full_prefill_ceiling"]
        == round(w["distinct_context_model_pairs"] / w["distinct_contexts_requested"], 3)
    )
    assert w["repeat_requests"] == 10 - w["distinct_context_model_pairs"]
    for f in (
        "summary.json",
        "loadtest.png",
        "requests_off.jsonl",
        "requests_on.jsonl",
        "locust_sharing_on_stats.csv",
        "locust_sharing_off_stats.csv",
        "locust_sharing_on.html",
    ):
        assert (out / f).stat().st_size > 0, f
    with open(out / "locust_sharing_on_stats.csv") as f:
        assert sum(int(row.split(",")[2]) for row in f.read().splitlines()[1:] if "Aggregated" in row) == 10


def test_locustfile_loads_and_declares_its_options():
    locust = Path(sys.executable).with_name("locust")
    if not locust.exists():
        pytest.skip("locust not installed in this environment")
    p = subprocess.run(
        [
            str(locust),
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--kvrelay-requests",
            "5",
            "--kvrelay-family",
            "tiny",
            "--list",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert {"GrpcStreamUser", "GrpcUser", "HttpGenerateUser", "HttpStreamUser"} <= set(p.stdout.split())


def test_url_must_be_loopback():
    p = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "loadtest", "--url", "10.0.0.1:8001", "--mode", "on"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert p.returncode == 2 and "only target this machine" in p.stderr


def test_store_is_sized_to_the_pages_the_workload_publishes(tiny_family):
    from types import SimpleNamespace as NS

    from kvrelay.serving import deployment as dp
    from kvrelay.loadtest import mixed as cli

    dep = dp.for_family("tiny", store="memory:1MiB")
    fmt = dp.identities(dep)["base"].page_format
    work = NS(
        contexts=[NS(id=0, tokens=1024), NS(id=1, tokens=2048)],
        requests=[
            NS(context_id=0, model="base"),
            NS(context_id=0, model="code"),
            NS(context_id=0, model="code"),
            NS(context_id=1, model="legal"),
        ],
    )
    need = (1024 * 2 + 2048) * fmt.page_bytes // fmt.block_size  # 3 distinct (context, model) pairs
    assert cli._pages_needed(dep, work) == need
    assert "publishes up to" in cli.store_shortfall(dep, need)
    assert cli.size_store(dep, need).startswith("page store sized to the workload")
    assert dep.store == f"memory:{int(need * 1.1) >> 20}MiB" and cli.store_shortfall(dep, need) == ""
    assert cli.size_store(dep, need) == ""  # big enough: left alone
    assert cli.store_shortfall(dp.for_family("tiny", store="redis://127.0.0.1:1"), need) == ""


def test_a_request_cut_off_by_the_runs_end_is_recorded_once(tmp_path):
    """The run's end records in-flight requests as cut off; one that completes after that must not be
    recorded a second time (a fresh-clone run under load counted 3 requests twice: failed and ok).
    In a subprocess: importing the users module monkey-patches the process with gevent."""
    script = tmp_path / "cut_off.py"
    script.write_text(
        textwrap.dedent("""
        import types
        from kvrelay.loadtest import users as lu
        from kvrelay.loadtest.workload import Request, Schedule

        r = Request(0, 0, "base", "q", 4)
        st = lu.LoadState(workload=None, schedule=Schedule([r]), grpc_url="", http_url="", timeout_s=5)
        st.schedule.start()

        class Late(lu._Workload):
            environment = types.SimpleNamespace(kvrelay=st)
            def send(self, st, r):
                st.abandon_in_flight("cut off at the run's time limit")     # the run ends meanwhile
                return lu.make_record(r, 0.0, 1.0, text="late answer")

        Late().one_request()
        print([(x["index"], x["ok"], x["error"]) for x in st.records])
    """)
    )
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip().splitlines()[-1] == '[(0, False, "cut off at the run\'s time limit")]'
