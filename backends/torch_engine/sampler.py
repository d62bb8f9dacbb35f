"""Next-token choice: greedy, temperature, top-k, top-p, with a per-request generator for seeds."""

from __future__ import annotations

import torch


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> int:
    """logits: [vocab] float32."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sp, idx = probs.sort(descending=True)
        keep = sp.cumsum(0) - sp < top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
