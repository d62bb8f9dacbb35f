"""Small synthetic pages for the store tests (real engine pages are used in test_store_engine)."""

from __future__ import annotations

import torch

from kvrelay.model.kv_format import KVPages, PageFormat

FMT = PageFormat(num_layers=6, num_kv_heads=2, head_dim=8, hidden_size=16, block_size=4, e_layers=(2, 4))


def make_pages(tokens, producer="base@w1", fingerprint="fp-tiny", fmt=FMT, seed=0) -> KVPages:
    n = len(tokens) // fmt.block_size
    g = torch.Generator().manual_seed(seed)
    return KVPages(
        fmt,
        producer,
        fingerprint,
        list(tokens[: n * fmt.block_size]),
        torch.randn(n, *fmt.kv_shape, generator=g).to(fmt.torch_dtype),
        torch.randn(n, *fmt.e_shape, generator=g).to(fmt.torch_dtype),
    )


def ctx(n_tokens, start=0):
    return list(range(start, start + n_tokens))
