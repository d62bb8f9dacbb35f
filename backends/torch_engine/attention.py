"""The engine's paged KV pool and the attention contexts that read and write it.

The pool is a stack of pages in kvrelay.model.kv_format layout: kv [num_blocks, L, 2, H, B, D] (TensorRT-LLM's
pool layout) and e [num_blocks, len(e_layers), B, hidden]. A sequence owns a block table (list of
block ids); token at position p lives in block table[p // B], slot p % B.

Sliding-window layers keep every position in the pool (exact, simplest: pages and export are the
same for every layer); their attention masks to the window, in prefill, prefill-extend and decode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kvrelay.model.kv_format import PageFormat


class PagedKVPool:
    def __init__(self, fmt: PageFormat, num_blocks: int, device: torch.device):
        self.fmt = fmt
        self.num_blocks = num_blocks
        self.kv = torch.zeros((num_blocks, *fmt.kv_shape), dtype=fmt.torch_dtype, device=device)
        self.e = torch.zeros((num_blocks, *fmt.e_shape), dtype=fmt.torch_dtype, device=device)
        self.e_index = {l: i for i, l in enumerate(fmt.e_layers)}

    def slots(self, table: list[int], start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, end)
        B = self.fmt.block_size
        blocks = torch.tensor(table, dtype=torch.long)[pos // B]
        return blocks.to(self.kv.device), (pos % B).to(self.kv.device)

    def write_kv(self, layer: int, blocks, offs, k, v) -> None:
        # k, v: [T, H, D] -> pool[block, layer, 0|1, :, slot, :]
        self.kv[blocks, layer, 0, :, offs, :] = k.to(self.kv.dtype)
        self.kv[blocks, layer, 1, :, offs, :] = v.to(self.kv.dtype)

    def write_e(self, layer: int, blocks, offs, h) -> None:
        i = self.e_index.get(layer)
        if i is not None:
            self.e[blocks, i, offs, :] = h.to(self.e.dtype)

    def gather(self, layer: int, table: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of one sequence's first `length` tokens: [H, length, D] each."""
        kv = self.kv[table, layer]  # [nb, 2, H, B, D]
        kv = kv.permute(1, 2, 0, 3, 4).flatten(2, 3)  # [2, H, nb*B, D]
        return kv[0, :, :length], kv[1, :, :length]


def _sdpa(q, k, v, mask=None, causal=False, scale=None):
    # Always 4-D [batch, heads, tokens, dim]: with 3-D inputs PyTorch's CPU dispatch falls back to the
    # math kernel, ~8x slower than the flash kernel at 2k tokens.
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q[None], k[None], v[None]
    gqa = q.shape[-3] != k.shape[-3]
    o = F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=causal, enable_gqa=gqa, scale=scale
    )
    return o[0] if squeeze else o


def visible(q_pos: torch.Tensor, n_keys: int, window: int | None) -> torch.Tensor:
    """[len(q_pos), n_keys] bool: key j is visible to the query at position p when j <= p and, on a
    sliding layer, j > p - window (the window holds `window` positions, p itself included: the
    convention of transformers' sliding_window_overlay, kv_idx > q_idx - sliding_window)."""
    j = torch.arange(n_keys, device=q_pos.device)[None, :]
    p = q_pos[:, None]
    m = j <= p
    return m & (j > p - window) if window is not None else m


class PrefillAttention:
    """New tokens [start, start+n) of one sequence; attends to its cached tokens and causally to itself.
    A sliding layer (window=W) sees only the last W positions; the pool keeps every position."""

    def __init__(self, pool: PagedKVPool, table: list[int], start: int, n: int):
        self.pool, self.start, self.n = pool, start, n
        self.blocks, self.offs = pool.slots(table, start, start + n)
        B = pool.fmt.block_size
        self.table = torch.tensor(table[: (start + n + B - 1) // B], dtype=torch.long, device=pool.kv.device)
        self._masks: dict[int | None, torch.Tensor] = {}

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            pos = torch.arange(self.start, self.start + self.n, device=self.pool.kv.device)
            self._masks[window] = visible(pos, self.start + self.n, window)
        return self._masks[window]

    def __call__(self, layer, q, k, v, window=None, scale=None):
        self.pool.write_kv(layer, self.blocks, self.offs, k, v)
        q = q.transpose(0, 1)  # [H, n, D]
        if window is not None and window >= self.start + self.n:
            window = None  # the window covers everything: plain causal
        if self.start == 0 and window is None:  # nothing cached before: attend to the fresh k, v directly
            o = _sdpa(q, k.transpose(0, 1), v.transpose(0, 1), causal=True, scale=scale)
        elif self.start == 0:
            o = _sdpa(q, k.transpose(0, 1), v.transpose(0, 1), mask=self.mask(window), scale=scale)
        else:
            K, V = self.pool.gather(layer, self.table, self.start + self.n)
            o = _sdpa(q, K, V, mask=self.mask(window), scale=scale)
        return o.transpose(0, 1)  # [n, H, D]


class DecodeAttention:
    """One new token for each of several sequences (continuous batching), padded to the longest."""

    def __init__(self, pool: PagedKVPool, tables: list[list[int]], lengths: list[int]):
        dev = pool.kv.device
        B = pool.fmt.block_size
        self.pool = pool
        pos = [n - 1 for n in lengths]  # the new token's position
        self.blocks = torch.tensor([t[p // B] for t, p in zip(tables, pos)], dtype=torch.long, device=dev)
        self.offs = torch.tensor([p % B for p in pos], dtype=torch.long, device=dev)
        nb = max((n + B - 1) // B for n in lengths)
        self.table = torch.tensor(
            [t[:nb] + [t[0]] * (nb - min(len(t), nb)) for t in tables], dtype=torch.long, device=dev
        )
        self.pos = torch.tensor(pos, device=dev)
        self._masks = {None: visible(self.pos, nb * B, None)[:, None, None, :]}  # [S, 1, 1, T]

    def mask(self, window: int | None) -> torch.Tensor:
        if window not in self._masks:
            self._masks[window] = visible(self.pos, self._masks[None].shape[-1], window)[:, None, None, :]
        return self._masks[window]

    def __call__(self, layer, q, k, v, window=None, scale=None):
        """Attention block by block on the gathered pages as they lie ([S, nb, H, B, D]): K and V are
        each copied once (the gather), where sdpa needed a gather and a permute into [S, H, nb*B, D];
        aten::copy_ fell from 80 to 26 ms per 16 steps at batch 8 on SmolLM2's shapes
        (docs/lora-serving.md#decode-speed). Softmax in float32 whatever the pool's dtype."""
        self.pool.write_kv(layer, self.blocks, self.offs, k, v)
        S, nb = self.table.shape
        H, B, D = self.pool.kv.shape[3:]
        flat = self.table.flatten()
        pages = self.pool.kv[:, layer]  # [blocks, 2, H, B, D], a view
        K = pages[:, 0].index_select(0, flat).view(S, nb, H, B, D).to(q.dtype)  # contiguous: no copy in bmm
        V = pages[:, 1].index_select(0, flat).view(S, nb, H, B, D).to(q.dtype)
        g = q.shape[1] // H  # query heads per KV head (grouped-query attention)
        qs = (q.view(S, 1, H, g, D) * (D**-0.5 if scale is None else scale)).expand(S, nb, H, g, D)
        s = torch.matmul(qs, K.transpose(-1, -2)).float()  # [S, nb, H, g, B]
        s = s.permute(0, 2, 3, 1, 4).reshape(S, H, g, nb * B)
        s = s.masked_fill(~self.mask(window).view(S, 1, 1, nb * B), float("-inf"))
        p = torch.softmax(s, -1).to(q.dtype).view(S, H, g, nb, B).permute(0, 3, 1, 2, 4)  # [S, nb, H, g, B]
        return torch.matmul(p, V).sum(1).reshape(S, H * g, D)  # [S, Hq, D]


class DenseAttention:
    """No cache at all: the unpaged reference the paged paths are tested against."""

    def __call__(self, layer, q, k, v, window=None, scale=None):
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
        n = q.shape[1]
        if window is None or window >= n:
            return _sdpa(q, k, v, causal=True, scale=scale).transpose(0, 1)
        return _sdpa(q, k, v, mask=visible(torch.arange(n, device=q.device), n, window), scale=scale).transpose(0, 1)
