"""`kvrelay loadtest --scenario goodput` end to end on tiny: real tritonservers, Locust users streaming
over gRPC, a stored sender, the three modes. Asserts the machinery (a parsed summary, every mode
measured, zero errors, the files), never a speed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.profiles import write_profile
from kvrelay.model.plan import RecomputePlan


@pytest.fixture(scope="module")
def result(tmp_path_factory, tiny_family):
    root = tmp_path_factory.mktemp("goodput")
    write_profile(root / "profiles", "tiny", "code", "base", tiny_family.fingerprint, 8, RecomputePlan(((2, 4),)))
    out = root / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "loadtest",
            "--scenario",
            "goodput",
            "--family",
            "tiny",
            "--quick",
            "--pairs",
            "code:base",
            "--context-tokens",
            "256-320",
            "--profiles",
            str(root / "profiles"),
            "--out",
            str(out),
            "--json",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), out, r.stderr


def test_the_summary_carries_goodput_per_mode_and_the_ratios(result):
    s, _, _ = result
    pair = s["pairs"]["code->base"]
    assert s["errors"] == 0 and pair["errors"] == 0
    assert pair["plan"] == "2-4" and pair["layers_recomputed"] == 2
    assert set(pair["goodput_rps"]) == {"full", "plan", "reuse"}
    assert all(v is not None for v in pair["goodput_rps"].values())
    for key in ("goodput_ratio", "bound_fraction"):
        assert key in pair and "best_goodput_ratio" in s
    assert pair["bound"]["bound"] > 0 and pair["slo"]["ttft_s"] > 0


def test_plan_requests_reuse_the_stored_sender_and_match_full_prefill(result):
    s, _, _ = result
    pair = s["pairs"]["code->base"]
    for p in pair["modes"]["plan"]["points"]:
        assert set(p["routes"]) and all(k.startswith("reuse") for k in p["routes"]), p["routes"]
        assert p["mean_layers_recomputed"] == 2
    assert all(k.startswith("full") for p in pair["modes"]["full"]["points"] for k in p["routes"])
    assert pair["agreement"]["compared"] > 0 and pair["agreement"]["rate"] is not None


def test_files_per_request_plot_and_locust_reports(result):
    s, out, _ = result
    lines = Path(s["files"]["requests"]).read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert {r["mode"] for r in recs} == {"full", "plan", "reuse"} and all(r["ok"] for r in recs)
    assert Path(s["pairs"]["code->base"]["plot"]).stat().st_size > 10_000
    assert s["files"]["locust_html"] and all(Path(f).exists() for f in s["files"]["locust_html"])
    assert (out / "summary.json").exists()


def test_bad_pairs_are_refused_before_anything_starts(tiny_family):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "loadtest",
            "--scenario",
            "goodput",
            "--family",
            "tiny",
            "--pairs",
            "code:code",
            "--context-tokens",
            "256-320",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "SENDER:RECEIVER of two different models" in r.stderr, r.stderr


def test_variant_popularity_is_refused_for_goodput():
    cmd = [sys.executable, "-m", "kvrelay.cli", "loadtest", "--scenario", "goodput", "--family", "tiny"]
    r = subprocess.run([*cmd, "--variant-zipf", "1.0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--variant-zipf is for the mixed scenario" in r.stderr, r.stderr


def test_an_earlier_run_is_resummarized_at_another_slo_without_measuring(result):
    s, out, _ = result
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "loadtest",
            "--scenario",
            "goodput",
            "--resummarize",
            str(out),
            "--slo-ttft",
            "1e-6",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    again = json.loads(r.stdout)["pairs"]["code->base"]
    assert again["slo"] == {"ttft_s": 1e-6, "how": "given (--slo-ttft)"}
    assert again["goodput_rps"] == {"full": 0.0, "plan": 0.0, "reuse": 0.0}
    assert again["modes"]["full"]["points"] == s["pairs"]["code->base"]["modes"]["full"]["points"]


def test_by_default_only_pairs_whose_plans_are_predicted_to_hold(tiny_family, tmp_path):
    from kvrelay.loadtest.goodput import choose_pairs
    from kvrelay.model import profile_file as pf
    from kvrelay.serving import deployment as dp

    for s, r in (("base", "code"), ("code", "base"), ("base", "legal")):
        write_profile(tmp_path, "tiny", s, r, tiny_family.fingerprint, 8, RecomputePlan(((2, 4),)))
    path = pf.path_for(tmp_path, "tiny", "code", "base")
    d = json.loads(path.read_text())
    d["flip_model"] = {"eps": 0.5, "confidence": 0.95, "gaps": 72, "near_ties": 14, "density_upper": 0.61}
    pf.save(d, path)
    dep = dp.for_family("tiny", profiles_dir=str(tmp_path))
    ids, said = dp.identities(dep), []
    assert [p.name for p in choose_pairs(dep, ids, None, 1024, said.append)] == ["code->base"]
    assert "left out: base->code, base->legal" in said[0]
    # asked for by name, a pair is measured either way
    assert [p.name for p in choose_pairs(dep, ids, "base:legal", 1024, said.append)] == ["base->legal"]
    pf.path_for(tmp_path, "tiny", "code", "base").unlink()  # none predicted: every reusable pair
    assert [p.name for p in choose_pairs(dep, ids, None, 1024, said.append)] == ["base->code", "base->legal"]
