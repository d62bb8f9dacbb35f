"""The in-process tier: byte cap, LRU eviction that keeps contexts' leading pages longest."""

from kvrelay.store import MemoryStore

from .util import FMT, ctx, make_pages

B = FMT.block_size
PAGE = make_pages(ctx(B)).kv[0].nbytes + make_pages(ctx(B)).e[0].nbytes  # bytes one page holds


def test_lru_eviction_under_the_byte_cap():
    store = MemoryStore(5 * PAGE)
    one, two = ctx(4 * B), ctx(4 * B, start=500)
    assert store.put("t", make_pages(one)) == 4
    assert store.put("t", make_pages(two)) == 4
    s = store.stats()
    assert s["bytes"] <= 5 * PAGE and s["pages"] == 5 and s["evicted"] == 3
    # the older context lost its tail, not its head: a leading page is still usable
    assert store.lookup("t", "fp-tiny", one, B) == {"base@w1": 1}
    assert store.lookup("t", "fp-tiny", two, B) == {"base@w1": 4}
    # using a context makes it recent: the other one is evicted next
    assert store.fetch("t", "fp-tiny", "base@w1", one, FMT, 1).num_pages == 1
    store.put("t", make_pages(ctx(B, start=900)))
    assert store.lookup("t", "fp-tiny", one, B) == {"base@w1": 1}
    assert store.lookup("t", "fp-tiny", two, B) == {"base@w1": 3}


def test_a_page_larger_than_the_cap_is_not_stored():
    store = MemoryStore(PAGE - 1)
    assert store.put("t", make_pages(ctx(2 * B))) == 0
    assert store.stats()["pages"] == 0 and store.lookup("t", "fp-tiny", ctx(2 * B), B) == {}


def test_stored_pages_are_copies():
    """What a caller does with its tensors afterwards (or with fetched ones) cannot change the store."""
    store = MemoryStore(1 << 20)
    p = make_pages(ctx(2 * B))
    want = p.kv.clone()
    store.put("t", p)
    p.kv.zero_()
    got = store.fetch("t", "fp-tiny", "base@w1", p.tokens, FMT, 2)
    assert (got.kv == want).all()
    got.kv.zero_()
    assert (store.fetch("t", "fp-tiny", "base@w1", p.tokens, FMT, 2).kv == want).all()
