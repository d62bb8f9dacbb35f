"""PEFT LoRA adapters with random weights at a real base's shapes, for benchmarks that need more
adapters than a family has (decode with 8 or 32 distinct adapters): written as PEFT writes them
(adapter_config.json + adapter_model.safetensors, PEFT's tensor names), cached under
$KVRELAY_HOME/bench-adapters. Speed does not depend on the values; B is small so that outputs stay
a perturbation of the base's, as a trained adapter's are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kvrelay import paths
from kvrelay.model import checkpoint as ck
from kvrelay.model.spec import read_hf_config

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(
    base_dir: Path,
    out: Path,
    rank: int = 16,
    alpha: int = 32,
    seed: int = 0,
    targets: tuple[str, ...] = ALL_LINEAR,
    layers: tuple[int, ...] | None = None,
    scale: float = 0.002,
) -> Path:
    """One adapter over the base at base_dir (its config.json gives the shapes); kept if present.
    `layers`: PEFT's layers_to_transform (None = every layer); `scale`: of B's entries."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    if (out / "adapter_model.safetensors").is_file():
        return out
    cfg = read_hf_config(base_dir)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]) if layers is None else layers:
        for proj in targets:
            n_out, n_in = ck.projection_shape(cfg, proj)
            name = f"base_model.model.model.layers.{layer}.{ck.PROJECTIONS[proj]}.{proj}"
            tensors[name + ".lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in**0.5
            tensors[name + ".lora_B.weight"] = torch.randn(n_out, rank, generator=g) * scale
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / ck.ADAPTER_CONFIG).write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": alpha,
                "lora_dropout": 0.0,
                "target_modules": list(targets),
                "bias": "none",
                "base_model_name_or_path": None,
                "inference_mode": True,
                **({} if layers is None else {"layers_to_transform": list(layers)}),
            },
            indent=1,
        )
    )
    tmp.rename(out)  # whole or absent, as builds are
    return out


def _layers_tag(layers: tuple[int, ...]) -> str:
    """A cache name that tells any two layer sets apart: a run as lo-hi, anything else listed."""
    lo, hi = min(layers), max(layers)
    return f"{lo}-{hi}" if sorted(layers) == list(range(lo, hi + 1)) else "_".join(map(str, sorted(layers)))


def random_adapters(
    base_dir: Path,
    n: int,
    rank: int = 16,
    key: str = "",
    layers: tuple[int, ...] | None = None,
    scale: float = 0.002,
) -> list[Path]:
    """n adapters over base_dir, cached per (key, rank, layers, scale, index)."""
    root = paths.home() / "bench-adapters" / (key or Path(base_dir).name)
    tag = f"r{rank}" + ("" if layers is None else f"-l{_layers_tag(layers)}")
    tag += "" if scale == 0.002 else f"-s{scale:g}"
    return [
        random_adapter(
            base_dir, root / f"{tag}-{i:02d}", rank=rank, alpha=2 * rank, seed=1000 + i, layers=layers, scale=scale
        )
        for i in range(n)
    ]
