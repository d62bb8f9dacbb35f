"""A request's whole route decision, in one place and free of engines and Triton.

    d = router.decide(receiver, tenant, scope, tokens, queued)   # may wait for an in-flight prefill
    donor = router.pages(d, tokens, entry)       # KVPages, a page reference, or None (-> full prefill)
    ... the engine runs; if it refuses the donor pages: router.donor_refused(d), run again without
    router.prefill_done(d, info, out.pages, tokens, entry)       # remember, publish
    router.finish(d)                                              # always, at the end of the request

It owns: coalescing on in-flight prefills (a request whose context another request is prefilling
waits for its pages instead of computing them again), the store lookup and plan choice
(routes.route), page-reference repeats (the engine still holds a hybrid KV it computed), what to
publish, and every fallback to a correct full prefill (store down, pages gone, donor refused). The
orchestrator runs engines and forwards outputs; it decides nothing about routes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from kvrelay.errors import KvRelayError
from kvrelay.model.engine_api import PrefillInfo
from kvrelay.model.kv_format import KVPages, block_hashes
from kvrelay.model.plan import RecomputePlan
from kvrelay.serving import routes
from kvrelay.serving import deployment as dp
from kvrelay.serving.deployment import ServedModel
from kvrelay.serving.metrics import Metrics
from kvrelay.serving.routes import RouteKind
from kvrelay.serving.selector import Selector
from kvrelay.store.base import PageStore

log = logging.getLogger("kvrelay.router")
COALESCE_ROUNDS = 3  # in-flight prefills a request waits for, one after another, before prefilling itself
COALESCE_WAIT_S = 300.0  # longest wait for one of them


@dataclass(slots=True)
class Decision:
    """One request's route and what the router must do when it ends."""

    route: routes.Route
    receiver: str
    tenant: str
    scope: str  # the engine prefix-cache scope (Orchestrator.cache_scope)
    prefill: object = None  # its registration in InFlightPrefills (a full prefill that publishes)
    publishing: bool = False  # its pages went to the publisher, which ends the registration

    @property
    def plan(self):
        """The recompute plan the engine runs with the donor pages: none for a restore (own pages)."""
        return RecomputePlan.none() if self.route.kind is RouteKind.RESTORE else self.route.plan


class Router:
    def __init__(
        self,
        dep: dp.Deployment,
        ids: dict[str, ServedModel],
        store: PageStore,
        selector: Selector,
        metrics: Metrics,
    ):
        self.dep, self.ids, self.store, self.selector, self.metrics = dep, ids, store, selector, metrics
        # with prefix caching off the engines keep nothing: nothing is "recently computed" either
        self.recent = routes.RecentlyComputed(capacity=65536 if dep.prefix_caching else 0)
        self.inflight = routes.InFlightPrefills()
        self._lock = threading.Lock()  # see-then-register of in-flight prefills is one step
        self.publisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="publish")
        self._pending: set = set()  # publishes not yet done (flush waits for them)

    def decide(self, receiver: str, tenant: str, scope: str, tokens: list[int], queued: int = 0) -> Decision:
        """routes.route, after waiting for in-flight prefills whose pages would serve this context
        (COALESCE_ROUNDS at most). A full prefill that will publish is registered as in flight."""
        me = self.ids[receiver]
        hashes = block_hashes(tokens, me.page_format.block_size) if self.dep.coalesce else []
        waited = False
        for attempt in range(COALESCE_ROUNDS + 1):
            with self._lock:
                other = (
                    self.inflight.covering(tenant, me.fingerprint, hashes, lambda m: self._worth_waiting(m, receiver))
                    if hashes and attempt < COALESCE_ROUNDS
                    else None
                )
                if other is None:
                    route = routes.route(
                        self.store,
                        self.selector,
                        self.ids,
                        receiver,
                        tenant,
                        tokens,
                        self.recent,
                        sharing=self.dep.sharing,
                        queued=queued,
                        slo_s=self.dep.slo_s,
                        scope=scope,
                    )
                    route.export = route.export and self.dep.publish
                    prefill = (
                        self.inflight.begin(receiver, tenant, me.fingerprint, hashes)
                        if hashes and route.kind is RouteKind.FULL and route.export
                        else None
                    )
                    if waited:
                        route.reason += " (after an in-flight prefill)"
                    return Decision(route, receiver, tenant, scope, prefill)
            other.done.wait(COALESCE_WAIT_S)
            waited = True

    def _worth_waiting(self, model: str, receiver: str) -> bool:
        """Its own pages always serve a model; another's only with sharing on and a usable plan."""
        if model == receiver:
            return True
        return (
            self.dep.sharing
            and model in self.ids
            and self.selector.has_plan(model, receiver, self.ids[model].fingerprint, self.ids[receiver].fingerprint)
        )

    def pages(self, d: Decision, tokens: list[int], entry: str = "") -> KVPages | None:
        """The donor pages the route needs (only the layers the plan reuses, E where groups start),
        a page reference when the engine should still hold the hybrid KV, or None. None for a
        reuse or restore turns the route into a full prefill (the pages are gone or the store is down)."""
        route, me = d.route, self.ids[d.receiver]
        if route.kind not in (RouteKind.REUSE, RouteKind.RESTORE):
            return None
        donor = self.ids[route.donor]
        fmt = donor.page_format
        if route.cached:
            return KVPages.reference_to(fmt, route.producer, donor.fingerprint, tokens[: route.blocks * fmt.block_size])
        if route.kind is RouteKind.RESTORE:
            layers, e_layers = None, []
        else:
            layers, e_layers = route.plan.kv_layers_needed(me.num_layers), route.plan.e_layers_needed(me.num_layers)
        try:
            pages = self.store.fetch(
                d.tenant, me.fingerprint, route.producer, tokens, fmt, route.blocks, layers=layers, e_layers=e_layers
            )
        except KvRelayError as e:
            log.warning("fetching pages from %s failed, full prefill: %s", route.producer, e)
            self.metrics.store_error(entry)
            pages = None
        if pages is None or pages.num_pages == 0:
            d.route = routes.Route(
                RouteKind.FULL, "donor pages unavailable", export=False, cause="donor pages unavailable"
            )
            return None
        self.metrics.bytes_moved(entry, "fetch", pages.kv.nbytes + pages.e.nbytes)
        return pages

    def donor_refused(self, d: Decision, why: str) -> None:
        """The engine refused the donor pages (e.g. a stale page): a correct full prefill instead."""
        log.warning("engine refused donor pages, full prefill: %s", why)
        d.route = routes.Route(
            RouteKind.FULL, "engine refused donor pages", export=False, cause="engine refused donor pages"
        )

    def prefill_done(
        self, d: Decision, info: PrefillInfo, exported: KVPages | None, tokens: list[int], entry: str = ""
    ) -> None:
        """What this server now holds (a later repeat is a prefix hit or sends a page reference),
        and the prompt's pages published when the route exports them."""
        B = self.ids[d.receiver].page_format.block_size
        if d.route.export:
            if exported is not None and exported.num_pages:
                self.recent.add(d.receiver, d.scope, exported.hashes)
                d.publishing = True
                f = self.publisher.submit(self._publish, d, exported, entry)
                with self._lock:
                    self._pending.add(f)
                f.add_done_callback(self._done)
        elif d.route.kind in (RouteKind.FULL, RouteKind.PREFIX):
            self.recent.add(d.receiver, d.scope, block_hashes(tokens, B))
        if d.route.kind is RouteKind.REUSE:
            if info.reused_tokens and not info.donor_failed:
                self.recent.add_hybrid(d.receiver, d.scope, d.route, tokens, B)
            else:  # evicted, or the engine fell back: the next repeat sends pages again
                self.recent.forget_hybrid(d.receiver, d.scope, d.route, tokens, B)

    def _publish(self, d: Decision, pages: KVPages, entry: str) -> None:
        try:
            n = self.store.put(d.tenant, pages)
            self.metrics.bytes_moved(
                entry, "publish", (pages.kv.nbytes + pages.e.nbytes) * n // max(pages.num_pages, 1)
            )
        except KvRelayError as e:
            log.warning("publishing pages failed (requests unaffected): %s", e)
            self.metrics.store_error(entry)
        except Exception:
            log.exception("publishing pages failed (requests unaffected)")
        finally:
            self.inflight.end(d.prefill)  # waiters route now: the pages are in the store (or never will be)

    def _done(self, f) -> None:
        with self._lock:
            self._pending.discard(f)

    def flush(self, timeout_s: float = 60.0) -> None:
        """Wait until every publish submitted so far is done (two workers: a later no-op task may
        finish before an earlier put)."""
        with self._lock:
            pending = list(self._pending)
        concurrent.futures.wait(pending, timeout=timeout_s)

    def finish(self, d: Decision) -> None:
        """The request ended (answered, failed or abandoned): waiters on its prefill may go, unless
        the publisher has its pages and ends the registration once they are stored."""
        if not d.publishing:
            self.inflight.end(d.prefill)

    def close(self) -> None:
        self.publisher.shutdown(wait=True)
