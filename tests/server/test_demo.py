"""`kvrelay demo` (the README's main job) end to end on a real tritonserver, with the tiny family:
every variant answers, at least one through cross-model reuse, and the metrics are printed."""

import subprocess
import sys


def test_demo_serves_every_variant_and_one_by_reuse(tiny_family, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "demo",
            "--family",
            "tiny",
            "--max-tokens",
            "4",
            "--context-tokens",
            "256",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for model in tiny_family.models:
        assert f"[{model}]" in out, out
    assert "KV: reuse" in out and "donor=base" in out, out
    assert "kvrelay_prefill_count_total" in out, out


def test_demo_rejects_bad_settings_with_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "demo", "--family", "tiny", "--max-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--max-tokens must be >= 1" in r.stderr, r.stderr
