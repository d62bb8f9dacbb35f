"""A family fingerprint: what two models must share for one's KV to mean anything to the other.

Architecture (layer count, widths, heads, RoPE) and tokenizer (vocabulary, merges, special tokens).
Weights are deliberately not part of it: fine-tuned variants share a fingerprint with their base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kvrelay.errors import FingerprintMismatch, KvRelayError
from kvrelay.model import checkpoint as ck

ARCH_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)
TOKENIZER_SECTIONS = ("model", "added_tokens", "normalizer", "pre_tokenizer")


def architecture(config: dict) -> dict:
    arch = {k: config.get(k) for k in ARCH_FIELDS}
    if arch["head_dim"] is None and config.get("hidden_size") and config.get("num_attention_heads"):
        arch["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    rope = config.get("rope_parameters") or {
        "rope_theta": config.get("rope_theta"),
        **(config.get("rope_scaling") or {}),
    }
    arch["rope"] = rope
    return arch


def tokenizer_digest(tokenizer_json: Path | None) -> str:
    """Digest of the parts of tokenizer.json that decide token ids (not formatting of the file)."""
    if tokenizer_json is None:
        return "no-tokenizer"
    if not tokenizer_json.exists():
        raise KvRelayError(f"tokenizer file missing: {tokenizer_json}")
    tok = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    canon = json.dumps({k: tok.get(k) for k in TOKENIZER_SECTIONS}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def compute(config: dict, tokenizer_json: Path | None) -> str:
    canon = json.dumps({"arch": architecture(config), "tok": tokenizer_digest(tokenizer_json)}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def require_same(donor_model: str, donor_fp: str, receiver_model: str, receiver_fp: str) -> None:
    if donor_fp != receiver_fp:
        raise FingerprintMismatch(
            f"cannot share KV from {donor_model!r} (fingerprint {donor_fp}) with {receiver_model!r} "
            f"(fingerprint {receiver_fp}): models differ in architecture or tokenizer"
        )


def weight_files(model_dir: Path) -> list[Path]:
    """The files a model's weights come from, by name: its checkpoint's (single or sharded
    safetensors, or .bin) and, for a LoRA variant's directory, its adapter's."""
    model_dir = Path(model_dir)
    try:
        files = ck.weight_files(model_dir)
    except ck.CheckpointError as e:
        raise KvRelayError(f"no weights in {model_dir}: {e}") from None
    files += [model_dir / f for f in ck.ADAPTER_WEIGHTS if (model_dir / f).is_file()][:1]
    return sorted(files, key=lambda f: f.name)


def update_from_file(h, path: Path) -> None:
    """Feed a file's bytes to hash `h`, 4 MiB at a time (weights do not fit memory twice)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    update_from_file(h, path)
    return h.hexdigest()


def weights_digest(model_dir: Path) -> str:
    """Digest of a model's weight files: part of a producer's identity in the page store, so pages of a
    rebuilt or retrained model are never served as the new weights' KV. A LoRA variant's covers the
    base's files and the adapter's. Cached beside the weights (size and mtime of each file)."""
    model_dir = Path(model_dir)
    files = weight_files(model_dir)
    stamp = ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    cache = model_dir / ".kvrelay-weights-digest"
    try:
        cached_stamp, digest = cache.read_text(encoding="utf-8").split("\n")[:2]
        if cached_stamp == stamp:
            return digest
    except (OSError, ValueError):
        pass
    h = hashlib.sha256()
    for f in files:
        update_from_file(h, f)
    digest = h.hexdigest()[:12]
    try:
        cache.write_text(f"{stamp}\n{digest}\n", encoding="utf-8")
    except OSError:
        pass  # read-only model dir: recompute next time
    return digest
