"""A Hugging Face checkpoint or PEFT LoRA adapter directory, read without torch: which files hold the
weights, their safetensors headers (names, dtypes, shapes; truncation), the shapes a config implies,
and the LoRA settings an engine merges by. Registration (kvrelay.families.user) validates with these
before anything is registered; the torch engine (backends/torch_engine/weights.py) reads by them.

    files = weight_files(d)                # [model.safetensors] or the shards an index names, or .bin
    tensors = tensor_index(d)              # HF name -> Tensor(file, dtype, shape)
    lora = read_adapter(adapter_dir, cfg)  # LoraAdapter: per-module rank and scale, the file to read

Every error is a CheckpointError (a KvRelayError) naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.errors import KvRelayError

SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
SAFE_SINGLE, BIN_SINGLE = "model.safetensors", "pytorch_model.bin"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# floating dtypes a checkpoint may hold (the engine computes in its configured dtype): safetensors
# name -> (bytes, exponent mask, integer view) for the finite check
FLOAT_DTYPES = {"F32": (4, 0x7F800000, "<u4"), "F16": (2, 0x7C00, "<u2"), "BF16": (2, 0x7F80, "<u2")}
TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
# the projections a LoRA adapter may target: name -> the block it lives in
PROJECTIONS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
_LORA_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.weight$")


class CheckpointError(KvRelayError):
    """A model or adapter directory that cannot be served as it is; the message names file and field."""


@dataclass(frozen=True)
class Tensor:
    file: Path
    dtype: str  # safetensors dtype name (F32, F16, BF16, ...)
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the data (safetensors only)
    nbytes: int = 0


def read_json(path: Path, what: str = "") -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing{' (' + what + ')' if what else ''}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return d


# --- weight files ------------------------------------------------------------------------------


def weight_files(model_dir: Path) -> list[Path]:
    """The files a checkpoint's weights are in, as its loader reads them (safetensors preferred)."""
    model_dir = Path(model_dir)
    for index in (SAFE_INDEX, BIN_INDEX):
        p = model_dir / index
        if p.exists():
            wm = read_json(p).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{p}: field 'weight_map' missing or empty")
            files = [model_dir / f for f in sorted(set(wm.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{p}: field 'weight_map' names {f.name}, which is missing ({f})")
            return files
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(
        f"{model_dir}: no weights: expected {SAFE_SINGLE}, {SAFE_INDEX} with its shards, or {BIN_SINGLE}"
    )


def safetensors_header(path: Path) -> dict[str, Tensor]:
    """The tensors of one .safetensors file, from its JSON header; a truncated file is an error."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes, not even a safetensors header)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated (header of {n} bytes announced, file has {size})")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file (header unreadable: {e})") from None
    out, end = {}, 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        try:
            lo, hi = t["data_offsets"]
            out[name] = Tensor(path, t["dtype"], tuple(t["shape"]), 8 + n + lo, hi - lo)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {name!r} is malformed") from None
        end = max(end, hi)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: its header describes {8 + n + end} bytes, the file has {size}")
    return out


def bin_tensors(path: Path) -> dict[str, Tensor]:
    """The tensors of a torch .bin checkpoint (torch.load, weights only, memory-mapped)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            z.namelist()
    except (zipfile.BadZipFile, OSError):
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint (not a readable zip archive)") from None
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise CheckpointError(f"{path}: cannot be read as a torch state dict ({type(e).__name__}: {e})") from None
    return {k: Tensor(path, TORCH_DTYPES.get(str(v.dtype), str(v.dtype)), tuple(v.shape)) for k, v in sd.items()}


def file_tensors(path: Path) -> dict[str, Tensor]:
    return safetensors_header(path) if Path(path).suffix == ".safetensors" else bin_tensors(path)


def tensor_index(model_dir: Path) -> dict[str, Tensor]:
    """HF tensor name -> Tensor over every weight file of the checkpoint (an index checked against
    the shards' own headers)."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    out: dict[str, Tensor] = {}
    for f in files:
        out.update(file_tensors(f))
    for index in (SAFE_INDEX, BIN_INDEX):
        p = model_dir / index
        if p.exists():
            for name, fname in read_json(p)["weight_map"].items():
                t = out.get(name)
                if t is None or t.file.name != fname:
                    raise CheckpointError(f"{p}: field 'weight_map' puts {name} in {fname}, whose header lacks it")
            break
    return out


def check_finite(tensors: dict[str, Tensor]) -> None:
    """Every floating tensor is finite (no NaN or inf): read through a memory map, 16M values at a time."""
    import numpy as np

    for name, t in tensors.items():
        if t.dtype not in FLOAT_DTYPES:
            continue
        size, mask, view = FLOAT_DTYPES[t.dtype]
        count = t.nbytes // size
        if t.file.suffix != ".safetensors":
            _check_finite_torch(t.file, name)
            continue
        if count == 0:
            continue
        mm = np.memmap(t.file, dtype=np.dtype(view), mode="r", offset=t.offset, shape=(count,))
        for lo in range(0, count, 1 << 24):
            if ((mm[lo : lo + (1 << 24)] & mask) == mask).any():
                raise CheckpointError(f"{t.file}: tensor {name} holds non-finite values (NaN or inf)")
        del mm


def _check_finite_torch(path: Path, name: str) -> None:
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not torch.isfinite(sd[name].float()).all():
        raise CheckpointError(f"{path}: tensor {name} holds non-finite values (NaN or inf)")


# --- shapes a config implies -------------------------------------------------------------------


def projection_shape(cfg: dict, proj: str) -> tuple[int, int]:
    """(out_features, in_features) of a decoder layer's projection for HF config `cfg`."""
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    hd = cfg.get("head_dim") or cfg["hidden_size"] // heads
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    return {
        "q_proj": (heads * hd, h),
        "k_proj": (kv * hd, h),
        "v_proj": (kv * hd, h),
        "o_proj": (h, heads * hd),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }[proj]


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """The tensors every supported decoder has, with their shapes (an architecture's extra tensors,
    biases or norms, are the engine's to check)."""
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, h)
    for layer in range(cfg["num_hidden_layers"]):
        for proj, block in PROJECTIONS.items():
            out[f"model.layers.{layer}.{block}.{proj}.weight"] = projection_shape(cfg, proj)
        out[f"model.layers.{layer}.input_layernorm.weight"] = (h,)
    return out


def check_tensors(model_dir: Path, cfg: dict, tensors: dict[str, Tensor]) -> None:
    """Every tensor the config implies is there with its shape, in a floating dtype."""
    for name, shape in expected_shapes(cfg).items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(
                f"{model_dir}: tensor {name} is missing from the weights "
                f"({', '.join(sorted({x.file.name for x in tensors.values()})) or 'no files'})"
            )
        if t.shape != shape:
            raise CheckpointError(
                f"{t.file}: tensor {name} has shape {list(t.shape)}, config.json implies {list(shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{t.file}: tensor {name} is {t.dtype}; supported: fp32, fp16, bf16 (quantized checkpoints are not)"
            )


# --- LoRA adapters -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraModule:
    layer: int
    proj: str  # q_proj ... down_proj
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora

    @property
    def hf_name(self) -> str:
        return f"model.layers.{self.layer}.{PROJECTIONS[self.proj]}.{self.proj}"


@dataclass(frozen=True)
class LoraAdapter:
    dir: Path
    config: dict = field(repr=False)
    weights: Path  # adapter_model.safetensors or .bin
    modules: tuple[LoraModule, ...]

    @property
    def targets(self) -> list[str]:
        return [p for p in PROJECTIONS if any(m.proj == p for m in self.modules)]

    def summary(self) -> dict:
        """What the family manifest records of the adapter."""
        c = self.config
        return {
            "r": c.get("r"),
            "lora_alpha": c.get("lora_alpha"),
            "use_rslora": bool(c.get("use_rslora")),
            "target_modules": self.targets,
            "config_target_modules": c.get("target_modules"),
            "rank_pattern": c.get("rank_pattern") or {},
            "alpha_pattern": c.get("alpha_pattern") or {},
            "layers_to_transform": c.get("layers_to_transform"),
            "layers_pattern": c.get("layers_pattern"),
            "base_model_name_or_path": c.get("base_model_name_or_path"),
            "layers": sorted({m.layer for m in self.modules}),
            "modules": len(self.modules),
            "weights_file": self.weights.name,
        }


def is_adapter(d: Path) -> bool:
    return (Path(d) / ADAPTER_CONFIG).is_file()


def adapter_dir(model_dir: Path | None) -> Path | None:
    """Where a variant's PEFT adapter is: the directory itself (a registered LoRA variant: base files
    and adapter side by side) or its adapter/ folder (a built LoRA family keeps it there beside the
    merged weights); None for a full checkpoint."""
    if model_dir is None:
        return None
    for d in (Path(model_dir), Path(model_dir) / "adapter"):
        if is_adapter(d):
            return d
    return None


def pattern_key(patterns, module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key): the first pattern that matches a suffix of the
    module name at a dot boundary."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _unsupported(path: Path, field_: str, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: field {field_!r}: {what} is not supported (kvrelay merges plain LoRA "
        "on the attention and MLP projections into the base weights)"
    )


def read_adapter(adapter_dir: Path, base_cfg: dict, num_layers: int | None = None) -> LoraAdapter:
    """A PEFT LoRA adapter directory, checked against the base's config: its settings, and each
    adapted module's rank and scale; tensor shapes checked against the base's projections."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    c = read_json(path)
    r, alpha, n_layers = _check_adapter_config(path, c, base_cfg, num_layers)
    weights = next((adapter_dir / f for f in ADAPTER_WEIGHTS if (adapter_dir / f).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{adapter_dir}: no adapter weights: expected {' or '.join(ADAPTER_WEIGHTS)}")
    found = _lora_tensors(weights, n_layers)
    modules = _lora_modules(path, c, weights, found, base_cfg, r, alpha)
    return LoraAdapter(adapter_dir, c, weights, tuple(modules))


def _check_adapter_config(path: Path, c: dict, base_cfg: dict, num_layers: int | None) -> tuple[int, float, int]:
    """adapter_config.json: plain LoRA on the projections, within the base's layers: (r, lora_alpha,
    the base's layer count)."""
    peft_type = str(c.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{path}: field 'peft_type' is {c.get('peft_type')!r}; only LORA adapters are supported")
    if c.get("use_dora"):
        raise _unsupported(path, "use_dora", "DoRA (weight-decomposed LoRA)")
    if c.get("modules_to_save"):
        raise _unsupported(
            path, "modules_to_save", f"a full copy of {c['modules_to_save']} (e.g. embeddings or lm_head)"
        )
    if c.get("bias", "none") not in ("none", None):
        raise _unsupported(path, "bias", f"training biases ({c['bias']!r})")
    for key, what in (
        ("lora_bias", "a LoRA bias"),
        ("trainable_token_indices", "trainable tokens"),
        ("layer_replication", "layer replication"),
        ("target_parameters", "LoRA on parameters"),
    ):
        if c.get(key):
            raise _unsupported(path, key, what)
    targets = c.get("target_modules")
    if isinstance(targets, (list, tuple)):
        bad = [t for t in targets if t.rsplit(".", 1)[-1] not in PROJECTIONS]
        if bad:
            raise _unsupported(path, "target_modules", f"LoRA on {bad}")
    elif targets is not None and not isinstance(targets, str):
        raise CheckpointError(f"{path}: field 'target_modules' must be a list or a regex string")
    try:
        r, alpha = int(c["r"]), float(c.get("lora_alpha", 8))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: field 'r' missing or not an integer") from None
    layers = c.get("layers_to_transform")
    n_layers = num_layers if num_layers is not None else base_cfg["num_hidden_layers"]
    if isinstance(layers, int):
        layers = [layers]
    if layers is not None and any(not isinstance(i, int) or not 0 <= i < n_layers for i in layers):
        raise CheckpointError(
            f"{path}: field 'layers_to_transform' {layers} is outside the base's layers 0..{n_layers - 1}"
        )
    return r, alpha, n_layers


def _lora_tensors(weights: Path, n_layers: int) -> dict[tuple[int, str], dict[str, Tensor]]:
    """The weights file's LoRA tensors: {(layer, projection): {"A": tensor, "B": tensor}}; anything
    else (DoRA, embeddings, lm_head, an unknown name, a layer the base lacks, a non-float) refused."""
    found: dict[tuple[int, str], dict[str, Tensor]] = {}
    for name, t in file_tensors(weights).items():
        m = _LORA_KEY.match(name)
        if m is None or PROJECTIONS.get(m.group(3)) != m.group(2):
            what = (
                "DoRA magnitudes"
                if "lora_magnitude_vector" in name
                else "LoRA on the embeddings"
                if "embed_tokens" in name or "lora_embedding" in name
                else "LoRA on lm_head"
                if "lm_head" in name
                else "a tensor kvrelay does not know"
            )
            raise CheckpointError(
                f"{weights}: tensor {name}: {what} is not supported (kvrelay merges plain LoRA "
                "on the attention and MLP projections)"
            )
        layer = int(m.group(1))
        if layer >= n_layers:
            raise CheckpointError(
                f"{weights}: tensor {name}: layer {layer} does not exist in the base ({n_layers} layers)"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{weights}: tensor {name} is {t.dtype}; supported: fp32, fp16, bf16")
        found.setdefault((layer, m.group(3)), {})[m.group(4)] = t
    if not found:
        raise CheckpointError(f"{weights}: holds no LoRA tensors")
    return found


def _lora_modules(path: Path, c: dict, weights: Path, found: dict, base_cfg: dict, r: int, alpha: float) -> list:
    """One LoraModule per adapted projection, in layer then projection order: A and B both present,
    rank and alpha from the config's patterns, shapes those of the base's projection."""
    ranks, alphas = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
    modules = []
    for (layer, proj), ab in sorted(found.items(), key=lambda kv: (kv[0][0], list(PROJECTIONS).index(kv[0][1]))):
        module = f"model.layers.{layer}.{PROJECTIONS[proj]}.{proj}"
        prefix = f"base_model.model.{module}"
        if set(ab) != {"A", "B"}:
            raise CheckpointError(
                f"{weights}: {prefix} has lora_{''.join(ab)} but not lora_{'B' if 'A' in ab else 'A'}"
            )
        out_f, in_f = projection_shape(base_cfg, proj)
        rk = pattern_key(ranks, module)
        ak = pattern_key(alphas, module)
        rank = int(ranks[rk]) if rk is not None else r
        a = float(alphas[ak]) if ak is not None else alpha
        if ab["A"].shape != (rank, in_f):
            raise CheckpointError(
                f"{weights}: tensor {prefix}.lora_A.weight has shape {list(ab['A'].shape)}; the "
                f"base's {proj} takes {in_f} inputs and {path.name} says rank {rank} "
                f"({'rank_pattern ' + repr(rk) if rk is not None else 'r'}): expected [{rank}, {in_f}]"
            )
        if ab["B"].shape != (out_f, rank):
            raise CheckpointError(
                f"{weights}: tensor {prefix}.lora_B.weight has shape {list(ab['B'].shape)}; the "
                f"base's {proj} has {out_f} outputs: expected [{out_f}, {rank}]"
            )
        scale = a / math.sqrt(rank) if c.get("use_rslora") else a / rank
        modules.append(LoraModule(layer, proj, rank, scale))
    return modules
