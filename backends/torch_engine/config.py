"""Model configuration (nano-vllm style: a plain slotted dataclass). The engine settings every
backend takes, EngineConfig, live in kvrelay.model.engine_api."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.model.spec import DEFAULT_MAX_LEN, kv_shape, read_hf_config

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
        layers, kv_heads, head_dim, hidden = kv_shape(cfg)
        return cls(vocab_size=cfg["vocab_size"], hidden_size=hidden,
                   intermediate_size=cfg["intermediate_size"], num_layers=layers,
                   num_heads=cfg["num_attention_heads"], num_kv_heads=kv_heads, head_dim=head_dim,
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta), rope_scaling=scaling,
                   max_position_embeddings=cfg.get("max_position_embeddings", DEFAULT_MAX_LEN),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), eos_token_ids=eos, raw=cfg)

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        return cls.from_hf(read_hf_config(model_dir))
