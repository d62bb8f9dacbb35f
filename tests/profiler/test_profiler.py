"""The profiler end to end on the tiny family: configs, a valid profile file, resume, plot, check, CLI errors."""

import json

import pytest

from kvrelay.model import profile_file as pf
from kvrelay.cli import main
from kvrelay.model.plan import RecomputePlan
from kvrelay.profiler import scoring
from kvrelay.profiler.run import enumerate_plans, max_group_layers

ARGS = [
    "--metric",
    "exact",
    "--family",
    "tiny",
    "--sender",
    "base",
    "--receiver",
    "code",
    "--samples",
    "2",
    "--context-tokens",
    "64-96",
    "--max-tokens",
    "4",
    "--no-progress",
]


def test_enumerate_plans():
    plans = enumerate_plans(8, 2, max_group_layers(8, 2, 0.5))
    assert plans[0] == RecomputePlan.none()
    assert [str(p) for p in plans[1:]] == ["0-2", "2-4", "4-6", "6-8", "0-4", "2-6", "4-8"]
    assert len(enumerate_plans(30, 2, max_group_layers(30, 2, 0.5))) == 1 + 84  # lengths 2..14
    assert len(enumerate_plans(30, 2, 30)) == 1 + 15 * 16 // 2
    assert "6-7" in {str(p) for p in enumerate_plans(7, 2, 7)}  # odd L: last end is L


@pytest.fixture(scope="module")
def profiled(tiny_family, tmp_path_factory):
    out = tmp_path_factory.mktemp("profiles") / "tiny" / "base__code.json"
    assert main(["profile", *ARGS, "--out", str(out)]) == 0
    return out


def test_profile_writes_a_valid_file(profiled):
    prof = pf.load(profiled)
    d = prof.data
    assert (d["family"], d["sender"], d["receiver"], d["num_layers"], d["stride"]) == ("tiny", "base", "code", 8, 2)
    assert d["max_group_layers"] == 4 and len(d["configs"]) == 8
    assert d["dataset"]["split"] == "profile" and d["dataset"]["samples"] == 2
    assert d["dataset"]["context_tokens"] == [64, 96]
    assert (
        d["baselines"]["full_prefill"]["quality"] == 100.0 and d["baselines"]["full_prefill"]["layers_recomputed"] == 8
    )
    assert d["baselines"]["full_reuse"]["quality"] == d["configs"][0]["quality"]
    assert d["frontier"] == pf.pareto_frontier(d["configs"])
    assert (
        d["command"].startswith("kvrelay profile --metric exact --family tiny")
        and d["created"]
        and d["kvrelay_version"]
    )
    for c in d["configs"]:
        assert 0 <= c["quality"] <= 100 and c["kl"] >= 0 and c["prefill_s"] > 0
    assert not pf.partial_path(profiled).exists()


def test_profile_selects_by_the_flip_model(profiled):
    d = pf.load(profiled).data
    fm = d["flip_model"]
    assert fm["gaps"] == 2 * 4 and fm["density_upper"] > 0  # every reference position counted
    for c in d["configs"]:
        assert c["positions"] >= 2 and c["gap_shift"] >= 0
        assert c["quality_bound"] == min(c["quality"], c["predicted_exact"])
    for f in d["frontier"]:  # the frontier goes by the bound
        c = next(c for c in d["configs"] if c["plan"] == f["plan"])
        assert f["quality"] == c["quality_bound"] and f["observed_quality"] == c["quality"]


def test_profile_resumes_from_partial_results(tiny_family, tmp_path, monkeypatch):
    out = tmp_path / "base__code.json"
    real = scoring.run_plans
    seen = []

    def flaky(R, tok, prep, pages, plans, *a, **kw):
        seen.append(len(plans))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(R, tok, prep, pages, plans, *a, **kw)

    monkeypatch.setattr(scoring, "run_plans", flaky)
    assert main(["profile", *ARGS, "--batch", "4", "--out", str(out)]) == 130
    part = json.loads(pf.partial_path(out).read_text())
    assert [len(r["configs"]) for r in part["samples"].values()] == [4]
    seen.clear()
    monkeypatch.setattr(scoring, "run_plans", real)
    counted = []
    monkeypatch.setattr(scoring, "run_plans", lambda *a, **kw: counted.append(len(a[4])) or real(*a, **kw))
    assert main(["profile", *ARGS, "--batch", "4", "--out", str(out)]) == 0
    assert sum(counted) == 2 * 8 - 4  # only what the partial run had not done
    assert pf.load(out).data["dataset"]["samples"] == 2 and not pf.partial_path(out).exists()


def test_partial_from_other_settings_is_refused(tiny_family, tmp_path, capsys):
    out = tmp_path / "x.json"
    pf.write_json_atomic({"meta": {"family": "tiny", "max_tokens": 99}, "samples": {}}, pf.partial_path(out))
    assert main(["profile", *ARGS, "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err


def test_plot(profiled, tmp_path):
    png = tmp_path / "p.png"
    assert main(["profile", "plot", str(profiled), "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_check_passes_then_flags_drift(profiled, monkeypatch, capsys):
    # tiny's near-flat logits make the flip model strict: a loose target keeps its plans selectable
    loose = ["--samples", "1", "--quality-target", "0.9", "--no-progress"]
    assert main(["profile", "check", str(profiled), *loose]) == 0
    real = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **kw: {**real(*a, **kw), "quality": 10.0})
    assert main(["profile", "check", str(profiled), *loose]) == 1
    assert "profile drift" in capsys.readouterr().err


def test_check_record_marks_the_profile_verified_on_these_weights(profiled, tmp_path, monkeypatch, capsys):
    d = json.loads(profiled.read_text())
    d["sender_weights"], d["receiver_weights"] = "000000000000", "111111111111"  # scored on another build
    prof = tmp_path / "other.json"
    pf.save(d, prof)
    loose = ["--samples", "1", "--quality-target", "0.9", "--no-progress"]
    assert main(["profile", "check", str(prof), *loose]) == 0
    assert "other; --record records them" in capsys.readouterr().err
    assert "verified_on" not in json.loads(prof.read_text())  # not without --record
    assert main(["profile", "check", str(prof), *loose, "--record"]) == 0
    v = json.loads(prof.read_text())["verified_on"]
    assert len(v) == 1 and v[0]["samples"] == 1 and v[0]["plans"]
    from kvrelay.families import load_family
    from kvrelay.model import fingerprint

    fam = load_family("tiny")
    here = tuple(fingerprint.weights_digest(fam.model_dir(m)) for m in (d["sender"], d["receiver"]))
    assert (v[0]["sender_weights"], v[0]["receiver_weights"]) == here
    assert pf.weights_status(pf.load(prof).data, here) == "verified"
    # a failing check records nothing
    real = scoring.score
    monkeypatch.setattr(scoring, "score", lambda *a, **kw: {**real(*a, **kw), "quality": 10.0})
    assert main(["profile", "check", str(prof), *loose, "--record"]) == 1
    assert len(json.loads(prof.read_text())["verified_on"]) == 1


def test_check_flags_stale_fingerprints(profiled, tmp_path, capsys):
    d = json.loads(profiled.read_text())
    d["receiver_fingerprint"] = "0000000000000000"
    stale = tmp_path / "stale.json"
    pf.save(d, stale)
    assert main(["profile", "check", str(stale), "--json", "--no-progress"]) == 1
    assert "fingerprints differ" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["profile"], "kvrelay profile needs --family"),
        (["profile", "--metric", "exact"], "needs --family, --sender, --receiver, --out"),
        (["profile", "frob", "x.json"], "unknown profile action 'frob'"),
        (["profile", "plot"], "takes exactly one PROFILE.json"),
        (["profile", "plot", "/nonexistent/p.json"], "no profile at"),
        (["profile", *ARGS, "--out", "p.txt"], "must be a .json file"),
        (["profile", *ARGS[:-5], "--context-tokens", "abc", "--out", "p.json"], "--context-tokens must be"),
        (["profile", *ARGS, "--sender", "code", "--out", "p.json"], "must differ"),
        (["profile", *ARGS, "--kind", "poetry", "--out", "p.json"], "--kind must be one of"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--stride", "two"])
    assert e.value.code == 2 and "invalid int value" in capsys.readouterr().err
