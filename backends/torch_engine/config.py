"""Model configuration (nano-vllm style: a plain slotted dataclass). The engine settings every
backend takes, EngineConfig, live in kvrelay.model.engine_api.

One decoder block serves every supported architecture (kvrelay.model.architectures); what differs
between them is read here from the HF config.json into the fields below, and model.py only reads
the fields, never the architecture's name:

    Llama     pre-norm block, SwiGLU, one RoPE; optional attention_bias / mlp_bias
    Qwen2     + q/k/v bias (o_proj none); sliding window only when use_sliding_window, on layers
              >= max_window_layers (as transformers' layer_types says)
    Mistral   + a sliding window on every layer when sliding_window is set
    Gemma-3   (text, Gemma3ForCausalLM) per-layer sliding / global attention (layer_types, or
              sliding_window_pattern), QK-norm, post-attention and pre/post-feedforward norms, RMSNorm
              scaling by (1 + weight), GeGLU (gelu_pytorch_tanh), embeddings times sqrt(hidden),
              rope_local_base_freq on sliding layers and rope_theta (+ rope_scaling) on global ones,
              query_pre_attn_scalar, final_logit_softcapping. attn_logit_softcapping is read but not
              applied: transformers' Gemma-3 attention does not apply it either (checked in 5.24:
              Gemma3Attention passes no softcap to its attention function), and exactness is against it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.model.architectures import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, check_supported
from kvrelay.model.spec import DEFAULT_MAX_LEN, kv_shape, read_hf_config

SUPPORTED_MODEL_TYPES = tuple(SUPPORTED_ARCHITECTURES)  # kept for older readers; the set lives in architectures.py
FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


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
    rope_theta: float  # RoPE of global (full-attention) layers
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    raw: dict = field(default_factory=dict, compare=False, repr=False)
    model_type: str = "llama"
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; () = every layer full
    sliding_window: int | None = None  # a sliding layer sees the last `sliding_window` positions, itself included
    local_rope_theta: float | None = None  # RoPE base of sliding layers when it differs (Gemma-3); None = rope_theta
    local_rope_scaling: dict | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"  # the gate's activation: SwiGLU (silu) or GeGLU (gelu_pytorch_tanh)
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before RoPE
    sandwich_norms: bool = False  # norms on the attention and MLP outputs too (Gemma's post/pre-ffw norms)
    norm_offset: float = 0.0  # RMSNorm scales by (norm_offset + weight): 1.0 for Gemma
    embed_scale: float = 1.0  # embeddings multiplied by this (Gemma: sqrt(hidden))
    attn_scale: float | None = None  # softmax scale; None = head_dim ** -0.5
    final_logit_softcap: float | None = None

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else FULL

    def window(self, layer: int) -> int | None:
        """The layer's sliding window (keys at positions p - window < j <= p), None for global attention."""
        return self.sliding_window if self.layer_type(layer) == SLIDING else None

    def rope_key(self, layer: int) -> str:
        """Which RoPE the layer uses: "local" (sliding layers of a model with a local base) or "global"."""
        return "local" if self.local_rope_theta is not None and self.layer_type(layer) == SLIDING else "global"

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelConfig":
        mt = check_supported(cfg)
        L = cfg["num_hidden_layers"]
        layers, kv_heads, head_dim, hidden = kv_shape(cfg)
        eos = cfg.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        rope_params = cfg.get("rope_parameters") or {}
        nested = FULL in rope_params or SLIDING in rope_params
        theta, scaling = _rope(
            rope_params.get(FULL) if nested else rope_params, cfg, 1_000_000.0 if mt == "gemma3_text" else 10000.0
        )
        common = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=layers,
            num_heads=cfg["num_attention_heads"],
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", DEFAULT_MAX_LEN),
            eos_token_ids=eos,
            raw=cfg,
            model_type=mt,
        )
        if mt == "gemma3_text":
            if cfg.get("use_bidirectional_attention"):
                raise UnsupportedArchitecture(
                    "Gemma-3 with use_bidirectional_attention (an encoder, EmbeddingGemma) "
                    "is not a causal LM; the engine runs causal Gemma-3 text models"
                )
            types = cfg.get("layer_types")
            if not types:
                pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
                types = [SLIDING if (i + 1) % pattern else FULL for i in range(L)]
            if nested:
                local_theta, local_scaling = _rope(rope_params.get(SLIDING) or {}, {}, 10000.0)
            else:
                local_theta, local_scaling = float(cfg.get("rope_local_base_freq") or 10000.0), None
            act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
            bias = bool(cfg.get("attention_bias", False))
            return cls(
                **common,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                layer_types=_types(types, L),
                sliding_window=cfg.get("sliding_window"),
                local_rope_theta=local_theta,
                local_rope_scaling=local_scaling,
                qkv_bias=bias,
                o_bias=bias,
                hidden_act=_act(act),
                qk_norm=True,
                sandwich_norms=True,
                norm_offset=1.0,
                embed_scale=hidden**0.5,
                attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
                final_logit_softcap=cfg.get("final_logit_softcapping"),
            )
        if mt == "qwen2":
            window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
            types = cfg.get("layer_types") or [
                SLIDING if window is not None and i >= cfg.get("max_window_layers", 28) else FULL for i in range(L)
            ]
            extra = dict(
                qkv_bias=True,
                layer_types=_types(types, L) if window is not None else (),
                sliding_window=window,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            )
        elif mt == "mistral":
            window = cfg.get("sliding_window")
            extra = dict(
                layer_types=(SLIDING,) * L if window is not None else (),
                sliding_window=window,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            )
        else:  # llama
            bias = bool(cfg.get("attention_bias", False))
            extra = dict(
                qkv_bias=bias,
                o_bias=bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            )
        return cls(
            **common,
            **extra,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=_act(cfg.get("hidden_act", "silu")),
        )

    @classmethod
    def from_dir(cls, model_dir: Path) -> "ModelConfig":
        return cls.from_hf(read_hf_config(model_dir))


def _rope(params: dict | None, cfg: dict, default_theta: float) -> tuple[float, dict | None]:
    """(theta, scaling or None) from a rope_parameters dict (transformers 5) or the older rope_theta +
    rope_scaling fields of cfg."""
    rope = dict(params or {})
    theta = rope.pop("rope_theta", None) or cfg.get("rope_theta") or default_theta
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling = rope if kind != "default" else (cfg.get("rope_scaling") or None)
    return float(theta), scaling


def _types(types, L: int) -> tuple[str, ...]:
    types = tuple(types)
    if len(types) != L or any(t not in (FULL, SLIDING) for t in types):
        raise KvRelayError(
            f"layer_types must name {FULL!r} or {SLIDING!r} for each of the {L} layers, got {list(types)}"
        )
    return types


def _act(name: str) -> str:
    if name not in ACTIVATIONS:
        raise KvRelayError(f"activation {name!r} is not supported by the torch engine; it runs {ACTIVATIONS}")
    return name
