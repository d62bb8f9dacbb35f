"""Model and engine configuration (nano-vllm style: plain slotted dataclasses)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.errors import KvRelayError

SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    raw: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        if cfg.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise KvRelayError(f"model_type {cfg.get('model_type')!r} is not supported; the torch engine "
                               f"runs {SUPPORTED_MODEL_TYPES} (Llama-family) models")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = rope if rope_type != "default" else (cfg.get("rope_scaling") or None)
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = cfg["num_attention_heads"]
        return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
                   intermediate_size=cfg["intermediate_size"], num_layers=cfg["num_hidden_layers"],
                   num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
                   max_position_embeddings=cfg.get("max_position_embeddings", 4096),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), eos_token_ids=eos, raw=cfg)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.exists():
            raise KvRelayError(f"no config.json in {model_dir}: not a Hugging Face model directory")
        return cls.from_hf(json.loads(path.read_text(encoding="utf-8")))


@dataclass(slots=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "float32"            # float32 | bfloat16 | float16
    block_size: int = 16
    kv_cache_bytes: int = 2 << 30     # KV + E pool cap; sets the number of blocks
    max_num_seqs: int = 64            # sequences decoding together (continuous batching)
    max_prefill_tokens: int = 8192    # prompt tokens prefilled per step before decoding resumes
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    e_layers: tuple[int, ...] | None = None  # layers whose entering hidden state is kept for export;
                                             # None = every 2nd layer (the profiler's stride-2 group starts)
    prefix_caching: bool = True
