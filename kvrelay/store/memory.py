"""The in-process tier: pages kept as CPU tensors (no serialisation), LRU under a byte cap.

Eviction goes from the least recently used page; within one context the *last* pages are used least
recently (put and fetch touch a context's pages back to front), so a context loses its tail first and
keeps a usable leading prefix as long as possible: only leading blocks can ever be reused.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageFormat

from .base import PageStore


@dataclass(slots=True, eq=False)
class _Page:
    key: tuple  # (tenant, fp, producer, B, hash)
    kv: torch.Tensor  # [L, 2, H, B, D], CPU, never written after put
    e: dict[int, torch.Tensor]  # e_layer -> [B, hidden]
    nbytes: int


class MemoryStore(PageStore):
    def __init__(self, max_bytes: int):
        super().__init__()
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise KvRelayError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._pages: OrderedDict[tuple, _Page] = OrderedDict()  # (tenant, fp, producer, B, hash) -> page, LRU first
        self._index: dict[tuple, set[str]] = {}  # (tenant, fp, B, hash) -> producers
        self._bytes = 0
        self._evicted = 0

    def stats(self) -> dict:
        s = super().stats()
        with self._lock:
            s.update(pages=len(self._pages), bytes=self._bytes, max_bytes=self.max_bytes, evicted=self._evicted)
        return s

    def close(self) -> None:
        with self._lock:
            self._pages.clear()
            self._index.clear()
            self._bytes = 0

    def _put(self, tenant: str, pages: KVPages, hashes: list[bytes]) -> int:
        fmt = pages.format
        B = fmt.block_size
        new = []
        added = 0
        for i in reversed(range(len(hashes))):  # back to front: page 0 ends up most recently used
            key = (tenant, pages.fingerprint, pages.producer, B, hashes[i])
            with self._lock:
                if key in self._pages:
                    self._pages.move_to_end(key)
                    continue
            kv = pages.kv[i].detach().to("cpu", copy=True).contiguous()
            e = {l: pages.e[i, j].detach().to("cpu", copy=True).contiguous() for j, l in enumerate(fmt.e_layers)}
            nbytes = kv.nbytes + sum(t.nbytes for t in e.values())
            if nbytes > self.max_bytes:
                continue
            with self._lock:
                if key in self._pages:  # a concurrent put won
                    continue
                self._pages[key] = _Page(key, kv, e, nbytes)
                self._index.setdefault((tenant, pages.fingerprint, B, hashes[i]), set()).add(pages.producer)
                self._bytes += nbytes
                added += nbytes
                new.append(key)
                self._evict()
        with self._lock:
            stored = sum(1 for k in new if k in self._pages)
        self._count(bytes_in=added)
        return stored

    def _evict(self) -> None:
        while self._bytes > self.max_bytes and self._pages:
            (tenant, fp, producer, B, h), page = self._pages.popitem(last=False)
            self._bytes -= page.nbytes
            self._evicted += 1
            producers = self._index.get((tenant, fp, B, h))
            if producers is not None:
                producers.discard(producer)
                if not producers:
                    del self._index[(tenant, fp, B, h)]

    def _lookup(self, tenant: str, fingerprint: str, hashes: list[bytes], block_size: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        with self._lock:
            alive = set(self._index.get((tenant, fingerprint, block_size, hashes[0]), ()))
            for i, h in enumerate(hashes):
                alive &= self._index.get((tenant, fingerprint, block_size, h), set())
                if not alive:
                    break
                for p in alive:
                    counts[p] = i + 1
        return counts

    def _locate(
        self,
        tenant: str,
        fingerprint: str,
        producer: str,
        hashes: list[bytes],
        fmt: PageFormat,
        e_layers: Sequence[int],
    ) -> list:
        out = []
        want_kv = fmt.kv_shape
        with self._lock:
            for h in hashes:
                page = self._pages.get((tenant, fingerprint, producer, fmt.block_size, h))
                if page is None or tuple(page.kv.shape) != want_kv or any(l not in page.e for l in e_layers):
                    break
                out.append(page)
            for h in reversed(hashes[: len(out)]):  # touch back to front
                self._pages.move_to_end((tenant, fingerprint, producer, fmt.block_size, h))
        return out

    def _read(self, handles: list, wants: list[tuple[str, int]]) -> dict[tuple[str, int], list]:
        return {(kind, l): [p.kv[l] if kind == "k" else p.e.get(l) for p in handles] for kind, l in wants}

    def _drop(self, handle, reason: str, corrupt: bool = False, kind: str = "") -> None:
        self._count(**{"corrupt_dropped" if corrupt else "partial_dropped": 1})
        with self._lock:
            if self._pages.get(handle.key) is not handle:
                return
            del self._pages[handle.key]
            self._bytes -= handle.nbytes
            tenant, fp, producer, B, h = handle.key
            producers = self._index.get((tenant, fp, B, h), set())
            producers.discard(producer)
            if not producers:
                self._index.pop((tenant, fp, B, h), None)
        self._rejected(kind or ("malformed" if corrupt else "incomplete"), h.hex(), reason)
