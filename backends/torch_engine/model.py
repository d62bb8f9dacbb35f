"""A decoder whose layers can be run one by one over any token range (gpt-fast style, flat): one
configurable block for every supported architecture (Llama, Qwen2, Mistral, Gemma-3 text; what
differs is read in config.py).

Attention is delegated to an `attn(layer, q, k, v, **kw)` callable so the same layer code serves full
prefill, paged prefill-extend and batched decode (backends/torch_engine/attention.py); kw carries a
sliding layer's window and a non-default softmax scale.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvrelay.errors import KvRelayError

from .config import ModelConfig


class RMSNorm(nn.Module):
    """RMSNorm scaling by weight (Llama) or by (offset + weight) in float32 (Gemma: offset 1, weight
    stored as a difference from 1), each rounding to the input dtype where transformers does."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if not offset else torch.zeros(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


class ScaledEmbedding(nn.Embedding):
    """Token embeddings times a constant (Gemma: sqrt(hidden), rounded to the weights' dtype as in
    transformers); scale 1 is a plain embedding."""

    def __init__(self, num: int, dim: int, scale: float = 1.0):
        super().__init__(num, dim)
        self.scale = scale

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = super().forward(tokens)
        return x if self.scale == 1.0 else x * torch.tensor(self.scale, dtype=x.dtype, device=x.device)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    d = head_dim
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "llama3":  # Llama 3.1+ long-context frequency rescaling
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "linear":  # position interpolation (Gemma-3 4B+ global layers: factor 8)
        inv = inv / sc["factor"]
    elif kind != "default":
        raise KvRelayError(f"rope scaling {kind!r} is not supported by the torch engine")
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, D/2]; HF "rotate half" convention
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


_ACT = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class DecoderLayer(nn.Module):
    """One decoder block of any supported architecture; ModelConfig's fields say which parts it has.

    Calls attn(layer, q, k, v, **attn_kw): attn_kw holds only what differs from plain causal
    attention at head_dim ** -0.5 (window=W on a sliding layer, scale=s for Gemma's
    query_pre_attn_scalar), so a plain causal attention callable still serves Llama-shaped layers."""

    def __init__(self, cfg: ModelConfig, index: int = 0):
        super().__init__()
        self.nq, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.index, self.rope_key, self.window = index, cfg.rope_key(index), cfg.window(index)
        off, eps = cfg.norm_offset, cfg.rms_norm_eps
        self.qkv = nn.Linear(cfg.hidden_size, (self.nq + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.nq * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.ln1 = RMSNorm(cfg.hidden_size, eps, off)  # before attention
        self.ln2 = RMSNorm(cfg.hidden_size, eps, off)  # before the MLP
        self.q_norm = RMSNorm(self.hd, eps, off) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.hd, eps, off) if cfg.qk_norm else None
        self.attn_out_norm = RMSNorm(cfg.hidden_size, eps, off) if cfg.sandwich_norms else None
        self.mlp_out_norm = RMSNorm(cfg.hidden_size, eps, off) if cfg.sandwich_norms else None
        self.act = _ACT[cfg.hidden_act]
        self.attn_kw = {}
        if self.window is not None:
            self.attn_kw["window"] = self.window
        if cfg.attn_scale is not None and cfg.attn_scale != self.hd**-0.5:
            self.attn_kw["scale"] = cfg.attn_scale

    def _k(self, k, cos, sin):
        if self.k_norm is not None:
            k = self.k_norm(k)
        return apply_rope(k, cos, sin)

    def _linear(self, name: str, x, lora):
        y = getattr(self, name)(x)
        return y if lora is None else lora(self.index, name, x, y)

    def _qkv(self, h, cos, sin, lora=None):
        T = h.shape[0]
        q, k, v = self._linear("qkv", self.ln1(h), lora).split(
            [self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1
        )
        q = q.view(T, self.nq, self.hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        return apply_rope(q, cos, sin), self._k(k.view(T, self.nkv, self.hd), cos, sin), v.view(T, self.nkv, self.hd)

    def project_kv(self, h, cos, sin, lora=None) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K (k_norm and RoPE applied) and V for hidden states h entering it: [T, H_kv, D]
        each. K/V correction rebuilds a reused layer's KV from a donor's E with these weights; cos/sin
        must be this layer's own: model.rope(positions, layer). With lora (a LoraBatch), a LoRA
        receiver's K, V: its low-rank term on the K and V rows only."""
        T = h.shape[0]
        x = self.ln1(h)
        n = self.nq * self.hd
        b = self.qkv.bias[n:] if self.qkv.bias is not None else None
        kv = F.linear(x, self.qkv.weight[n:], b)
        if lora is not None:
            kv = lora(self.index, "qkv", x, kv, rows=slice(n, None))
        k, v = kv.split([self.nkv * self.hd, self.nkv * self.hd], -1)
        return self._k(k.view(T, self.nkv, self.hd), cos, sin), v.view(T, self.nkv, self.hd)

    def forward(self, h, cos, sin, attn, layer: int, lora=None):
        """lora: a LoraBatch (backends/torch_engine/lora.py) adding adapters' low-rank terms to rows
        of the batch after each linear; None runs the base weights alone."""
        T = h.shape[0]
        q, k, v = self._qkv(h, cos, sin, lora)
        a = self._linear("o", attn(layer, q, k, v, **self.attn_kw).reshape(T, -1), lora)
        h = h + (self.attn_out_norm(a) if self.attn_out_norm is not None else a)
        g, u = self._linear("gate_up", self.ln2(h), lora).chunk(2, dim=-1)
        m = self._linear("down", self.act(g) * u, lora)
        return h + (self.mlp_out_norm(m) if self.mlp_out_norm is not None else m)


class DecoderModel(nn.Module):
    """A decoder-only LM of any supported architecture (Llama, Qwen2, Mistral, Gemma-3 text).

    The seams other code steps through: embed(tokens) (scaled where the architecture scales),
    run_layers(h, positions, attn, start, end, on_enter=...), logits(h) (final softcap applied),
    layers[l].project_kv(h, *rope(positions, l)), and rope(positions, layer)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = ScaledEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        # float32 whatever the model's dtype (built under another default dtype, .float() keeps it so)
        self.register_buffer(
            "inv_freq", rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling), persistent=False
        )
        if any(l.rope_key == "local" for l in self.layers):
            self.register_buffer(
                "inv_freq_local",
                rope_inv_freq(cfg.head_dim, cfg.local_rope_theta, cfg.local_rope_scaling),
                persistent=False,
            )
        self.uniform_rope = not hasattr(self, "inv_freq_local")

    def _rope(self, positions: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self.inv_freq if key == "global" else self.inv_freq_local
        ang = positions.to(inv.device, torch.float32)[:, None] * inv.float()[None, :]
        return ang.cos(), ang.sin()

    def rope(self, positions: torch.Tensor, layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, head_dim / 2] of layer `layer`'s RoPE at `positions`. Without a layer: the one
        RoPE every layer shares; a model whose layers differ (Gemma-3: sliding layers use
        rope_local_base_freq) refuses that, since a wrong RoPE would be silently wrong K."""
        if layer is None:
            if not self.uniform_rope:
                raise KvRelayError(f"{self.cfg.model_type}: RoPE differs per layer type; call rope(positions, layer)")
            return self._rope(positions, "global")
        return self._rope(positions, self.layers[layer].rope_key)

    def run_layers(self, h, positions, attn, start: int, end: int, on_enter=None, lora=None):
        """Run layers [start, end) on hidden states h [T, hidden]; on_enter(layer, h) sees E; lora
        (a LoraBatch) applies adapters to rows of the batch."""
        ropes = {}
        for l in range(start, end):
            key = self.layers[l].rope_key
            if key not in ropes:
                ropes[key] = self._rope(positions, key)
            if on_enter is not None:
                on_enter(l, h)
            h = self.layers[l](h, *ropes[key], attn, l, lora)
        return h

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        x = self.lm_head(self.norm(h_last))
        cap = self.cfg.final_logit_softcap
        if cap:
            x = torch.tanh(x / cap) * cap
        return x.float()


LlamaModel = DecoderModel  # the name callers used when Llama was the only architecture


# --- weights -----------------------------------------------------------------------------------


def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (model_dir / f).exists():
            raise KvRelayError(f"weights file missing: {model_dir / f}")
        state.update(load_file(str(model_dir / f)))
    return state


def _layer_names(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter (within a layer) -> the HF checkpoint's name, for this architecture's layout."""
    names = {
        "o.weight": "self_attn.o_proj.weight",
        "down.weight": "mlp.down_proj.weight",
        "ln1.weight": "input_layernorm.weight",
    }
    if cfg.sandwich_norms:  # Gemma: post_attention_layernorm is on the attention *output*
        names.update(
            {
                "attn_out_norm.weight": "post_attention_layernorm.weight",
                "ln2.weight": "pre_feedforward_layernorm.weight",
                "mlp_out_norm.weight": "post_feedforward_layernorm.weight",
            }
        )
    else:  # Llama, Qwen2, Mistral: post_attention_layernorm is the MLP's input norm
        names["ln2.weight"] = "post_attention_layernorm.weight"
    if cfg.qk_norm:
        names.update({"q_norm.weight": "self_attn.q_norm.weight", "k_norm.weight": "self_attn.k_norm.weight"})
    if cfg.o_bias:
        names["o.bias"] = "self_attn.o_proj.bias"
    if cfg.mlp_bias:
        names["down.bias"] = "mlp.down_proj.bias"
    return names


def load_weights(model: DecoderModel, sd: dict[str, torch.Tensor], model_dir: Path | str = "") -> None:
    """Load a Hugging Face state dict (HF tensor names) of the model's architecture, fusing q/k/v and
    gate/up projections. A tensor the architecture has no place for is an error too: it means the
    checkpoint is not of the architecture its config names."""
    cfg = model.cfg
    used: set[str] = set()

    def get(name):
        used.add(name)
        return sd[name]

    names = _layer_names(cfg)
    try:
        with torch.no_grad():
            model.embed.weight.copy_(get("model.embed_tokens.weight"))
            model.norm.weight.copy_(get("model.norm.weight"))
            if not cfg.tie_word_embeddings:
                model.lm_head.weight.copy_(get("lm_head.weight"))
            elif "lm_head.weight" in sd:
                used.add("lm_head.weight")  # some exports write the tied head out as well
            for i, layer in enumerate(model.layers):
                p = f"model.layers.{i}."
                layer.qkv.weight.copy_(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if cfg.qkv_bias:
                    layer.qkv.bias.copy_(torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                layer.gate_up.weight.copy_(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
                if cfg.mlp_bias:
                    layer.gate_up.bias.copy_(torch.cat([get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias")]))
                for ours, theirs in names.items():
                    layer.get_parameter(ours).copy_(get(p + theirs))
    except KeyError as e:
        raise KvRelayError(
            f"{model_dir}: weight {e.args[0]} missing; not a {cfg.model_type} checkpoint of this config"
        ) from None
    unused = sorted(k for k in sd if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unused:
        raise KvRelayError(
            f"{model_dir}: {len(unused)} weights have no place in a {cfg.model_type} model of this "
            f"config (e.g. {', '.join(unused[:3])}); the checkpoint is not the architecture its "
            "config.json names"
        )


def random_init(model: DecoderModel, seed: int) -> None:
    """Random weights with sane scales (benchmarks of real-size shapes with no weights on disk):
    matrices N(0, 0.02), biases 0, norms the identity."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: 8B weights never touch the host
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0 - module.offset)
            elif isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
