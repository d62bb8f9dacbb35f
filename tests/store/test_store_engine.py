"""Real engine pages through the store: a re-prefill from a streamed donor equals one from fetched
pages and one from the sender's pages themselves (tiny family, both tiers)."""

import pytest
import torch

from kvrelay.model.engine_api import Request, SamplingParams
from kvrelay.model.plan import RecomputePlan


@pytest.fixture(scope="module")
def engines(tiny_family):
    from kvrelay.model.engine_api import EngineConfig
    from kvrelay.engines import make_engine

    cfg = lambda: EngineConfig(block_size=16, kv_cache_bytes=32 << 20, prefix_caching=False)
    return make_engine("tiny", "base", cfg()), make_engine("tiny", "code", cfg())


def _logits(R, prompt, donor=None, plan=None, rid="r"):
    out = R.generate([Request(rid, prompt, SamplingParams(max_tokens=1, return_logits=1), donor=donor, plan=plan)])[rid]
    return out.logits[0], out.prefill


def test_reprefill_from_streamed_equals_fetched(engines, store, rng):
    S, R = engines
    B = S.page_format.block_size
    vocab = S.cfg.vocab_size
    context = [rng.randrange(vocab) for _ in range(5 * B + rng.randrange(B - 3))]  # + 3 below: 5 full blocks
    pages = S.generate([Request("donor", context + [5, 6, 7], SamplingParams(max_tokens=1), export_pages=True)])[
        "donor"
    ].pages
    assert store.put("acme", pages) == pages.num_pages == 5

    prompt = context + [rng.randrange(vocab) for _ in range(9)]
    found = store.lookup("acme", R.fingerprint, prompt, B)
    assert found == {S.model_id: 5}  # the sender's, never the receiver's own
    plan = RecomputePlan(((2, 4),))
    reused, e_needed = plan.reused_layers(R.num_layers), plan.e_layers_needed()
    args = ("acme", R.fingerprint, S.model_id, prompt, R.page_format, found[S.model_id])

    want, _ = _logits(R, prompt, pages, plan)
    fetched = store.fetch(*args, layers=reused, e_layers=e_needed)
    assert fetched.layers == tuple(reused) and fetched.format.e_layers == (2,)
    got_fetched, info = _logits(R, prompt, fetched, plan)
    streamed = store.stream(*args, layers=reused, e_layers=e_needed)
    got_streamed, info_s = _logits(R, prompt, streamed, plan)
    assert info.reused_tokens == info_s.reused_tokens == 5 * B and info_s.recomputed_layers == 2
    assert torch.equal(got_fetched, want) and torch.equal(got_streamed, want)
    # the engine read E first, then the reused layers in increasing order: the order they streamed in
    assert list(streamed.layer_times) == [("e", 2)] + [("k", l) for l in reused]


def test_own_pages_restore_exactly(engines, store, rng):
    """The receiver's own pages coming back from the store (e.g. from another server) with no
    recompute reproduce its full prefill."""
    _, R = engines
    B = R.page_format.block_size
    context = [rng.randrange(R.cfg.vocab_size) for _ in range(3 * B)]
    own = R.generate([Request("own", context + [1], SamplingParams(max_tokens=1), export_pages=True)])["own"].pages
    store.put("acme", own)
    prompt = context + [9, 8, 7]
    assert store.lookup("acme", R.fingerprint, prompt, B) == {R.model_id: 3}
    donor = store.stream("acme", R.fingerprint, R.model_id, prompt, R.page_format, 3)
    full, _ = _logits(R, prompt, rid="full")
    restored, info = _logits(R, prompt, donor, RecomputePlan.none(), rid="restored")
    assert info.reused_tokens == 3 * B
    assert torch.allclose(restored, full, atol=1e-4)


def test_nothing_in_the_store_means_a_plain_full_prefill(engines, store, rng):
    """fetch of pages that are not there is an empty donor: the engine prefills in full, same logits."""
    S, R = engines
    prompt = [rng.randrange(R.cfg.vocab_size) for _ in range(40)]
    empty = store.fetch("acme", R.fingerprint, S.model_id, prompt, R.page_format, 2, layers=[0, 1], e_layers=[2])
    assert empty.num_pages == 0
    full, _ = _logits(R, prompt, rid="full")
    got, info = _logits(R, prompt, empty, RecomputePlan(((2, 8),)), rid="empty")
    assert info.reused_tokens == 0 and torch.equal(got, full)
