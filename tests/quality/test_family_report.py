"""The per-pair family table: what each profile found, the held-out eval, and whether a plan held."""

import json

import kvrelay.paths
from kvrelay.quality import family_report as fr
from tests.helpers.profiles import make_profile, write


def _eval(plan, agree, task, full_task=20.0):
    methods = {
        "full_prefill": {"task_quality": full_task, "agreement": 100.0, "speedup_vs_full": 1.0},
        "full_reuse": {"task_quality": full_task - 3, "agreement": 40.0, "speedup_vs_full": 9.0},
        "selected": {"task_quality": task, "agreement": agree, "speedup_vs_full": 3.0},
    }
    return {
        "selector": {"plan": plan, "layers_recomputed": 4 if plan else None},
        "methods": methods,
        "task_delta_vs_full": {m: round(d["task_quality"] - full_task, 3) for m, d in methods.items()},
    }


def test_table_and_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(kvrelay.paths, "profiles_dir", lambda configured=None: tmp_path)
    monkeypatch.setattr(fr, "profiles_dir", lambda configured=None: tmp_path)
    for s, r in (("base", "code"), ("code", "base"), ("base", "legal")):
        write(tmp_path, make_profile(sender=s, receiver=r))
    ev = tmp_path / "tiny" / "eval"
    ev.mkdir()
    (ev / "base__code.json").write_text(json.dumps(_eval("8-12", 98.5, 19.5)))  # holds
    (ev / "code__base.json").write_text(json.dumps(_eval("8-12", 90.0, 19.5)))  # agreement too low
    (ev / "base__legal.json").write_text(json.dumps(_eval(None, 100.0, 20.0)))  # full prefill chosen
    assert fr.main(["--family", "tiny"]) == 0
    out = capsys.readouterr().out
    rows = {
        l.split("|")[1].strip(): l for l in out.splitlines() if l.startswith("| base->") or l.startswith("| code->")
    }
    assert "| yes |" in [l for l in out.splitlines() if l.startswith("| base->code") and "8-12" in l][0]
    assert any(l.startswith("| code->base") and l.rstrip().endswith("| NO |") for l in out.splitlines())
    assert any(
        l.startswith("| base->legal") and "full prefill" in l and l.rstrip().endswith("| - |") for l in out.splitlines()
    )
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary == {
        "pairs": 3,
        "evaluated": 3,
        "reuse": 2,
        "layers_recomputed": [4, 4],
        "holds": 1,
        "critical_counts": [],
    }
    assert rows


def test_no_profiles_is_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(fr, "profiles_dir", lambda configured=None: tmp_path)
    assert fr.main(["--family", "tiny"]) == 2
    assert "no profiles" in capsys.readouterr().err
