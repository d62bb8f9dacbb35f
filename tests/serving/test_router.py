"""The Router: every route and fallback of one request, against the real memory store and real
pages, without engines (the engine's side, PrefillInfo and exported pages, is what it would report)."""

import threading
import time

import pytest

from kvrelay.serving import deployment as dp
from kvrelay.model.engine_api import PrefillInfo
from kvrelay.errors import KvRelayError
from kvrelay.model.plan import RecomputePlan
from kvrelay.serving.router import Router
from kvrelay.store import MemoryStore
from tests.serving.test_routes import CTX, FMT, IDS, FixedSelector, pages

PLAN = RecomputePlan(((2, 4),))


class PlanSelector(FixedSelector):
    def has_plan(self, sender, receiver, sender_fp, receiver_fp):
        return self.plan is not None


class Counts:
    """The router's metrics calls, counted (the orchestrator passes its Prometheus counters)."""

    def __init__(self):
        self.store_errors, self.moved = 0, []

    def store_error(self, entry):
        self.store_errors += 1

    def bytes_moved(self, entry, direction, n):
        self.moved.append((direction, n))


def make(store=None, plan=PLAN, **dep):
    d = dp.Deployment(family="test", models=[dp.ModelDeployment(n) for n in IDS], **dep)
    return Router(d, IDS, store if store is not None else MemoryStore(64 << 20), PlanSelector(plan), Counts())


def full_prefill_done(r, d, tokens, producer="code"):
    """What the engine reports after a full prefill that exported the prompt's pages; then the request ends."""
    r.prefill_done(d, PrefillInfo(prompt_tokens=len(tokens)), pages(producer, tokens), tokens)
    r.finish(d)
    r.flush()


def test_miss_publishes_then_own_prefix_then_restore_on_another_server():
    r = make()
    d = r.decide("code", "t", "t", CTX + [1, 2])
    assert (d.route.kind, d.route.reason, d.route.export) == ("full", "miss", True) and d.prefill is not None
    assert r.pages(d, CTX + [1, 2]) is None
    full_prefill_done(r, d, CTX + [1, 2])
    assert r.store.lookup("t", "fp", CTX, 4) == {"code@wcode": 6}  # published
    again = r.decide("code", "t", "t", CTX + [3])
    assert (again.route.kind, again.route.reason) == ("prefix", "own prefix: engine cache")
    other_server = make(store=r.store)
    d = other_server.decide("code", "t", "t", CTX + [3])
    got = other_server.pages(d, CTX + [3])
    assert d.route.kind == "restore" and got.num_pages == 6 and got.producer == "code@wcode"


def test_reuse_fetches_only_the_reused_layers_then_a_repeat_sends_a_reference():
    r = make()
    r.store.put("t", pages("base", CTX))
    d = r.decide("code", "t", "t", CTX + [7, 8])
    got = r.pages(d, CTX + [7, 8])
    assert (d.route.kind, d.route.donor, str(d.route.plan)) == ("reuse", "base", "2-4")
    assert got.num_pages == 6 and 2 not in got.layers and 3 not in got.layers and not got.is_reference
    assert r.metrics.moved and r.metrics.moved[0][0] == "fetch"
    r.prefill_done(d, PrefillInfo(prompt_tokens=26, reused_tokens=24, donor="base"), None, CTX + [7, 8])
    r.finish(d)
    again = r.decide("code", "t", "t", CTX + [9])
    ref = r.pages(again, CTX + [9])
    assert again.route.cached and ref.is_reference and ref.num_pages == 6


def test_an_evicted_reference_sends_pages_again():
    r = make()
    r.store.put("t", pages("base", CTX))
    d = r.decide("code", "t", "t", CTX + [7])
    r.pages(d, CTX + [7])
    r.prefill_done(d, PrefillInfo(prompt_tokens=25, reused_tokens=24), None, CTX + [7])
    repeat = r.decide("code", "t", "t", CTX + [8])
    assert repeat.route.cached
    # the engine had evicted the hybrid KV: it fell back to a full prefill and says so
    r.prefill_done(repeat, PrefillInfo(prompt_tokens=25, donor_failed="reference to evicted blocks"), None, CTX + [8])
    third = r.decide("code", "t", "t", CTX + [9])
    assert third.route.kind == "reuse" and not third.route.cached and not r.pages(third, CTX + [9]).is_reference


def test_donor_refused_is_a_full_prefill_that_publishes_nothing():
    r = make()
    r.store.put("t", pages("base", CTX))
    d = r.decide("code", "t", "t", CTX + [7])
    r.pages(d, CTX + [7])
    r.donor_refused(d, "page fingerprint differs")
    assert (d.route.kind, d.route.reason, d.route.export) == ("full", "engine refused donor pages", False)


def test_pages_gone_between_lookup_and_fetch_is_a_full_prefill():
    class Vanishing(MemoryStore):
        def fetch(self, *a, **k):
            return None

    r = make(store=Vanishing(64 << 20))
    r.store.put("t", pages("base", CTX))
    d = r.decide("code", "t", "t", CTX + [7])
    assert r.pages(d, CTX + [7]) is None
    assert (d.route.kind, d.route.reason, d.route.export) == ("full", "donor pages unavailable", False)


def test_store_down_at_lookup_or_fetch_is_a_full_prefill_and_counted():
    class DownAtFetch(MemoryStore):
        def fetch(self, *a, **k):
            raise KvRelayError("connection refused")

    class DownAtLookup(MemoryStore):
        def lookup(self, *a, **k):
            raise KvRelayError("connection refused")

    r = make(store=DownAtFetch(64 << 20))
    r.store.put("t", pages("base", CTX))
    d = r.decide("code", "t", "t", CTX + [7])
    assert r.pages(d, CTX + [7]) is None and d.route.kind == "full" and r.metrics.store_errors == 1
    d = make(store=DownAtLookup(64 << 20)).decide("code", "t", "t", CTX + [7])
    assert d.route.kind == "full" and d.route.reason.startswith("store unavailable") and not d.route.export


def test_sharing_off_and_no_plan_ignore_other_variants_pages():
    for r, why in ((make(sharing=False), "sharing off"), (make(plan=None), "no profile for base->code")):
        r.store.put("t", pages("base", CTX))
        d = r.decide("code", "t", "t", CTX + [7])
        assert (d.route.kind, d.route.reason) == ("full", why) and r.pages(d, CTX + [7]) is None


def test_a_read_only_replica_publishes_nothing():
    r = make(publish=False)
    d = r.decide("code", "t", "t", CTX + [1])
    assert d.route.kind == "full" and not d.route.export and d.prefill is None


def test_a_request_waits_for_the_in_flight_prefill_of_its_context_then_reuses_it():
    r = make()
    first = r.decide("base", "t", "t", CTX + [1, 2])
    assert first.prefill is not None
    got = []
    waiter = threading.Thread(target=lambda: got.append(r.decide("code", "t", "t", CTX + [5])))
    waiter.start()
    time.sleep(0.3)
    assert not got  # still waiting for base's pages
    full_prefill_done(r, first, CTX + [1, 2], producer="base")
    waiter.join(10)
    d = got[0]
    assert (d.route.kind, d.route.donor) == ("reuse", "base") and d.route.reason.endswith(
        "(after an in-flight prefill)"
    )


def test_no_wait_for_a_model_whose_pages_would_not_serve_or_for_another_tenant():
    r = make(plan=None)  # base's pages are useless to code without a plan
    r.decide("base", "t", "t", CTX + [1, 2])
    d = r.decide("code", "t", "t", CTX + [5])
    assert (d.route.kind, d.route.reason) == ("full", "miss")
    r = make()
    r.decide("base", "t", "t", CTX + [1, 2])
    assert r.decide("code", "other", "other", CTX + [5]).route.reason == "miss"


def test_a_failed_request_releases_its_waiters():
    r = make()
    first = r.decide("base", "t", "t", CTX + [1, 2])
    r.finish(first)  # failed before its prefill: nothing to publish
    d = r.decide("code", "t", "t", CTX + [5])
    assert (d.route.kind, d.route.reason) == ("full", "miss")


@pytest.fixture(autouse=True)
def _block_size():
    assert FMT.block_size == 4 and len(CTX) == 24


def test_flush_waits_for_a_slow_publish():
    """Two publisher workers: a no-op submitted after a put may finish first, so tests and callers
    that need the pages stored wait with flush() (a full-suite run saw an empty store otherwise)."""

    class SlowPut(MemoryStore):
        def put(self, tenant, pages):
            time.sleep(0.3)
            return super().put(tenant, pages)

    r = make(store=SlowPut(64 << 20))
    d = r.decide("code", "t", "t", CTX + [1])
    r.prefill_done(d, PrefillInfo(prompt_tokens=25), pages("code", CTX), CTX + [1])
    r.publisher.submit(lambda: None).result()
    assert r.store.lookup("t", "fp", CTX, 4) == {}  # the no-op finished first
    r.flush()
    assert r.store.lookup("t", "fp", CTX, 4) == {"code@wcode": 6}
