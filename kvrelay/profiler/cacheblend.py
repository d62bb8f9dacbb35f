"""A CacheBlend-style baseline (Yao et al., EuroSys 2025) adapted to cross-model reuse: instead of
recomputing some *layers* for every context token, recompute some *tokens* at every layer.

Steps over the donor's shared context pages:
  1. the receiver runs its first `full_layers` layers over every context token (its own exact KV);
  2. at the last of those layers it picks the k tokens whose K/V deviate most from the donor's
     ("high-KV-deviation" tokens, CacheBlend's selection; one-shot, no gradual filtering);
  3. for every later layer only those k tokens run, attending causally to a blend of the donor's KV
     (other tokens) and their own fresh KV; their KV replaces the donor's.
The blended KV goes to the engine as donor pages reused in every layer (plan none), so the question
and decoding run exactly as for the other methods. Compute: n * full_layers + k * (L - full_layers)
token-layers, which `tokens_for_budget` matches to a layer plan's n * layers.
Uses the torch engine's model directly (layers stepped one by one); no pipelining or loading overlap.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from kvrelay.model import kv_format
from kvrelay.model.kv_format import KVPages, PageFormat

FULL_LAYERS = 2


def tokens_for_budget(n: int, num_layers: int, layers_budget: int, full_layers: int = FULL_LAYERS) -> int:
    """Tokens to recompute in the later layers for the compute of `layers_budget` full layers."""
    extra = max(0, layers_budget - full_layers) * n
    return min(n, round(extra / max(1, num_layers - full_layers)))


def shared_blocks(pages: KVPages, prompt: list[int]) -> int:
    """Leading blocks of the pages whose tokens the prompt repeats (as the engine counts them)."""
    return kv_format.shared_blocks(pages.tokens, prompt, pages.format.block_size)


@torch.inference_mode()
def blend(R, pages: KVPages, prompt: list[int], k: int, full_layers: int = FULL_LAYERS) -> tuple[KVPages, float, int]:
    """(blended pages, seconds, context tokens) for receiver engine R from donor `pages`."""
    t0 = time.perf_counter()
    nb = shared_blocks(pages, prompt)
    fmt = pages.format
    B, L, H, D = fmt.block_size, fmt.num_layers, fmt.num_kv_heads, fmt.head_dim
    n = nb * B
    if n == 0:  # nothing shared: the engine will prefill everything itself
        return pages.prefix(0), time.perf_counter() - t0, 0
    model, dev = R.model, R.device
    dtype = R.page_format.torch_dtype
    kv = pages.kv[:nb].to(dev, dtype).clone()  # [nb, L, 2, H, B, D]

    def donor_layer(l):  # -> K, V [H, n, D]
        x = kv[:, l].permute(1, 2, 0, 3, 4).reshape(2, H, n, D)
        return x[0], x[1]

    def store(l, K, V):  # K, V [H, n, D] -> pages layout
        kv[:, l, 0] = K.reshape(H, nb, B, D).permute(1, 0, 2, 3)
        kv[:, l, 1] = V.reshape(H, nb, B, D).permute(1, 0, 2, 3)

    full_layers = max(1, min(full_layers, L))
    toks = torch.tensor(prompt[:n], dtype=torch.long, device=dev)
    pos = torch.arange(n, device=dev)
    cos, sin = model.rope(pos)
    h = model.embed(toks)
    dev_score = None
    for l in range(full_layers):

        def attn(layer, q, k_, v, l=l):
            nonlocal dev_score
            Kd, Vd = donor_layer(layer)
            K, V = k_.transpose(0, 1).to(dtype), v.transpose(0, 1).to(dtype)
            if layer == full_layers - 1:
                dev_score = ((K.float() - Kd.float()) ** 2).sum((0, 2)) + ((V.float() - Vd.float()) ** 2).sum((0, 2))
            store(layer, K, V)
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                K[None].to(q.dtype),
                V[None].to(q.dtype),
                is_causal=True,
                enable_gqa=q.shape[1] != H,
            )
            return o[0].transpose(0, 1)

        h = model.layers[l](h, cos, sin, attn, l)
    k = max(0, min(int(k), n))
    if k and full_layers < L:
        idx = torch.sort(torch.topk(dev_score, k).indices).values
        hs, cs, ss = h[idx], cos[idx], sin[idx]
        mask = (torch.arange(n, device=dev)[None, :] <= idx[:, None])[None, None]  # [1, 1, k, n]
        for l in range(full_layers, L):

            def attn(layer, q, k_, v):
                K, V = donor_layer(layer)
                K, V = K.clone(), V.clone()
                K[:, idx], V[:, idx] = k_.transpose(0, 1).to(dtype), v.transpose(0, 1).to(dtype)
                store(layer, K, V)
                o = F.scaled_dot_product_attention(
                    q.transpose(0, 1)[None],
                    K[None].to(q.dtype),
                    V[None].to(q.dtype),
                    attn_mask=mask,
                    enable_gqa=q.shape[1] != H,
                )
                return o[0].transpose(0, 1)

            hs = model.layers[l](hs, cs, ss, attn, l)
    if dev.type == "cuda":  # the timing covers the work, not its launch
        torch.cuda.synchronize(dev)
    out_fmt = PageFormat(**{**fmt.to_dict(), "e_layers": ()})
    e = torch.empty((nb, 0, B, fmt.hidden_size), dtype=kv.dtype, device=kv.device)
    blended = KVPages(out_fmt, f"{pages.producer}+cacheblend", pages.fingerprint, list(pages.tokens[:n]), kv, e)
    return blended, time.perf_counter() - t0, n
