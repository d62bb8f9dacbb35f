"""LoRA adapters served unmerged over one shared base (S-LoRA / Punica style, written in torch).

An adapter's q/k/v and gate/up projections are stacked to fit the engine's fused linears: for the
fused qkv, A is [r_q + r_k + r_v, in] (one matmul for all three) and B is [out_qkv, r_q + r_k + r_v]
with each projection's B in its own rows and columns (zeros elsewhere), the LoRA scale folded in.
A linear's output is then y = x W^T + (x A^T) B^T for the rows of a batch that run that adapter.

A batch is a list of row segments, one per adapter (rows sorted by adapter first), so each adapter's
weights are read once per step whatever the number of its rows: the memory-bound decode reads the
base once plus each distinct adapter once. Rows with no segment run the base alone.

The weights are exact to PEFT's: merging (W + s B A, merge_and_unload) and this unmerged sum agree to
float rounding (tested: same greedy tokens, logits within 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrelay.model import checkpoint as ck

from .weights import lora_tensors

# PEFT projection -> (our fused linear, its part: row block within the fused output)
FUSED = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}


@dataclass(eq=False)
class LoraWeights:
    """One adapter, resident: per layer, fused linear -> (A [R, in], B [out, R], scale folded in B)."""

    name: str
    model_id: str  # name@weights digest: the identity its KV pages carry
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]


def _part_rows(layer, linear: str) -> list[int]:
    """Output sizes of the fused linear's parts, in FUSED order."""
    if linear == "qkv":
        return [layer.nq * layer.hd, layer.nkv * layer.hd, layer.nkv * layer.hd]
    if linear == "gate_up":
        half = layer.gate_up.out_features // 2
        return [half, half]
    return [getattr(layer, linear).out_features]


def load_lora(
    name: str, model_id: str, adapter: ck.LoraAdapter, model, dtype: torch.dtype, device: torch.device
) -> LoraWeights:
    """An adapter read from disk into the fused layout of `model` (a DecoderModel)."""
    tensors = lora_tensors(adapter)
    by_layer: dict[int, dict[str, list]] = {}
    for m in adapter.modules:
        linear, part = FUSED[m.proj]
        a, b = tensors[m]
        by_layer.setdefault(m.layer, {}).setdefault(linear, []).append((part, a, b * m.scale))
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
    for i, layer in enumerate(model.layers):
        fused = {}
        for linear, parts in by_layer.get(i, {}).items():
            rows = _part_rows(layer, linear)
            offsets = [sum(rows[:p]) for p in range(len(rows))]
            A = torch.cat([a for _, a, _ in parts])
            B = torch.zeros(sum(rows), A.shape[0])
            col = 0
            for part, a, b in parts:
                B[offsets[part] : offsets[part] + rows[part], col : col + a.shape[0]] = b
                col += a.shape[0]
            fused[linear] = (A.to(device, dtype).contiguous(), B.to(device, dtype).contiguous())
        layers.append(fused)
    return LoraWeights(name, model_id, layers)


class LoraBatch:
    """Which rows of a batch run which adapter: segments (weights, first row, end row), disjoint.

    Called by a layer as lora(layer, linear, x, y) after its base linear: returns y with each
    segment's low-rank term added. `rows` restricts to a slice of the fused output (K/V correction
    projects only K and V)."""

    def __init__(self, segments: list[tuple[LoraWeights, int, int]]):
        self.segments = segments

    @classmethod
    def single(cls, weights: LoraWeights | None, n: int) -> "LoraBatch | None":
        return None if weights is None else cls([(weights, 0, n)])

    def __call__(
        self, layer: int, linear: str, x: torch.Tensor, y: torch.Tensor, rows: slice | None = None
    ) -> torch.Tensor:
        n = x.shape[0]
        for w, lo, hi in self.segments:
            ab = w.layers[layer].get(linear)
            if ab is None:
                continue
            A, B = ab
            if rows is not None:
                B = B[rows]
            if lo == 0 and hi == n:
                y = torch.addmm(y, x @ A.t(), B.t())
            else:
                y[lo:hi] += (x[lo:hi] @ A.t()) @ B.t()
        return y
