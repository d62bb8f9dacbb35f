"""`kvrelay bench prefill` runs end to end on tiny (figures, never speeds, are asserted)."""

from kvrelay.bench.prefill import FRACTIONS, bench
from kvrelay.cli import main


def test_bench_prefill_with_a_store(tiny_family):
    r = bench("tiny", [32, 64], repeats=1, suffix=8, store="memory")
    assert (r["sender"], r["receiver"], r["num_layers"]) == ("base", "code", 8)
    assert set(r["full_s"]) == {"32", "64"} and all(t > 0 for t in r["full_s"].values())
    for f in map(str, FRACTIONS):
        assert set(r["reprefill_s"][f]) == {"32", "64"} and set(r["reprefill_store_s"][f]) == {"32", "64"}
        assert r["layers_recomputed"][f] >= 1
    assert r["speedup_25_at"] == 64 and r["store_stats"]


def test_bench_prefill_refuses_bad_lengths(capsys):
    assert main(["bench", "prefill", "--family", "tiny", "--lengths", "8"]) == 2
    assert "--lengths must be >= 16" in capsys.readouterr().err
