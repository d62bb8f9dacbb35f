"""The per-layer picture (reuse one layer's KV, compute the rest) on the tiny family's real models."""

import json
import subprocess
import sys

import pytest

from kvrelay.profiler import layers


@pytest.fixture(scope="module")
def tiny_layers(tiny_family):
    return layers.measure(
        "tiny", samples=1, context_tokens=(48, 64), pairs=[("base", "code"), ("code", "code")], progress=False
    )


def test_a_model_reusing_its_own_kv_changes_nothing(tiny_layers):
    per = tiny_layers[("code", "code")]["per_layer"]
    assert all(p["kl"] < 1e-9 and p["flip"] == 0 and p["k_dev"] == 0 for p in per)


def test_reusing_a_fine_tunes_layers_costs_something_and_names_critical_layers(tiny_layers):
    r = tiny_layers[("base", "code")]
    per = r["per_layer"]
    assert len(per) == r["num_layers"] == 8
    assert all(p["kl"] >= 0 and p["k_dev"] > 0 for p in per)
    assert max(p["kl"] for p in per) > 1e-4  # the hook really swapped the KV
    assert 1 <= len(r["critical"]) < r["num_layers"]
    assert r["sender_weights"] != r["receiver_weights"]
    top = max(per, key=lambda p: p["kl"])["layer"]
    assert top in r["critical"]


def test_critical_layers_is_the_fewest_carrying_half():
    per = [{"layer": i, "kl": k} for i, k in enumerate([0.1, 5.0, 0.2, 4.0, 1.0])]
    assert layers.critical_layers(per) == [1, 3]
    assert layers.critical_layers(per, share=0.3) == [1]


def test_cli_writes_pairs_and_picture(tiny_family, tmp_path):
    out = tmp_path / "tiny" / "layers"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "profile",
            "layers",
            "--family",
            "tiny",
            "--sender",
            "base",
            "--receiver",
            "legal",
            "--samples",
            "1",
            "--context-tokens",
            "48-64",
            "--out",
            str(out),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    d = json.loads((out / "base__legal.layers.json").read_text())
    assert d["dataset"]["samples"] == 1 and len(d["per_layer"]) == 8
    assert (tmp_path / "tiny" / "layers.png").stat().st_size > 10_000
    assert "base->legal: critical layers" in r.stdout


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--family", "tiny", "--sender", "base"], "both --sender and --receiver"),
        (["--family", "tiny", "--sender", "base", "--receiver", "base"], "must differ"),
        ([], "needs --family"),
        (["x.json", "--family", "tiny"], "takes no file argument"),
        (["--family", "tiny", "--sender", "base", "--receiver", "nope", "--samples", "1"], "not 'nope'"),
        (["--family", "tiny", "--samples", "0"], "--samples must be >= 1"),
    ],
)
def test_cli_bad_arguments(argv, msg):
    r = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "profile", "layers", *argv], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and msg in r.stderr, (r.returncode, r.stderr)
