"""The page store interface, and what every tier shares: argument checks, assembling pages out of
per-layer reads (`fetch`), and the pipelined loader (`stream`).

A stored page is keyed by (tenant, family fingerprint, producing model, block size, block hash). The
producer is part of the key and `lookup` answers per producer, so a page another model computed can
never pass for the receiver's own: the caller sees "producer X has 12 blocks" and decides (its own
pages = exact restore; anyone else's = an explicit re-prefill with a recompute plan). Tenants and
fingerprints are key prefixes: nothing crosses them. Only a model's own exact KV is stored
(`derived_from == ""`, every layer): hybrid KV never enters a store.

A tier implements five primitives over opaque per-page handles:
    _put(tenant, pages, hashes) -> newly stored
    _lookup(tenant, fingerprint, hashes, block_size) -> {producer: leading blocks}
    _locate(tenant, fingerprint, producer, hashes, fmt, e_layers) -> handles of the leading complete pages
    _read(handles, wants) -> {(kind, layer): [tensor | None per page]}   kind "k" (KV) or "e" (E)
    _drop(handle, reason, corrupt, kind)   a page found corrupt or incomplete: delete it (recomputed,
                                     re-put), and report it once through _rejected
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageFormat, block_hashes

log = logging.getLogger("kvrelay.store")


class StoreUnavailable(KvRelayError):
    """The store is down, timed out, or refused the operation: the caller falls back to a full prefill."""


STAT_KEYS = (
    "lookups",
    "lookup_hits",
    "fetches",
    "streams",
    "hits",
    "misses",
    "pages_put",
    "bytes_in",
    "bytes_out",
    "corrupt_dropped",
    "partial_dropped",
    "errors",
)


class PageStore(ABC):
    """KV pages (KV of every layer + E) shared between engines, keyed by tenant, fingerprint, producer
    and block hash chain. Thread-safe. Every method may raise StoreUnavailable (catch it, prefill in
    full); KvRelayError for bad arguments."""

    #: how long a streamed donor's e_layer / kv_layer wait for their layer before StoreUnavailable
    stream_wait_s: float = 5.0

    def __init__(self):
        self._stats_lock = threading.Lock()
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self.rejected: dict[str, int] = {}  # pages dropped, by kind (see PageCorrupt.kind, "incomplete")
        self.on_reject = None  # callback(kind) for metrics, set by the server

    # --- the interface ----------------------------------------------------------------------------

    def put(self, tenant: str, pages: KVPages) -> int:
        """Store every page (KV of all layers + E). Returns the number of pages newly stored; pages
        already there are left as they are (first writer wins, so it is idempotent)."""
        _check_tenant(tenant)
        if not isinstance(pages, KVPages):
            raise KvRelayError(f"put takes KVPages, not {type(pages).__name__}")
        if pages.derived_from:
            raise KvRelayError(
                f"pages from {pages.producer!r} are hybrid KV derived from {pages.derived_from!r}; "
                "only a model's own exact KV may be stored"
            )
        if pages.layers is not None:
            raise KvRelayError(
                f"pages from {pages.producer!r} carry only layers {list(pages.layers)}; "
                "a store keeps whole pages (every layer)"
            )
        if not pages.producer or not pages.fingerprint:
            raise KvRelayError("pages need a producer and a fingerprint to be stored")
        hashes = block_hashes(pages.tokens, pages.format.block_size)
        if pages.hashes != hashes:
            raise KvRelayError(
                f"pages from {pages.producer!r} carry block hashes that are not the plain chain "
                "of their tokens (salted = hybrid KV?); refusing to store them"
            )
        if not hashes:
            return 0
        n = self._put(tenant, pages, hashes)
        self._count(pages_put=n)
        return n

    def lookup(self, tenant: str, fingerprint: str, tokens: list[int], block_size: int) -> dict[str, int]:
        """producer model_id -> number of LEADING full blocks of `tokens` that producer has stored
        (producers with 0 are omitted)."""
        _check_tenant(tenant)
        if not isinstance(block_size, int) or block_size < 1:
            raise KvRelayError(f"block_size must be a positive integer, got {block_size!r}")
        hashes = block_hashes(list(tokens), block_size)
        found = (
            {p: n for p, n in self._lookup(tenant, fingerprint, hashes, block_size).items() if n > 0} if hashes else {}
        )
        self._count(lookups=1, lookup_hits=int(bool(found)))
        return found

    def fetch(
        self,
        tenant: str,
        fingerprint: str,
        producer: str,
        tokens: list[int],
        fmt: PageFormat,
        num_blocks: int,
        layers: Sequence[int] | None = None,
        e_layers: Sequence[int] | None = None,
    ) -> KVPages:
        """The first `num_blocks` pages of `tokens` as `producer` stored them: the KV of `layers` only
        (None = all) and the E of `e_layers` only (None = fmt.e_layers; the returned format's e_layers
        are these). A missing, incomplete or corrupt page (corrupt and incomplete ones are deleted) ends
        the result early: it is the valid leading part, possibly zero blocks (an empty KVPages, which an
        engine treats as "nothing shared": full prefill). Tensors come back on the CPU in fmt.dtype."""
        req = _Request.make(tenant, fingerprint, producer, tokens, fmt, num_blocks, layers, e_layers)
        handles = self._locate(tenant, fingerprint, producer, req.hashes, fmt, req.e_order)
        got = self._read(handles, req.wants) if handles else {}
        n = len(handles)
        for want, vals in got.items():
            for i in range(n):
                vals[i] = self._checked(handles[i], want, vals[i], req.fmt)
                if vals[i] is None:
                    n = i
                    break
        kv = torch.empty((n, len(req.kv_layers), *req.fmt.kv_shape[1:]), dtype=req.fmt.torch_dtype)
        e = torch.empty((n, *req.fmt.e_shape), dtype=req.fmt.torch_dtype)
        if n:
            for (kind, layer), vals in got.items():
                dst = kv[:, req.kv_layers.index(layer)] if kind == "k" else e[:, req.fmt.e_layers.index(layer)]
                dst.copy_(torch.stack(vals[:n]))
        self._count(fetches=1, hits=n, misses=req.num_blocks - n, bytes_out=kv.nbytes + e.nbytes)
        return req.pages(n, kv, e)

    def stream(
        self,
        tenant: str,
        fingerprint: str,
        producer: str,
        tokens: list[int],
        fmt: PageFormat,
        num_blocks: int,
        layers: Sequence[int] | None = None,
        e_layers: Sequence[int] | None = None,
    ) -> "StreamedPages":
        """Like fetch, pipelined (DroidSpeak section 4.3): the number of pages is settled at once (the
        leading complete pages), then a background thread loads the E layers first, in the order
        asked, then the KV layers in increasing order. The returned donor's e_layer / kv_layer block
        until their layer has arrived; a page found corrupt or missing at that point, or a store that
        stops answering, raises StoreUnavailable there (the pages cannot shrink once recompute started)."""
        req = _Request.make(tenant, fingerprint, producer, tokens, fmt, num_blocks, layers, e_layers)
        handles = self._locate(tenant, fingerprint, producer, req.hashes, fmt, req.e_order)
        self._count(streams=1, hits=len(handles), misses=req.num_blocks - len(handles))
        return StreamedPages(self, req, handles)

    def stats(self) -> dict:
        """Counters for metrics: lookups, lookup_hits, fetches, streams, hits / misses (pages asked for
        and delivered / not), pages_put, bytes_in (stored), bytes_out (delivered), corrupt_dropped,
        partial_dropped, errors; plus each tier's own (pages, bytes, ...)."""
        with self._stats_lock:
            return dict(self._stats)

    def close(self) -> None:
        """Release connections / memory. The store is not used afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- for the tiers ----------------------------------------------------------------------------

    @abstractmethod
    def _put(self, tenant: str, pages: KVPages, hashes: list[bytes]) -> int: ...

    @abstractmethod
    def _lookup(self, tenant: str, fingerprint: str, hashes: list[bytes], block_size: int) -> dict[str, int]: ...

    @abstractmethod
    def _locate(
        self,
        tenant: str,
        fingerprint: str,
        producer: str,
        hashes: list[bytes],
        fmt: PageFormat,
        e_layers: Sequence[int],
    ) -> list: ...

    @abstractmethod
    def _read(self, handles: list, wants: list[tuple[str, int]]) -> dict[tuple[str, int], list]: ...

    @abstractmethod
    def _drop(self, handle, reason: str, corrupt: bool = False, kind: str = "") -> None:
        """Delete a page found corrupt (corrupt=True) or incomplete; counts it in the stats and, the
        first time for this page, reports it through _rejected."""

    def _rejected(self, kind: str, page: str, reason: str) -> None:
        log.warning("page store: dropped page %s (%s): %s; the request recomputes it", page, kind, reason)
        with self._stats_lock:
            self.rejected[kind] = self.rejected.get(kind, 0) + 1
        if self.on_reject is not None:
            try:
                self.on_reject(kind)
            except Exception:  # metrics must never fail a fetch
                log.exception("on_reject callback failed")

    def _count(self, **deltas) -> None:
        with self._stats_lock:
            for k, v in deltas.items():
                self._stats[k] = self._stats.get(k, 0) + v

    def _checked(self, handle, want: tuple[str, int], t, fmt: PageFormat):
        """One page's tensor of one layer in fmt's dtype, or None (dropping the page) if it is absent
        or has the wrong shape."""
        if t is None:
            return None
        shape = fmt.kv_shape[1:] if want[0] == "k" else fmt.e_shape[1:]
        if tuple(t.shape) != shape:
            self._drop(handle, f"{want[0]}{want[1]} has shape {tuple(t.shape)}, expected {shape}", corrupt=True)
            return None
        return t.to(fmt.torch_dtype)


def _check_tenant(tenant) -> None:
    if not isinstance(tenant, str) or not tenant:
        raise KvRelayError(f"tenant must be a non-empty string, got {tenant!r}")


class _Request:
    """A validated fetch/stream request."""

    __slots__ = (
        "producer",
        "fingerprint",
        "tokens",
        "fmt",
        "num_blocks",
        "hashes",
        "kv_layers",
        "all_layers",
        "e_order",
    )

    @classmethod
    def make(cls, tenant, fingerprint, producer, tokens, fmt, num_blocks, layers, e_layers) -> "_Request":
        _check_tenant(tenant)
        if not isinstance(fmt, PageFormat):
            raise KvRelayError(f"fmt must be a PageFormat, not {type(fmt).__name__}")
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise KvRelayError(f"num_blocks must be an integer >= 0, got {num_blocks!r}")
        L, B = fmt.num_layers, fmt.block_size
        tokens = list(tokens)
        if num_blocks * B > len(tokens):
            raise KvRelayError(f"num_blocks {num_blocks} x {B} tokens is more than the {len(tokens)} tokens given")
        r = cls()
        r.producer, r.fingerprint, r.num_blocks = producer, fingerprint, num_blocks
        r.tokens = tokens[: num_blocks * B]
        r.hashes = block_hashes(r.tokens, B)
        r.all_layers = layers is None
        r.kv_layers = list(range(L)) if layers is None else sorted(set(int(l) for l in layers))
        if any(not 0 <= l < L for l in r.kv_layers):
            raise KvRelayError(f"layers {list(layers)} out of range for a {L}-layer format")
        r.e_order = list(fmt.e_layers) if e_layers is None else list(dict.fromkeys(int(l) for l in e_layers))
        r.fmt = PageFormat(**{**fmt.to_dict(), "e_layers": tuple(sorted(r.e_order))})  # checks the range
        return r

    @property
    def wants(self) -> list[tuple[str, int]]:
        return [("e", l) for l in self.e_order] + [("k", l) for l in self.kv_layers]

    def pages(self, n: int, kv: torch.Tensor, e: torch.Tensor) -> KVPages:
        B = self.fmt.block_size
        return KVPages(
            self.fmt,
            self.producer,
            self.fingerprint,
            self.tokens[: n * B],
            kv,
            e,
            self.hashes[:n],
            "",
            None if self.all_layers else tuple(self.kv_layers),
        )


class StreamedPages:
    """A donor (kvrelay.model.engine_api.DonorKV) whose layers arrive in the background: E layers first, in
    the order asked, then KV layers in increasing order. format / producer / fingerprint / tokens /
    layers are known at once; e_layer(l) and kv_layer(l) wait for layer l (StoreUnavailable after
    store.stream_wait_s, or at once if loading failed)."""

    derived_from = ""

    def __init__(self, store: PageStore, req: _Request, handles: list):
        self.format, self.producer, self.fingerprint = req.fmt, req.producer, req.fingerprint
        n = len(handles)
        self.tokens = req.tokens[: n * req.fmt.block_size]
        self.hashes = req.hashes[:n]
        self.layers = None if req.all_layers else tuple(req.kv_layers)
        self._store, self._req, self._handles, self._n = store, req, handles, n
        # one contiguous tensor per layer, filled by the loader: [n, 2, H, B, D] / [n, B, hidden]
        self._kv = [torch.empty((0, *req.fmt.kv_shape[1:]), dtype=req.fmt.torch_dtype)] * len(req.kv_layers)
        self._e = [torch.empty((0, *req.fmt.e_shape[1:]), dtype=req.fmt.torch_dtype)] * len(req.fmt.e_layers)
        self._ready = {w: threading.Event() for w in req.wants}
        self._error: BaseException | None = None
        self.started = time.perf_counter()
        self.layer_times: dict[tuple[str, int], float] = {}  # seconds after start each layer was ready
        if n == 0:
            for ev in self._ready.values():
                ev.set()
            self._thread = None
        else:
            self._thread = threading.Thread(target=self._load, name=f"kvrelay-stream-{req.producer}", daemon=True)
            self._thread.start()

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_pages(self) -> int:
        return self._n

    @property
    def is_reference(self) -> bool:
        return False  # streamed pages always carry their payload

    def has_layers(self, layers) -> bool:
        return self.layers is None or set(layers) <= set(self.layers)

    def e_layer(self, layer: int) -> torch.Tensor:
        """Hidden states entering `layer` for every page token: [num_tokens, hidden]."""
        if layer not in self.format.e_layers:
            raise KvRelayError(
                f"streamed pages from {self.producer!r} carry E for layers "
                f"{list(self.format.e_layers)}, not for layer {layer}"
            )
        self._wait(("e", layer))
        return self._e[self.format.e_layers.index(layer)].reshape(-1, self.format.hidden_size)

    def kv_layer(self, layer: int) -> torch.Tensor:
        """K and V of one layer for every page: [n, 2, H, B, D]."""
        if layer not in self._req.kv_layers:
            raise KvRelayError(
                f"streamed pages from {self.producer!r} carry KV for layers {self._req.kv_layers}, not {layer}"
            )
        self._wait(("k", layer))
        return self._kv[self._req.kv_layers.index(layer)]

    def wait(self, timeout: float | None = None) -> KVPages:
        """Every layer loaded: the same KVPages fetch() would have returned."""
        deadline = time.monotonic() + (self._store.stream_wait_s if timeout is None else timeout)
        for w in self._ready:
            self._wait(w, max(0.0, deadline - time.monotonic()))
        fmt, n = self.format, self._n
        kv = torch.stack(self._kv, dim=1) if self._kv else torch.empty((n, 0, *fmt.kv_shape[1:]), dtype=fmt.torch_dtype)
        e = torch.stack(self._e, dim=1) if self._e else torch.empty((n, *fmt.e_shape), dtype=fmt.torch_dtype)
        return self._req.pages(n, kv, e)

    def _wait(self, want, timeout: float | None = None) -> None:
        ev = self._ready[want]
        if not ev.wait(self._store.stream_wait_s if timeout is None else timeout):
            raise StoreUnavailable(
                f"page store: layer {want[0]}{want[1]} of {self.producer!r}'s pages did not "
                f"arrive within {self._store.stream_wait_s:.1f} s"
            )
        if self._error is not None and want not in self.layer_times:
            raise StoreUnavailable(f"page store: streaming {self.producer!r}'s pages failed: {self._error}")

    def _load(self) -> None:
        store, req, n = self._store, self._req, self._n
        try:
            for want in req.wants:
                vals = store._read(self._handles, [want])[want]
                kind, layer = want
                for i in range(n):
                    vals[i] = store._checked(self._handles[i], want, vals[i], req.fmt)
                    if vals[i] is None:
                        raise StoreUnavailable(
                            f"page {i} lost its {'KV' if kind == 'k' else 'E'} of layer {layer} "
                            "(corrupt or evicted) after the stream started"
                        )
                t = torch.stack(vals)
                if kind == "k":
                    self._kv[req.kv_layers.index(layer)] = t
                else:
                    self._e[req.fmt.e_layers.index(layer)] = t
                store._count(bytes_out=t.nbytes)
                self.layer_times[want] = time.perf_counter() - self.started
                self._ready[want].set()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting engine thread
            self._error = e
            if not isinstance(e, StoreUnavailable):
                store._count(errors=1)
        finally:
            for ev in self._ready.values():
                ev.set()
