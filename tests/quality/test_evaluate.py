"""`kvrelay eval` on the tiny family: the JSON report's keys, the selector's plan, fallbacks, bad arguments."""

import json

import pytest

from kvrelay.cli import main
from helpers.profiles import make_profile, write

ARGS = [
    "eval",
    "--metric",
    "generation",
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
    "--repeats",
    "1",
    "--json",
]
METHOD_KEYS = {
    "task_quality",
    "task_by_kind",
    "agreement",
    "f1_vs_full",
    "rouge_l_vs_full",
    "top1_vs_full",
    "kl_vs_full",
    "prefill_s",
    "layers_recomputed",
    "layers_frac",
    "speedup_vs_full",
}


def test_eval_json_with_a_profile(tiny_family, tmp_path, capsys):
    write(
        tmp_path, make_profile(fp=tiny_family.fingerprint, num_layers=8, frontier=[([], 0, 90.0), ([[2, 4]], 2, 99.5)])
    )
    assert main([*ARGS, "--profiles", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {
        "family",
        "sender",
        "receiver",
        "split",
        "samples",
        "num_layers",
        "context_tokens_seen",
        "selector",
        "methods",
        "task_delta_vs_full",
        "notes",
    } <= set(r)
    assert r["split"] == "heldout" and r["samples"] == 2 and r["num_layers"] == 8
    assert r["domains"] == ["code"]  # the receiver is judged on the domain it was tuned for
    assert r["selector"]["plan"] == "2-4" and r["selector"]["layers_recomputed"] == 2
    assert set(r["methods"]) == {"full_prefill", "full_reuse", "selected", "cacheblend"}
    for m, d in r["methods"].items():
        assert METHOD_KEYS <= set(d), m
        assert 0 <= d["task_quality"] <= 100 and 0 <= d["agreement"] <= 100 and d["prefill_s"] > 0
    assert r["methods"]["full_prefill"]["agreement"] == 100.0
    assert r["methods"]["full_prefill"]["layers_recomputed"] == 8
    assert r["methods"]["full_reuse"]["layers_recomputed"] == 0
    assert r["methods"]["selected"]["layers_recomputed"] == 2
    assert 0 <= r["methods"]["cacheblend"]["tokens_recomputed_frac"] <= 1
    assert r["task_delta_vs_full"]["full_prefill"] == 0


def test_eval_without_profile_falls_back_to_full_prefill(tiny_family, tmp_path, capsys):
    assert main([*ARGS, "--samples", "1", "--no-cacheblend", "--profiles", str(tmp_path)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["selector"]["plan"] is None and r["selector"]["reason"].startswith("no profile")
    assert r["methods"]["selected"]["layers_recomputed"] == 8 and "cacheblend" not in r["methods"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--split", "train"], "--split must be one of"),
        (["--samples", "0"], "--samples, --agree-tokens and --repeats must be >= 1"),
        (["--context-tokens", "5"], "--context-tokens must be"),
    ],
)
def test_eval_bad_arguments_exit_2(extra, message, capsys):
    assert main([*ARGS, *extra]) == 2
    assert message in capsys.readouterr().err
