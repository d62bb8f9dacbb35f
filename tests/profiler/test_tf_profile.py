"""The teacher-forced profiler, end to end on the tiny family, and what the selector and eval make of it."""

import json

import pytest

from kvrelay.cli import main
from kvrelay.model.plan import RecomputePlan
from kvrelay.model import profile_file
from kvrelay.profiler import teacher
from kvrelay.serving.selector import NO_PLAN, Selector

ARGS = [
    "profile",
    "--family",
    "tiny",
    "--sender",
    "base",
    "--receiver",
    "code",
    "--samples",
    "3",
    "--context-tokens",
    "64-96",
    "--ref-tokens",
    "16",
    "--no-progress",
]


@pytest.fixture(scope="module")
def tf_profile(tiny_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("tfprof")
    out = root / "tiny" / "base__code.json"
    assert main([*ARGS, "--out", str(out)]) == 0
    return root, out


def test_profile_file_has_intervals_targets_and_a_plot(tf_profile):
    root, out = tf_profile
    prof = profile_file.load(out)
    d = prof.data
    assert prof.teacher_forced and d["dataset"]["domains"] == ["code"] and d["dataset"]["ref_tokens"] == 16
    assert out.with_suffix(".png").exists()
    plans = {str(profile_file.plan_of(c)) for c in d["configs"]}
    assert {"none", "none+kv"} <= plans and any(p.endswith("+kv") and p != "none+kv" for p in plans)
    assert any("," in p for p in plans)  # two-group plans are searched
    assert max(c["layers_recomputed"] for c in d["configs"]) <= int(0.6 * d["num_layers"])
    for c in d["configs"]:
        for k in ("retained_gain", "top1_agreement", "kl"):
            lo, hi = c[k + "_ci"]
            assert lo <= c[k] + 1e-9 and c[k] <= hi + 1e-9, (k, c)
        assert isinstance(c["meets_target"], bool) and "prefill_s_fit" in c
    timed = [c for c in d["configs"] if "prefill_s" in c]
    assert timed and all(c["prefill_speedup"] > 0 for c in timed)
    assert len(d["criticality"]["kv"]) == d["num_layers"] and d["criticality"]["e"][0] == 0.0
    sel = d["selected"]
    if sel is not None:  # the selection is the cheapest config meeting the target by fitted time
        ok = [c for c in d["configs"] if c["meets_target"]]
        best = min(ok, key=lambda c: (c["prefill_s_fit"], c["layers_recomputed"]))
        assert (sel["plan"], sel["kv_correction"]) == (best["plan"], best["kv_correction"])


def test_selector_serves_the_profiles_selected_plan_and_respects_mode_and_e_layers(tf_profile, tmp_path, tiny_family):
    from kvrelay.families import family_spec

    root, out = tf_profile
    spec = family_spec("tiny")
    fp = spec.model("base").fingerprint
    d = json.loads(out.read_text())
    L = d["num_layers"]
    # a controlled copy: exactly two configs pass, a corrected one cheaper than a plain one
    for c in d["configs"]:
        c["meets_target"] = c["meets_strict"] = False
    plain = next(c for c in d["configs"] if not c["kv_correction"] and c["layers_recomputed"] == 4)
    corr = next(c for c in d["configs"] if c["kv_correction"] and c["layers_recomputed"] == 2)
    plain.update(meets_target=True, prefill_s_fit=0.5)
    corr.update(meets_target=True, prefill_s_fit=0.3)
    path = profile_file.path_for(tmp_path, "tiny", "base", "code")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(d))
    choose = lambda sel: sel.choose("base", "code", fp, fp, context_tokens=100, queued=1).plan
    assert choose(Selector(tmp_path, "tiny")) == profile_file.plan_of(corr)
    even = tuple(range(2, L, 2))  # donors keep E at even layers only: no corrected plan
    assert choose(Selector(tmp_path, "tiny", e_layers=even)) == profile_file.plan_of(plain)
    strict = Selector(tmp_path, "tiny", quality_mode="strict")
    assert choose(strict) is None and strict.fallbacks[NO_PLAN] == 1


def test_all_pairs_profiles_every_ordered_pair_and_keeps_finished_ones(tiny_family, tmp_path, capsys):
    argv = [
        "profile",
        "--family",
        "tiny",
        "--all-pairs",
        "--profiles",
        str(tmp_path),
        "--samples",
        "2",
        "--context-tokens",
        "48-64",
        "--ref-tokens",
        "8",
        "--max-group",
        "0.25",
        "--max-groups",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 0
    pairs = profile_file.pairs_in(tmp_path, "tiny")
    n = len(tiny_family.models)
    assert len(pairs) == n * (n - 1)
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().err.count("kept (profiled with these settings") == n * (n - 1)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--all-pairs", "--sender", "base"], "give no --sender"),
        (["--sender", "base"], "needs --receiver"),
        (["--sender", "base", "--receiver", "base"], "must differ"),
        (["--sender", "base", "--receiver", "code", "--samples", "1"], "--samples must be >= 2"),
        (["--sender", "base", "--receiver", "code", "--ref-tokens", "2"], "--ref-tokens must be in"),
        (["--sender", "base", "--receiver", "code", "--data", "/nonexistent.jsonl"], "no such file"),
        (["--sender", "base", "--receiver", "nope"], "has no model 'nope'"),
    ],
)
def test_bad_arguments_exit_2(tiny_family, argv, msg, capsys):
    assert main(["profile", "--family", "tiny", *argv, "--no-progress"]) == 2
    assert msg in capsys.readouterr().err


def test_candidate_plans_cover_the_most_critical_layers():
    crit = [0.1] * 10
    crit[6] = crit[7] = 1.0
    crit[1] = 0.8
    plans = teacher.candidate_plans(crit, crit, stride=2, max_frac=0.6, max_groups=2)
    strs = [str(p) for p in plans]
    assert strs[:2] == ["none", "none+kv"] and len(set(strs)) == len(strs)
    assert "6-8" in strs and "6-8+kv" in strs  # the best 2-layer window
    assert "0-2,6-8" in strs  # the best two-group plan of 4 layers
    assert max(p.num_recomputed for p in plans) == 6
    assert teacher.best_groups(crit, 4, 2, 2) == ((0, 2), (6, 8))


def test_eval_json_has_the_issues_keys_for_every_pair(tf_profile, capsys):
    root, out = tf_profile
    data = root / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "context": f"Line {i}: the quick brown fox number {i} jumps over the lazy dog "
                    f"{i} times on day {i}.",
                    "question": f"What is line {i} about?",
                    **({"answer": "a fox"} if i % 2 else {}),
                }
            )
            + "\n"
            for i in range(12)
        )
    )
    argv = [
        "eval",
        "--family",
        "tiny",
        "--sender",
        "base",
        "--receiver",
        "code",
        "--data",
        str(data),
        "--samples",
        "3",
        "--ref-tokens",
        "8",
        "--repeats",
        "1",
        "--profiles",
        str(root),
        "--json",
    ]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    (p,) = r["pairs"]
    assert {
        "sender",
        "receiver",
        "selected_plan",
        "layers_recomputed",
        "meets_target",
        "retained_gain",
        "retained_gain_ci",
        "top1_agreement",
        "top1_agreement_ci",
        "prefill_speedup",
    } <= set(p)
    assert isinstance(p["meets_target"], bool) and p["domains"] == ["user"]
    assert r["summary"]["pairs"] == 1 and "full_reuse_kv" in p and p["kv_correction_kl_cut"] is not None
    if p["selected_plan"] is not None:
        assert RecomputePlan.parse(p["selected_plan"]).num_recomputed == p["layers_recomputed"]
