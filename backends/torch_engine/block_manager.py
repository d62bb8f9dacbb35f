"""Block allocation with per-model prefix caching (nano-vllm / vLLM v1 style).

Full blocks are registered under their chain hash once computed; a later sequence whose leading blocks
hash the same shares them (ref-counted). Blocks nobody references stay cached in LRU order and are
evicted only when a fresh block is needed.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from kvrelay.errors import KvRelayError


class BlockManager:
    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # never used or evicted: no content
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached content, ref 0, oldest first

    @property
    def num_available(self) -> int:
        return len(self.free) + len(self.lru)

    def match_prefix(self, hashes: list[bytes]) -> list[int]:
        """Take a reference on the longest run of leading blocks already cached."""
        out = []
        for h in hashes:
            b = self.by_hash.get(h)
            if b is None:
                break
            out.append(b)
        for b in out:
            self._acquire(b)
        return out

    def cached_prefix(self, hashes: list[bytes]) -> int:
        """How many leading blocks are cached (no references taken)."""
        n = 0
        while n < len(hashes) and hashes[n] in self.by_hash:
            n += 1
        return n

    def allocate(self, n: int) -> list[int]:
        if n > self.num_available:
            raise KvRelayError(f"KV cache full: need {n} blocks, {self.num_available} available")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.lru.popitem(last=False)  # evict least recently used cached block
                del self.by_hash[self.hash_of[b]]
                self.hash_of[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def register(self, block: int, h: bytes) -> None:
        """Publish a computed full block under its chain hash (first writer wins)."""
        if self.hash_of[block] is None and h not in self.by_hash:
            self.hash_of[block] = h
            self.by_hash[h] = block

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            assert self.ref[b] >= 0, f"block {b} released twice"
            if self.ref[b] == 0:
                if self.hash_of[b] is None:
                    self.free.append(b)
                else:
                    self.lru[b] = None

    def _acquire(self, b: int) -> None:
        if self.ref[b] == 0:
            self.lru.pop(b, None)
        self.ref[b] += 1
