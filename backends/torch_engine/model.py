"""A Llama decoder whose layers can be run one by one over any token range (gpt-fast style, flat).

Attention is delegated to an `attn(layer, q, k, v)` callable so the same layer code serves full
prefill, paged prefill-extend and batched decode (backends/torch_engine/attention.py).
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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "llama3":  # Llama 3.1+ long-context frequency rescaling
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise KvRelayError(f"rope scaling {kind!r} is not supported by the torch engine")
    return inv.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos/sin [T, D/2]; HF "rotate half" convention
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nq, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, (self.nq + 2 * self.nkv) * self.hd, bias=False)
        self.o = nn.Linear(self.nq * self.hd, cfg.hidden_size, bias=False)
        self.gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.ln1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.ln2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _qkv(self, h, cos, sin):
        T = h.shape[0]
        q, k, v = self.qkv(self.ln1(h)).split([self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd], -1)
        q = apply_rope(q.view(T, self.nq, self.hd), cos, sin)
        k = apply_rope(k.view(T, self.nkv, self.hd), cos, sin)
        return q, k, v.view(T, self.nkv, self.hd)

    def project_kv(self, h, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's K (RoPE applied) and V for hidden states h entering it: [T, H_kv, D] each.
        K/V correction rebuilds a reused layer's KV from a donor's E with these weights."""
        T = h.shape[0]
        x = self.ln1(h)
        w = self.qkv.weight[self.nq * self.hd:]
        k, v = F.linear(x, w).split([self.nkv * self.hd, self.nkv * self.hd], -1)
        return apply_rope(k.view(T, self.nkv, self.hd), cos, sin), v.view(T, self.nkv, self.hd)

    def forward(self, h, cos, sin, attn, layer: int):
        T = h.shape[0]
        q, k, v = self._qkv(h, cos, sin)
        h = h + self.o(attn(layer, q, k, v).reshape(T, -1))
        g, u = self.gate_up(self.ln2(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(g) * u)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ang = positions.to(self.inv_freq.device, torch.float32)[:, None] * self.inv_freq[None, :]
        return ang.cos(), ang.sin()

    def run_layers(self, h, positions, attn, start: int, end: int, on_enter=None):
        """Run layers [start, end) on hidden states h [T, hidden]; on_enter(layer, h) sees E."""
        cos, sin = self.rope(positions)
        for l in range(start, end):
            if on_enter is not None:
                on_enter(l, h)
            h = self.layers[l](h, cos, sin, attn, l)
        return h

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h_last)).float()


# --- weights -----------------------------------------------------------------------------------

def read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) if index.exists() else ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        if not (model_dir / f).exists():
            raise KvRelayError(f"weights file missing: {model_dir / f}")
        state.update(load_file(str(model_dir / f)))
    return state


def load_weights(model: LlamaModel, sd: dict[str, torch.Tensor], model_dir: Path | str = "") -> None:
    """Load a Hugging Face Llama state dict (HF tensor names), fusing q/k/v and gate/up projections."""
    try:
        with torch.no_grad():
            model.embed.weight.copy_(sd["model.embed_tokens.weight"])
            model.norm.weight.copy_(sd["model.norm.weight"])
            if not model.cfg.tie_word_embeddings:
                model.lm_head.weight.copy_(sd["lm_head.weight"])
            for i, layer in enumerate(model.layers):
                p = f"model.layers.{i}."
                layer.qkv.weight.copy_(torch.cat([sd[p + f"self_attn.{n}_proj.weight"] for n in "qkv"]))
                layer.o.weight.copy_(sd[p + "self_attn.o_proj.weight"])
                layer.gate_up.weight.copy_(torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]]))
                layer.down.weight.copy_(sd[p + "mlp.down_proj.weight"])
                layer.ln1.weight.copy_(sd[p + "input_layernorm.weight"])
                layer.ln2.weight.copy_(sd[p + "post_attention_layernorm.weight"])
    except KeyError as e:
        raise KvRelayError(f"{model_dir}: weight {e.args[0]} missing; not a Llama checkpoint of this config") from None


def random_init(model: LlamaModel, seed: int) -> None:
    """Random weights with sane scales (benchmarks of real-size shapes with no weights on disk)."""
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)  # on the device: 8B weights never touch the host
    with torch.no_grad():
        for name, p in model.named_parameters():
            if isinstance(p, nn.Parameter) and p.dim() == 1:
                p.fill_(1.0)  # norm gains
            else:
                p.normal_(0.0, 0.02, generator=g)
