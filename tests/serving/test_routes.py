"""The orchestrator's routing decision, without Triton: real page store, real pages."""

import pytest
import torch

from kvrelay.model.spec import ModelSpec
from kvrelay.serving.deployment import ServedModel
from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageFormat
from kvrelay.model.plan import RecomputePlan
from kvrelay.serving.routes import RecentlyComputed, route
from kvrelay.serving.selector import Choice
from kvrelay.store import MemoryStore

FMT = PageFormat.for_model(4, 2, 8, 32, 4)
IDS = {n: ServedModel(ModelSpec("t", n, {}, "fp", f"w{n}"), FMT) for n in ("base", "code", "legal")}


class FixedSelector:
    """Stands in for kvrelay.serving.selector.Selector (tested on its own): answers one plan, records calls."""

    def __init__(self, plan):
        self.plan, self.calls = plan, []

    def choose(self, sender, receiver, sender_fp, receiver_fp, *, context_tokens, queued=0, slo_s=None, weights=None):
        self.calls.append((sender, receiver, context_tokens, queued))
        reason = "fixed plan" if self.plan is not None else f"no profile for {sender}->{receiver}"
        return Choice(self.plan, reason, None, None, "" if self.plan is not None else "no profile")


def pages(producer, tokens, fingerprint="fp"):
    n = len(tokens) // FMT.block_size
    return KVPages(
        FMT,
        f"{producer}@w{producer}",
        fingerprint,
        tokens[: n * 4],
        torch.randn(n, *FMT.kv_shape),
        torch.randn(n, *FMT.e_shape),
    )


CTX = list(range(100, 124))  # 6 blocks


@pytest.fixture
def store():
    return MemoryStore(64 << 20)


def test_miss_is_a_full_prefill_that_publishes(store):
    r = route(store, FixedSelector(RecomputePlan.none()), IDS, "code", "t", CTX + [1, 2], RecentlyComputed())
    assert (r.kind, r.reason, r.export, r.cause) == ("full", "miss", True, "miss")


def test_other_variants_pages_go_through_the_selectors_plan(store):
    store.put("t", pages("base", CTX))
    sel = FixedSelector(RecomputePlan(((2, 4),)))
    r = route(store, sel, IDS, "code", "t", CTX + [7, 8, 9], RecentlyComputed(), queued=3)
    assert (r.kind, r.donor, r.producer, r.blocks, str(r.plan)) == ("reuse", "base", "base@wbase", 6, "2-4")
    assert sel.calls == [("base", "code", 24, 3)]


def test_no_profile_means_full_prefill_with_the_selectors_reason(store):
    store.put("t", pages("base", CTX))
    r = route(store, FixedSelector(None), IDS, "code", "t", CTX + [7], RecentlyComputed())
    assert (r.kind, r.reason) == ("full", "no profile for base->code")
    assert r.cause == "no profile"  # the metrics label: fixed, never cut from the text


def test_own_pages_restore_unless_this_server_computed_them(store):
    store.put("t", pages("code", CTX))
    recent = RecentlyComputed()
    r = route(store, FixedSelector(None), IDS, "code", "t", CTX + [5], recent)
    assert (r.kind, r.producer, r.blocks) == ("restore", "code@wcode", 6)
    recent.add("code", "t", pages("code", CTX).hashes)
    r = route(store, FixedSelector(None), IDS, "code", "t", CTX + [5], recent)
    assert (r.kind, r.reason) == ("prefix", "own prefix: engine cache")


def test_longest_donor_wins_and_a_longer_cross_hit_beats_own_pages(store):
    store.put("t", pages("code", CTX[:8]))
    store.put("t", pages("legal", CTX[:16]))
    store.put("t", pages("base", CTX))
    r = route(store, FixedSelector(RecomputePlan.none()), IDS, "code", "t", CTX + [1], RecentlyComputed())
    assert (r.kind, r.donor, r.blocks) == ("reuse", "base", 6)


def test_tenants_fingerprints_and_unknown_producers_are_never_used(store):
    store.put("other-tenant", pages("base", CTX))
    store.put("t", pages("base", CTX, fingerprint="another-family"))
    store.put("t", pages("stranger", CTX))
    r = route(store, FixedSelector(RecomputePlan.none()), IDS, "code", "t", CTX + [1], RecentlyComputed())
    assert (r.kind, r.reason) == ("full", "miss")


def test_sharing_off_ignores_other_variants(store):
    store.put("t", pages("base", CTX))
    r = route(
        store, FixedSelector(RecomputePlan.none()), IDS, "code", "t", CTX + [1], RecentlyComputed(), sharing=False
    )
    assert (r.kind, r.reason) == ("full", "sharing off")


def test_store_failure_is_a_full_prefill_not_an_error():
    class Down(MemoryStore):
        def lookup(self, *a, **k):
            raise KvRelayError("connection refused")

    r = route(Down(1 << 20), FixedSelector(None), IDS, "code", "t", CTX, RecentlyComputed())
    assert r.kind == "full" and r.reason.startswith("store unavailable") and not r.export


def test_context_shorter_than_a_block():
    r = route(MemoryStore(1 << 20), FixedSelector(None), IDS, "code", "t", [1, 2], RecentlyComputed())
    assert (r.kind, r.reason) == ("full", "context shorter than one block")


def test_a_reuse_this_server_ran_is_remembered_per_donor_plan_and_context(store):
    store.put("t", pages("base", CTX))
    recent, plan = RecentlyComputed(), RecomputePlan(((2, 4),))
    first = route(store, FixedSelector(plan), IDS, "code", "t", CTX + [7, 8], recent)
    assert first.kind == "reuse" and not first.cached
    recent.add_hybrid("code", "t", first, CTX + [7, 8], FMT.block_size)
    again = route(store, FixedSelector(plan), IDS, "code", "t", CTX + [9], recent)  # another question
    assert again.cached and again.reason.endswith("hybrid KV cached in the engine")
    other_plan = route(store, FixedSelector(RecomputePlan(((0, 2),))), IDS, "code", "t", CTX + [9], recent)
    other_receiver = route(store, FixedSelector(plan), IDS, "legal", "t", CTX + [9], recent)
    assert not other_plan.cached and not other_receiver.cached
    recent.forget_hybrid("code", "t", first, CTX, FMT.block_size)
    assert not route(store, FixedSelector(plan), IDS, "code", "t", CTX + [9], recent).cached


def test_in_flight_prefills_cover_a_context_until_they_end():
    from kvrelay.model.kv_format import block_hashes
    from kvrelay.serving.routes import InFlightPrefills

    fl = InFlightPrefills()
    ctx = block_hashes(CTX + [1, 2, 3, 4], 4)  # 7 blocks
    p = fl.begin("base", "t", "fp", ctx)
    mine = block_hashes(CTX + [1, 2, 3, 4] + [9] * 8, 4)  # 9 blocks, the first 7 shared
    assert fl.covering("t", "fp", mine, lambda m: True) is p
    assert fl.covering("t", "fp", mine, lambda m: m != "base") is None  # not a model worth waiting for
    assert fl.covering("t2", "fp", mine, lambda m: True) is None  # other tenant
    assert fl.covering("t", "fp", block_hashes(CTX[:8] + [5] * 40, 4), lambda m: True) is None  # 2 of 12 blocks
    assert not p.done.is_set()
    fl.end(p)
    fl.end(p)  # idempotent
    assert p.done.is_set() and fl.covering("t", "fp", mine, lambda m: True) is None
