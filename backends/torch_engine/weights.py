"""A checkpoint directory -> an HF-named fp32 state dict for load_weights (model.py): single or sharded
safetensors, or torch .bin (weights only), any of fp32 / fp16 / bf16, checked finite; and when the
directory also holds a PEFT LoRA adapter (adapter_config.json + adapter_model.*, as a registered
LoRA variant's directory does: the base's files and the adapter's side by side), the adapter merged:
W += scale * B @ A per adapted projection, in fp32, exactly as PEFT's merge_and_unload() does.

The engine then casts to its configured dtype when it copies the tensors in. Which files to read
and every LoRA setting come from kvrelay.model.checkpoint, the one reader of their layout.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvrelay.model import checkpoint as ck
from kvrelay.model.spec import read_hf_config


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        ck.safetensors_header(path)  # a truncated file is a clear error, not a safetensors panic
        return load_file(str(path))
    ck.bin_tensors(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _float(name: str, t: torch.Tensor, path: Path) -> torch.Tensor:
    if not t.is_floating_point():
        raise ck.CheckpointError(f"{path}: tensor {name} is {t.dtype}; supported: fp32, fp16, bf16")
    t = t.float()
    if not torch.isfinite(t).all():
        raise ck.CheckpointError(f"{path}: tensor {name} holds non-finite values (NaN or inf)")
    return t


def read_checkpoint(model_dir: Path) -> dict[str, torch.Tensor]:
    """The base weights of `model_dir` in fp32, HF tensor names."""
    model_dir = Path(model_dir)
    state: dict[str, torch.Tensor] = {}
    for f in ck.weight_files(model_dir):
        for name, t in _load_file(f).items():
            state[name] = _float(name, t, f)
    return state


def lora_tensors(adapter: ck.LoraAdapter) -> dict[ck.LoraModule, tuple[torch.Tensor, torch.Tensor]]:
    """Each adapted module's (A [r, in], B [out, r]) in fp32, checked finite; scale not applied."""
    tensors = _load_file(adapter.weights)
    out = {}
    for m in adapter.modules:
        prefix = f"base_model.model.{m.hf_name}"
        out[m] = (
            _float(prefix + ".lora_A.weight", tensors[prefix + ".lora_A.weight"], adapter.weights),
            _float(prefix + ".lora_B.weight", tensors[prefix + ".lora_B.weight"], adapter.weights),
        )
    return out


def merge_lora(state: dict[str, torch.Tensor], adapter: ck.LoraAdapter) -> dict[str, torch.Tensor]:
    """`state` with the adapter merged in place (and returned)."""
    for m, (a, b) in lora_tensors(adapter).items():
        w = state[m.hf_name + ".weight"]
        if w.shape != (b.shape[0], a.shape[1]):
            raise ck.CheckpointError(
                f"{adapter.weights}: base_model.model.{m.hf_name} ({list(b.shape)} x "
                f"{list(a.shape)}) does not fit the base's {m.hf_name}.weight {list(w.shape)}"
            )
        state[m.hf_name + ".weight"] = w + (b @ a) * m.scale
    return state


def read_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """What an engine loads for a model directory: its checkpoint, with its LoRA adapter merged if
    it has one."""
    model_dir = Path(model_dir)
    state = read_checkpoint(model_dir)
    if ck.is_adapter(model_dir):
        state = merge_lora(state, ck.read_adapter(model_dir, read_hf_config(model_dir)))
    return state
