"""KV page store: pages (KV of every layer + E) shared between engines, behind one interface.

    open_store("memory")                 in-process, LRU under a byte cap (default 1 GiB)
    open_store("memory:2GiB")
    open_store("redis://host:6379/0")    shared by every server that can reach it
    open_store("redis://host:6379/0?timeout=0.5&ttl=3600&prefix=kvrelay")

See kvrelay.store.base for the interface and its guarantees, redis_store for the Redis layout.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from kvrelay.errors import KvRelayError

from .base import PageStore, StoreUnavailable, StreamedPages
from .memory import MemoryStore
from .redis_store import RedisStore

__all__ = ["PageStore", "StoreUnavailable", "StreamedPages", "MemoryStore", "RedisStore", "open_store",
           "parse_bytes", "DEFAULT_MEMORY_BYTES"]

DEFAULT_MEMORY_BYTES = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512MB', '1.5g', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise KvRelayError(f"bad size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise KvRelayError(f"size {text!r} must be at least 1 byte")
    return n


def open_store(spec: str) -> PageStore:
    """A store from a spec: "memory", "memory:<size>", "redis://host:port/db[?timeout=S&ttl=S&prefix=P]"
    (or rediss://). KvRelayError on a bad spec. A Redis store connects lazily (first call)."""
    if not isinstance(spec, str) or not spec.strip():
        raise KvRelayError("empty page store spec: use memory, memory:<size> or redis://host:port/db")
    spec = spec.strip()
    if spec == "memory" or spec.startswith("memory:"):
        return MemoryStore(parse_bytes(spec[len("memory:"):]) if ":" in spec else DEFAULT_MEMORY_BYTES)
    parts = urlsplit(spec)
    if parts.scheme in ("redis", "rediss"):
        if not parts.hostname:
            raise KvRelayError(f"page store spec {spec!r} names no host: redis://host:port/db")
        try:
            parts.port
        except ValueError:
            raise KvRelayError(f"page store spec {spec!r} has a bad port") from None
        if parts.path not in ("", "/") and not parts.path.lstrip("/").isdigit():
            raise KvRelayError(f"page store spec {spec!r}: the path must be a database number, e.g. /0")
        opts, kwargs = dict(parse_qsl(parts.query, keep_blank_values=True)), {}
        try:
            if "timeout" in opts:
                kwargs["timeout_s"] = float(opts.pop("timeout"))
            if "ttl" in opts:
                kwargs["ttl_s"] = int(opts.pop("ttl"))
            if "prefix" in opts:
                kwargs["key_prefix"] = opts.pop("prefix")
        except ValueError as e:
            raise KvRelayError(f"page store spec {spec!r}: {e}") from None
        if opts:
            raise KvRelayError(f"page store spec {spec!r}: unknown options {sorted(opts)} (timeout, ttl, prefix)")
        return RedisStore(urlunsplit(parts._replace(query="")), **kwargs)
    raise KvRelayError(f"unknown page store {spec!r}: use memory, memory:<size> or redis://host:port/db")
