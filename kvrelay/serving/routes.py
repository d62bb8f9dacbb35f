"""Where a request's context KV comes from: the orchestrator's decision, free of Triton.

- "restore": the receiver's own pages, published by another server: exact KV, no recompute;
- "reuse":   another variant's pages + the selector's recompute plan (DroidSpeak re-prefill);
- "full":    prefill from scratch (miss, no profile, sharing off, store down, ...), publishing the
             prompt's pages afterwards when they are new to the store;
- "prefix":  the receiver's own prefix cache in its engine holds the context (this server computed
             it recently): a plain prefix hit, nothing fetched.
A cross-model entry is only ever used through "reuse" with a plan: never as a plain prefix hit.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from enum import Enum
from dataclasses import dataclass

from kvrelay.serving.deployment import ServedModel
from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import block_hashes
from kvrelay.model.plan import RecomputePlan

log = logging.getLogger("kvrelay.serving.routes")


class RouteKind(str, Enum):
    """How a request's prefill is served (the module docstring says when each is chosen). A str, so
    it reads as its value in logs, JSON, metrics labels and the client's kv_route."""

    FULL = "full"
    PREFIX = "prefix"
    RESTORE = "restore"
    REUSE = "reuse"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


@dataclass(slots=True)
class Route:
    kind: RouteKind
    reason: str
    donor: str = ""  # donor model name
    producer: str = ""  # donor model_id (store key)
    blocks: int = 0  # leading context blocks the donor's pages cover
    plan: RecomputePlan | None = None
    export: bool = False  # publish this prompt's pages after a full prefill
    cached: bool = False  # reuse whose hybrid KV the receiver's engine should still hold
    cause: str = ""  # a full prefill's cause as a short fixed label (metrics); `reason` is for people


class RecentlyComputed:
    """Prompts this server's engines computed themselves (their prefix caches likely still hold them):
    restoring those from the store would only move bytes the engine already has. Also the reuses
    they ran (receiver, donor, plan, context): a repeat sends a page reference, not the pages."""

    def __init__(self, capacity: int = 65536):
        self._seen: OrderedDict[tuple, None] = OrderedDict()
        self.capacity = capacity
        self._lock = threading.Lock()  # the orchestrator serves requests on many threads

    def add(self, receiver: str, tenant: str, hashes: list[bytes]) -> None:
        """Every block of a computed chain: any prefix of it is then known (a shared context)."""
        for h in hashes:
            self._put((receiver, tenant, h))

    def add_hybrid(self, receiver: str, tenant: str, r: Route, tokens: list[int], block_size: int) -> None:
        self._put(_hybrid_key(receiver, tenant, r, tokens, block_size))

    def forget_hybrid(self, receiver: str, tenant: str, r: Route, tokens: list[int], block_size: int) -> None:
        with self._lock:
            self._seen.pop(_hybrid_key(receiver, tenant, r, tokens, block_size), None)

    def _put(self, key: tuple) -> None:
        with self._lock:
            self._seen[key] = None
            self._seen.move_to_end(key)
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def __contains__(self, key: tuple) -> bool:
        with self._lock:
            return key in self._seen


def _hybrid_key(receiver: str, tenant: str, r: Route, tokens: list[int], block_size: int) -> tuple:
    return (
        "hybrid",
        receiver,
        tenant,
        r.producer,
        str(r.plan),
        block_hashes(tokens[: r.blocks * block_size], block_size)[-1],
    )


def route(
    store,
    selector,
    ids: dict[str, ServedModel],
    receiver: str,
    tenant: str,
    tokens: list[int],
    recent: RecentlyComputed,
    *,
    sharing: bool = True,
    queued: int = 0,
    slo_s: float | None = None,
    scope: str | None = None,
) -> Route:
    """`scope`: the request's prefix-cache scope in its engine (Orchestrator.cache_scope; default the
    tenant): what this server computed is only known to requests of the same scope."""
    me = ids[receiver]
    scope = tenant if scope is None else scope
    B = me.page_format.block_size
    full_blocks = len(tokens) // B
    if full_blocks == 0:
        return Route(RouteKind.FULL, "context shorter than one block", cause="context shorter than one block")
    try:
        found = store.lookup(tenant, me.fingerprint, tokens, B)
    except KvRelayError as e:  # StoreUnavailable and friends: serve anyway, from scratch
        log.warning("page store lookup failed, full prefill: %s", e)
        return Route(RouteKind.FULL, f"store unavailable: {e}", cause="store unavailable")
    by_id = {i.model_id: i for i in ids.values() if i.fingerprint == me.fingerprint}
    own = found.get(me.model_id, 0)
    cross = sorted(
        ((n, by_id[p].name, p) for p, n in found.items() if p in by_id and p != me.model_id),
        key=lambda x: (-x[0], x[1]),
    )
    export = own < full_blocks
    key = (receiver, scope, block_hashes(tokens[: own * B], B)[-1] if own else b"")
    if own and (not cross or own >= cross[0][0]):
        if key in recent:
            return Route(RouteKind.PREFIX, "own prefix: engine cache", export=False)
        return Route(RouteKind.RESTORE, "own pages from the store", receiver, me.model_id, own)
    if not sharing or not cross:
        why = "miss" if not cross else "sharing off"
        return Route(RouteKind.FULL, why, export=export, cause=why)
    n, donor, producer = cross[0]
    choice = selector.choose(
        donor,
        receiver,
        ids[donor].fingerprint,
        me.fingerprint,
        context_tokens=n * B,
        queued=queued,
        slo_s=slo_s,
        weights=(ids[donor].weights, me.weights),
    )
    if choice.plan is None:
        return Route(RouteKind.FULL, choice.reason, export=export, cause=choice.cause)
    r = Route(RouteKind.REUSE, choice.reason, donor, producer, n, choice.plan)
    if _hybrid_key(receiver, scope, r, tokens, B) in recent:
        r.cached, r.reason = True, f"{r.reason}; hybrid KV cached in the engine"
    return r


class _Prefill:
    __slots__ = ("model", "done")

    def __init__(self, model: str):
        self.model, self.done = model, threading.Event()


class InFlightPrefills:
    """Full prefills this server is running whose pages it will publish. A request whose context one
    of them covers waits for those pages instead of prefilling the same context again: on a busy
    machine a second prefill of the same context only slows both down. Without this, requests
    that arrive while their context is still being prefilled all miss; the first smol load test
    had 62 misses in 96 requests over 12 contexts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_hash: dict[tuple, list[_Prefill]] = {}
        self._keys: dict[_Prefill, list[tuple]] = {}

    def begin(self, model: str, tenant: str, fingerprint: str, hashes: list[bytes]) -> _Prefill:
        p = _Prefill(model)
        keys = [(tenant, fingerprint, h) for h in hashes]
        with self._lock:
            for k in keys:
                self._by_hash.setdefault(k, []).append(p)
            self._keys[p] = keys
        return p

    def end(self, p: _Prefill | None) -> None:
        """Idempotent: the publisher ends it once the pages are stored, the request's cleanup in
        any case."""
        if p is None:
            return
        with self._lock:
            for k in self._keys.pop(p, ()):
                lst = self._by_hash.get(k, [])
                if p in lst:
                    lst.remove(p)
                if not lst:
                    self._by_hash.pop(k, None)
        p.done.set()

    def covering(self, tenant: str, fingerprint: str, hashes: list[bytes], usable) -> _Prefill | None:
        """The in-flight prefill (of a model for which usable(model) holds) covering the most of the
        leading blocks of `hashes`, if it covers at least half of them."""
        with self._lock:
            for i in range(len(hashes) - 1, len(hashes) // 2 - 1, -1):
                for p in self._by_hash.get((tenant, fingerprint, hashes[i]), ()):
                    if usable(p.model):
                        return p
        return None
