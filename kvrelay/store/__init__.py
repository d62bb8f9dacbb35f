"""KV page store: pages (KV of every layer + E) shared between engines, behind one interface.

    open_store("memory")                 in-process, LRU under a byte cap (default 1 GiB)
    open_store("memory:2GiB")
    open_store("redis://host:6379/0")    shared by every server that can reach it
    open_store("redis://host:6379/0?timeout=0.5&ttl=3600&prefix=kvrelay&key_file=/etc/kvrelay/page-key")

See kvrelay.store.base for the interface and its guarantees, redis_store for the Redis layout.
"""

from __future__ import annotations

import importlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from kvrelay.errors import KvRelayError
from kvrelay.paths import home
from kvrelay.units import parse_bytes

if TYPE_CHECKING:
    from .base import PageStore, StoreUnavailable, StreamedPages
    from .memory import MemoryStore
    from .redis_store import RedisStore

# lazy: the stores hold pages as tensors (torch); `kvrelay --help` reaches this package through
# `kvrelay store stats`, which scans Redis keys and needs none of them.
_STORES = {
    "PageStore": "base",
    "StoreUnavailable": "base",
    "StreamedPages": "base",
    "MemoryStore": "memory",
    "RedisStore": "redis_store",
}


def __getattr__(name: str):
    if name in _STORES:
        return getattr(importlib.import_module(f"{__name__}.{_STORES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PageStore",
    "StoreUnavailable",
    "StreamedPages",
    "MemoryStore",
    "RedisStore",
    "open_store",
    "parse_bytes",
    "DEFAULT_MEMORY_BYTES",
]

DEFAULT_MEMORY_BYTES = 1 << 30


def page_secret(key_file: str | None) -> bytes:
    """The secret every page's MAC is keyed with: the given file, else $KVRELAY_HOME/page-key, made
    (32 random bytes, mode 0600) on first use. Servers sharing one Redis need the same file."""
    path = Path(key_file) if key_file else home() / "page-key"
    if not key_file and not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        except FileExistsError:  # another server made it first
            pass
    try:
        secret = path.read_bytes()
    except OSError as e:
        raise KvRelayError(f"page store key_file {str(path)!r}: {e.strerror}") from None
    if len(secret) < 16:
        raise KvRelayError(f"page store key_file {str(path)!r} holds {len(secret)} bytes; at least 16 are needed")
    return secret


def open_store(spec: str) -> PageStore:
    """A store from a spec: "memory", "memory:<size>", "redis://host:port/db[?timeout=S&ttl=S&prefix=P]"
    (or rediss://). KvRelayError on a bad spec. A Redis store connects lazily (first call)."""
    if not isinstance(spec, str) or not spec.strip():
        raise KvRelayError("empty page store spec: use memory, memory:<size> or redis://host:port/db")
    spec = spec.strip()
    if spec == "memory" or spec.startswith("memory:"):
        from .memory import MemoryStore  # lazy: torch (see _STORES)

        return MemoryStore(parse_bytes(spec[len("memory:") :]) if ":" in spec else DEFAULT_MEMORY_BYTES)
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
        kwargs["secret"] = page_secret(opts.pop("key_file", None))
        if opts:
            raise KvRelayError(
                f"page store spec {spec!r}: unknown options {sorted(opts)} (timeout, ttl, prefix, key_file)"
            )
        from .redis_store import RedisStore  # lazy: torch (see _STORES)

        return RedisStore(urlunsplit(parts._replace(query="")), **kwargs)
    raise KvRelayError(f"unknown page store {spec!r}: use memory, memory:<size> or redis://host:port/db")
