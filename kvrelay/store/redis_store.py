"""The shared tier: pages in Redis, so engines on several machines (several Triton servers) reuse them.

Layout (every name component percent-escaped, so tenant "a:b" cannot pose as tenant "a"):

    {prefix}:{tenant}:{fp}:i:{B}:{hash}                  SET of producers holding this block (for lookup)
    {prefix}:{tenant}:{fp}:p:{producer}:{B}:{hash}       the page's marker: JSON {g: write id, geometry, e layers}
    {marker}:{g}:k{l}   /   {marker}:{g}:e{l}            one value per (page, KV layer) and per (page, E layer):
                                                         kv_format.pack_tensor bytes (header + MAC over
                                                         this value key and the payload)

A writer stores the values under a fresh write id first, each expiring after PENDING_TTL_S, then sets
the marker with SET NX (first complete writer wins; a loser deletes its values), then gives its
values the marker's lifetime (ttl_s, or none) and adds itself to the block's index. So a page is
visible only once every layer is written, and a writer that dies or is refused half way (maxmemory
with noeviction) leaves nothing behind for longer than PENDING_TTL_S: it deletes what it wrote at
once when it can. Every key has a TTL or a marker that owns it (`kvrelay store stats` counts
orphans). A value that is missing (evicted by a maxmemory policy, expired) or fails its
checksum makes the page count as missing: it is deleted and the caller recomputes.

One value per layer lets fetch move only the layers a recompute plan needs, and stream load them
layer by layer (one MGET per layer). Every call runs under socket timeouts; any failure is raised as
StoreUnavailable, and for `backoff_s` afterwards calls fail at once instead of waiting out the timeout
again. No retries: the caller's fallback (a full prefill) is always correct.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from contextlib import contextmanager

from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageCorrupt, PageFormat, pack_tensor, unpack_tensor

from .base import PageStore, StoreUnavailable
from .redis_names import esc as _esc
from .redis_names import redact

_DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('SREM', KEYS[2], ARGV[2])
end
for i = 3, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

PUT_CHUNK_PAGES = 16  # pages per pipeline round trip when writing
PENDING_TTL_S = 300  # a value not yet committed by its page's marker expires after this


class _Handle:
    __slots__ = ("marker", "raw", "meta", "index", "producer", "dropped")

    def __init__(self, marker, raw, meta, index, producer):
        self.marker, self.raw, self.meta, self.index, self.producer = marker, raw, meta, index, producer
        self.dropped = False

    def value_keys(self) -> list[str]:
        g = self.meta["g"]
        return [f"{self.marker}:{g}:k{l}" for l in range(self.meta["L"])] + [
            f"{self.marker}:{g}:e{l}" for l in self.meta["e"]
        ]


class RedisStore(PageStore):
    def __init__(
        self,
        url: str,
        timeout_s: float = 0.5,
        ttl_s: int | None = None,
        key_prefix: str = "kvrelay",
        backoff_s: float = 1.0,
        stream_wait_s: float | None = None,
        secret: bytes = b"",
    ):
        """url: redis://[:password@]host:port/db (or rediss://). timeout_s bounds every connect and
        every socket read/write; ttl_s (None = keep until deleted or evicted) applies to every key
        written; backoff_s: after a connection failure or timeout, calls fail at once for this long.
        stream_wait_s: how long a streamed donor waits for one layer (default max(5, 20 x timeout_s)).
        Nothing is contacted until the first call: a store that is down does not stop a server from starting.
        secret: the key of every page's MAC (b"": unkeyed, which still binds each value to its key); every
        server sharing the store needs the same one (docs/serving.md, "Page integrity")."""
        super().__init__()
        self.secret = bytes(secret)
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError:
            raise KvRelayError("the Redis page store needs the `redis` client: pip install 'kvrelay[serve]'") from None
        if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
            raise KvRelayError(f"timeout_s must be > 0, got {timeout_s!r}")
        if ttl_s is not None and (not isinstance(ttl_s, int) or ttl_s < 1):
            raise KvRelayError(f"ttl_s must be a positive integer (seconds) or None, got {ttl_s!r}")
        if not key_prefix or not isinstance(key_prefix, str):
            raise KvRelayError("key_prefix must be a non-empty string")
        self.url, self.timeout_s, self.ttl_s, self.key_prefix, self.backoff_s = (
            redact(url),
            float(timeout_s),
            ttl_s,
            key_prefix,
            float(backoff_s),
        )
        self.stream_wait_s = float(stream_wait_s) if stream_wait_s is not None else max(5.0, 20 * self.timeout_s)
        self._errors = redis.exceptions
        try:
            self._r = redis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
                health_check_interval=0,
            )
        except (ValueError, redis.exceptions.RedisError) as e:
            raise KvRelayError(f"bad Redis URL {self.url!r}: {e}") from None
        self._drop_script = self._r.register_script(_DROP)
        self._down_until = 0.0

    # --- plumbing -------------------------------------------------------------------------------

    @contextmanager
    def _guard(self, what: str):
        if time.monotonic() < self._down_until:
            raise StoreUnavailable(
                f"page store {self.url} is unavailable (failed recently; retrying after {self.backoff_s:g} s)"
            )
        E = self._errors
        try:
            yield
        except (E.ConnectionError, E.TimeoutError, OSError) as e:  # down, unreachable, slow
            self._down_until = time.monotonic() + self.backoff_s
            self._count(errors=1)
            raise StoreUnavailable(f"page store {self.url}: {what} failed: {type(e).__name__}: {e}") from None
        except E.RedisError as e:  # refused: OOM, READONLY, NOAUTH, ...
            self._count(errors=1)
            raise StoreUnavailable(f"page store {self.url} refused {what}: {e}") from None

    def _base(self, tenant: str, fingerprint: str) -> str:
        return f"{self.key_prefix}:{_esc(tenant)}:{_esc(fingerprint)}"

    @staticmethod
    def _index(base: str, B: int, h: bytes) -> str:
        return f"{base}:i:{B}:{h.hex()}"

    @staticmethod
    def _marker(base: str, producer: str, B: int, h: bytes) -> str:
        return f"{base}:p:{_esc(producer)}:{B}:{h.hex()}"

    def ping(self) -> bool:
        """True if the server answers now."""
        try:
            with self._guard("PING"):
                return bool(self._r.ping())
        except StoreUnavailable:
            return False

    def stats(self) -> dict:
        s = super().stats()
        s.update(url=self.url, available=time.monotonic() >= self._down_until)
        s["pages"] = s["pages_put"]  # pages this client stored (the server-wide count is not cheap to know)
        return s

    def close(self) -> None:
        try:
            self._r.close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass

    # --- the tier primitives --------------------------------------------------------------------

    def _put(self, tenant: str, pages: KVPages, hashes: list[bytes]) -> int:
        fmt, B, ex = pages.format, pages.format.block_size, self.ttl_s
        base = self._base(tenant, pages.fingerprint)
        markers = [self._marker(base, pages.producer, B, h) for h in hashes]
        kv, e = pages.kv.detach().cpu(), pages.e.detach().cpu()
        with self._guard("put"):
            pipe = self._r.pipeline(transaction=False)
            for m in markers:
                pipe.exists(m)
            todo = [i for i, there in enumerate(pipe.execute()) if not there]
        meta = {
            i: {
                "g": uuid.uuid4().hex[:16],
                "L": fmt.num_layers,
                "H": fmt.num_kv_heads,
                "D": fmt.head_dim,
                "hid": fmt.hidden_size,
                "dt": fmt.dtype,
                "e": list(fmt.e_layers),
            }
            for i in todo
        }
        values = {i: _Handle(markers[i], None, meta[i], "", "").value_keys() for i in todo}
        try:
            # Values first, each expiring after PENDING_TTL_S: a writer that dies or is refused half way
            # (maxmemory) leaves nothing that outlives that, and the except below deletes it at once.
            written = self._put_values(values, kv, e, fmt)
            with self._guard("put"):
                pipe = self._r.pipeline(transaction=False)
                for i in todo:
                    pipe.set(markers[i], json.dumps(meta[i]), nx=True, ex=ex)
                won = pipe.execute() if todo else []
                pipe = self._r.pipeline(transaction=False)
                for i, ok in zip(todo, won):
                    for k in values[i]:
                        if not ok:  # a concurrent writer committed first: ours are orphans
                            pipe.delete(k)
                        elif ex:  # committed: the values live as long as their marker
                            pipe.expire(k, ex)
                        else:
                            pipe.persist(k)
                for h in hashes:  # every page, not only new ones: heals an index entry dropped by a race
                    idx = self._index(base, B, h)
                    pipe.sadd(idx, pages.producer)
                    if ex:
                        pipe.expire(idx, ex)
                pipe.execute()
        except StoreUnavailable:
            self._forget(base, B, hashes, pages.producer, markers, values, meta)
            raise
        self._count(bytes_in=written)
        return sum(1 for ok in won if ok)

    def _put_values(self, values: dict[int, list[str]], kv, e, fmt: PageFormat) -> int:
        written, todo = 0, list(values)
        for c in range(0, len(todo), PUT_CHUNK_PAGES):
            with self._guard("put"):
                pipe = self._r.pipeline(transaction=False)
                for i in todo[c : c + PUT_CHUNK_PAGES]:
                    tensors = [kv[i, l] for l in range(fmt.num_layers)] + [e[i, j] for j in range(len(fmt.e_layers))]
                    for key, t in zip(values[i], tensors):
                        blob = pack_tensor(t, key.encode(), self.secret)
                        pipe.set(key, blob, ex=PENDING_TTL_S)
                        written += len(blob)
                pipe.execute()
        return written

    def _forget(
        self,
        base: str,
        B: int,
        hashes: list[bytes],
        producer: str,
        markers: list[str],
        values: dict[int, list[str]],
        meta: dict[int, dict],
    ) -> None:
        """Best effort after a failed put: delete this write's values, and its marker if it was set, so
        that a store at maxmemory is not left holding pages nobody can use."""
        try:
            for i, keys in values.items():
                self._drop_script(
                    keys=[markers[i], self._index(base, B, hashes[i]), *keys], args=[json.dumps(meta[i]), producer]
                )
        except Exception:  # noqa: BLE001 - the store is refusing us: the values expire by themselves
            pass

    def _lookup(self, tenant: str, fingerprint: str, hashes: list[bytes], block_size: int) -> dict[str, int]:
        base = self._base(tenant, fingerprint)
        idx = [self._index(base, block_size, h) for h in hashes]
        with self._guard("lookup"):
            pipe = self._r.pipeline(transaction=False)
            for k in idx:
                pipe.smembers(k)
            members = pipe.execute()
            counts: dict[bytes, int] = {}
            alive = set(members[0])
            for i, m in enumerate(members):
                alive &= m
                if not alive:
                    break
                for p in alive:
                    counts[p] = i + 1
            if not counts:
                return {}
            # The index may outlive pages (expired, dropped): trust only pages whose marker is there.
            pipe = self._r.pipeline(transaction=False)
            asked = [(p, i) for p, n in counts.items() for i in range(n)]
            for p, i in asked:
                pipe.exists(self._marker(base, p.decode(), block_size, hashes[i]))
            there = pipe.execute()
            stale = []
            for (p, i), ok in zip(asked, there):
                if not ok and i < counts[p]:
                    counts[p] = i
                    stale.append((p, i))
            if stale:
                pipe = self._r.pipeline(transaction=False)
                for p, i in stale:
                    pipe.srem(idx[i], p)
                pipe.execute()
        return {p.decode(): n for p, n in counts.items() if n > 0}

    def _locate(
        self,
        tenant: str,
        fingerprint: str,
        producer: str,
        hashes: list[bytes],
        fmt: PageFormat,
        e_layers: Sequence[int],
    ) -> list:
        if not hashes:
            return []
        base, B = self._base(tenant, fingerprint), fmt.block_size
        markers = [self._marker(base, producer, B, h) for h in hashes]
        with self._guard("fetch"):
            raws = self._r.mget(markers)
        out = []
        geometry = (fmt.num_layers, fmt.num_kv_heads, fmt.head_dim, fmt.hidden_size)
        for m, h, raw in zip(markers, hashes, raws):
            if raw is None:
                break
            try:
                meta = json.loads(raw)
                ok = (
                    isinstance(meta["g"], str)
                    and isinstance(meta["L"], int)
                    and all(isinstance(l, int) for l in meta["e"])
                )
                fits = (meta["L"], meta["H"], meta["D"], meta["hid"]) == geometry
            except (ValueError, KeyError, TypeError):
                ok = False
            handle = _Handle(m, raw, meta if ok else {"g": "", "L": 0, "e": []}, self._index(base, B, h), producer)
            if not ok:
                self._drop(handle, "unreadable marker", corrupt=True)
                break
            if not fits or any(l not in meta["e"] for l in e_layers):
                break  # stored by an engine of other geometry / other E layers: not usable, not wrong
            out.append(handle)
        return out

    def _read(self, handles: list, wants: list[tuple[str, int]]) -> dict[tuple[str, int], list]:
        keys = {(kind, l): [f"{h.marker}:{h.meta['g']}:{kind}{l}" for h in handles] for kind, l in wants}
        with self._guard("fetch"):
            pipe = self._r.pipeline(transaction=False)
            for want in wants:
                pipe.mget(keys[want])
            blobs = pipe.execute()
        out = {}
        for want, vals in zip(wants, blobs):
            row = []
            for h, key, blob in zip(handles, keys[want], vals):
                t = None
                if blob is None:
                    self._drop(h, "incomplete page")
                else:
                    try:
                        t = unpack_tensor(blob, key.encode(), self.secret)
                    except PageCorrupt as e:
                        self._drop(h, f"{key}: {e}", corrupt=True, kind=e.kind)
                row.append(t)
            out[want] = row
        return out

    def _drop(self, handle: _Handle, reason: str, corrupt: bool = False, kind: str = "") -> None:
        if handle.dropped:
            return
        handle.dropped = True
        self._count(**{"corrupt_dropped" if corrupt else "partial_dropped": 1})
        self._rejected(kind or ("malformed" if corrupt else "incomplete"), handle.marker, reason)
        with self._guard("drop"):
            self._drop_script(
                keys=[handle.marker, handle.index, *handle.value_keys()], args=[handle.raw, handle.producer]
            )
