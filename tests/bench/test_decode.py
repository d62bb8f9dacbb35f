"""`kvrelay bench decode` end to end on a tiny family of PEFT adapters (figures, never speeds, are
asserted), and its clear errors."""

import pytest

from helpers import user_models as um
from kvrelay.cli import main


@pytest.fixture
def lora_family(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRELAY_HOME", str(tmp_path / "home"))
    base = um.make_base(tmp_path / "base")
    qv = um.make_lora(base, tmp_path / "qv", seed=1)
    al = um.make_lora(base, tmp_path / "all", seed=2, target_modules="all-linear")
    full = um.make_full(base, qv, tmp_path / "full")
    from kvrelay.families import user

    user.ensure_registered("mine", str(base), {"qv": str(qv), "all": str(al), "full": str(full)})
    return "mine"


def test_bench_decode_prints_ratios_per_batch(lora_family):
    from kvrelay.bench.decode import bench

    r = bench(lora_family, [1, 4], n_adapters=3, prompt=20, tokens=3, repeats=1)
    assert r["variant"] == "qv" and r["adapters"] == ["qv", "all", "random-0"] and r["rank"] == 4
    assert set(r["vs_hf"]) == {"1", "4"} and set(r["mixed_over_single"]) == {"4"}
    four = r["batches"]["4"]
    assert four["distinct_adapters_mixed"] == 3
    assert all(four[f"{k}_tokens_per_s"] > 0 for k in ("hf", "merged", "single", "mixed"))


def test_bench_decode_refuses_bad_input(lora_family, capsys):
    assert main(["bench", "decode", "--family", lora_family, "--batches", "8,x"]) == 2
    assert "--batches must be comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "decode", "--family", lora_family, "--variant", "full"]) == 2
    assert "is not a LoRA variant of 'mine'" in capsys.readouterr().err
    assert main(["bench", "decode", "--family", "tiny", "--tokens", "1"]) == 2
    assert "--tokens >= 2" in capsys.readouterr().err
