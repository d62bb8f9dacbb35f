"""The smol-lora builder, shortened (2 steps of 64-token blocks, one variant, one eval block): PEFT LoRA adapters on
every layer's attention and MLP projections, kept beside merged weights, reproducible by seed."""

import copy
import json

import pytest
import torch

from kvrelay.families import smol_lora, sources
from kvrelay.model import fingerprint


@pytest.fixture(scope="module")
def short_builds(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.conftest import _smol_pair_dirs

    base_dir, _ = _smol_pair_dirs()
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    mp = pytest.MonkeyPatch()
    mp.setattr(sources, "load_model", lambda progress=True, path=None: copy.deepcopy(base))
    mp.setattr(smol_lora, "VARIANTS", ("code",))
    mp.setattr(smol_lora, "MAX_STEPS", 2)
    mp.setattr(smol_lora, "EVAL_BLOCKS", 1)
    mp.setattr(smol_lora, "BLOCK_LEN", 64)
    # two steps need not beat the base: what the gate is given is checked instead
    gated = []
    mp.setattr("kvrelay.families.finetune.require_improvement", lambda *a: gated.append(a))
    out = []
    try:
        for k in range(2):
            d = tmp_path_factory.mktemp(f"lora{k}")
            out.append((d, smol_lora.build(d, progress=False)))
    finally:
        mp.undo()
    return base_dir, out, gated


def test_adapter_on_every_layer_kept_and_merged(short_builds):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, [(d, info), _], gated = short_builds
    cfg = json.loads((d / "code" / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == smol_lora.RANK and set(cfg["target_modules"]) == set(smol_lora.TARGET_MODULES)
    b = info["code"]
    assert b["steps"] == 2 and b["lora"]["r"] == smol_lora.RANK and b["seed"] and "train part" in b["data"]
    # every layer's projections carry a trained adapter: 30 layers x 7 projections x (A, B)
    from safetensors.torch import load_file

    ad = load_file(d / "code" / "adapter" / "adapter_model.safetensors")
    layers = {int(k.split(".layers.")[1].split(".")[0]) for k in ad}
    assert layers == set(range(30)) and len(ad) == 30 * 7 * 2
    assert all(v.abs().sum() > 0 for k, v in ad.items() if "lora_B" in k)  # B starts at zero: it trained
    # merged weights == base + adapter, as PEFT applies it unmerged
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, d / "code" / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(d / "code", dtype=torch.float32).eval()
    with torch.no_grad():
        a, m = unmerged(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(input_ids=ids).logits
    assert (a - m).abs().max() < 1e-3 < (plain - m).abs().max()
    assert gated and gated[0][1:3] == ("code", "code")
    assert gated[0][3] == info["base"]["heldout_loss"]["code"] and gated[0][4] == b["heldout_loss"]["code"]


def test_same_steps_seed_and_data_give_the_same_weights(short_builds):
    _, [(d1, _), (d2, _)], _ = short_builds
    assert fingerprint.weights_digest(d1 / "code") == fingerprint.weights_digest(d2 / "code")
    assert fingerprint.weights_digest(d1 / "code") != fingerprint.weights_digest(d1 / "base")
