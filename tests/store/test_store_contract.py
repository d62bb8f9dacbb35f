"""What every page store tier guarantees (run against MemoryStore and a real redis-server)."""

import pytest
import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageFormat, block_hashes
from kvrelay.store import StoreUnavailable

from .util import FMT, ctx, make_pages

B = FMT.block_size


def assert_same_pages(got: KVPages, want: KVPages, n=None):
    n = want.num_pages if n is None else n
    assert got.num_pages == n
    assert got.tokens == want.tokens[: n * B] and got.hashes == want.hashes[:n]
    assert got.producer == want.producer and got.fingerprint == want.fingerprint and got.derived_from == ""
    assert torch.equal(got.kv, want.kv[:n]) and torch.equal(got.e, want.e[:n])  # bit-exact


def test_round_trip_is_bit_exact_and_put_idempotent(store):
    p = make_pages(ctx(5 * B))
    assert store.put("t1", p) == 5
    assert store.put("t1", p) == 0  # already there: nothing new
    got = store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 5)
    assert got.format == FMT and got.layers is None
    assert_same_pages(got, p)
    s = store.stats()
    assert s["pages_put"] == 5 and s["hits"] == 5 and s["misses"] == 0 and s["bytes_in"] >= p.kv.nbytes


def test_round_trip_bfloat16(store):
    fmt = PageFormat(**{**FMT.to_dict(), "dtype": "bfloat16"})
    p = make_pages(ctx(2 * B), fmt=fmt)
    store.put("t1", p)
    got = store.fetch("t1", p.fingerprint, p.producer, p.tokens, fmt, 2)
    assert got.kv.dtype == torch.bfloat16
    assert_same_pages(got, p)


def test_lookup_counts_leading_blocks_per_producer(store):
    tokens = ctx(6 * B)
    store.put("t1", make_pages(tokens, producer="base@w1"))  # 6 blocks
    store.put("t1", make_pages(tokens[: 2 * B + 3], producer="code@w2"))  # 2 full blocks
    assert store.lookup("t1", "fp-tiny", tokens + [7, 7], B) == {"base@w1": 6, "code@w2": 2}
    diverged = tokens[: 3 * B] + [999] + tokens[3 * B + 1 :]
    assert store.lookup("t1", "fp-tiny", diverged, B) == {"base@w1": 3, "code@w2": 2}
    assert store.lookup("t1", "fp-tiny", [999] + tokens[1:], B) == {}  # first block differs: nothing
    assert store.lookup("t1", "fp-tiny", tokens[: B - 1], B) == {}  # no full block
    assert store.lookup("t1", "fp-tiny", tokens, 2 * B) == {}  # other block size: other pages
    assert store.stats()["lookups"] == 5


def test_a_producer_only_ever_gets_its_own_pages(store):
    """A cross-model entry never serves another producer: fetch is per producer, lookup reports each."""
    tokens = ctx(4 * B)
    base, code = make_pages(tokens, producer="base@w1", seed=1), make_pages(tokens[: 2 * B], producer="code@w2", seed=2)
    store.put("t1", base)
    store.put("t1", code)
    got = store.fetch("t1", "fp-tiny", "code@w2", tokens, FMT, 4)
    assert_same_pages(got, code, n=2)  # its own 2 pages, not base's 4
    assert store.fetch("t1", "fp-tiny", "legal@w3", tokens, FMT, 4).num_pages == 0
    assert store.stats()["misses"] == 2 + 4


def test_tenants_never_see_each_other(store):
    tokens = ctx(3 * B)
    p = make_pages(tokens)
    store.put("tenant-a", p)
    assert store.lookup("tenant-b", p.fingerprint, tokens, B) == {}
    assert store.fetch("tenant-b", p.fingerprint, p.producer, tokens, FMT, 3).num_pages == 0
    # names that would collide if keys were naively joined with ':'
    store.put("x:y", make_pages(tokens, fingerprint="f"))
    assert store.lookup("x", "y:f", tokens, B) == {}
    assert store.fetch("x", "y:f", p.producer, tokens, FMT, 3).num_pages == 0
    assert store.lookup("tenant-a", p.fingerprint, tokens, B) == {p.producer: 3}


def test_fingerprints_are_isolated(store):
    tokens = ctx(3 * B)
    p = make_pages(tokens, fingerprint="fp-one")
    store.put("t1", p)
    assert store.lookup("t1", "fp-two", tokens, B) == {}
    assert store.fetch("t1", "fp-two", p.producer, tokens, FMT, 3).num_pages == 0


def test_only_a_models_own_whole_pages_are_stored(store):
    p = make_pages(ctx(2 * B))
    derived = KVPages(p.format, p.producer, p.fingerprint, p.tokens, p.kv, p.e, derived_from="base@w1|fp|2-4")
    with pytest.raises(KvRelayError, match="hybrid"):
        store.put("t1", derived)
    subset = KVPages(p.format, p.producer, p.fingerprint, p.tokens, p.kv[:, :2], p.e, layers=(0, 1))
    with pytest.raises(KvRelayError, match="layers"):
        store.put("t1", subset)
    salted = KVPages(
        p.format, p.producer, p.fingerprint, p.tokens, p.kv, p.e, hashes=block_hashes(p.tokens, B, salt=b"donor|plan")
    )
    with pytest.raises(KvRelayError, match="hash"):
        store.put("t1", salted)
    with pytest.raises(KvRelayError, match="tenant"):
        store.put("", p)
    assert store.lookup("t1", p.fingerprint, p.tokens, B) == {}


def test_fetch_moves_only_the_layers_asked(store):
    p = make_pages(ctx(3 * B))
    store.put("t1", p)
    got = store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3, layers=[3, 0, 5], e_layers=[4])
    assert got.layers == (0, 3, 5) and got.format.e_layers == (4,)
    assert got.kv.shape == (3, 3, *FMT.kv_shape[1:]) and got.e.shape == (3, 1, B, FMT.hidden_size)
    for l in (0, 3, 5):
        assert torch.equal(got.kv_layer(l), p.kv_layer(l))
    assert torch.equal(got.e_layer(4), p.e_layer(4))
    assert got.has_layers([0, 5]) and not got.has_layers([1])
    none = store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3, layers=[1], e_layers=[])
    assert none.format.e_layers == () and none.e.shape == (3, 0, B, FMT.hidden_size)
    assert torch.equal(none.kv_layer(1), p.kv_layer(1))


def test_pages_without_the_e_asked_are_not_served(store):
    """An engine configured with other E layers stored these: they cannot start a group at layer 3."""
    fmt = PageFormat(**{**FMT.to_dict(), "e_layers": (3,)})
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    assert store.fetch("t1", p.fingerprint, p.producer, p.tokens, fmt, 2).num_pages == 0
    assert store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 2, e_layers=[2]).num_pages == 2


def test_zero_blocks_is_an_empty_result_not_an_error(store):
    got = store.fetch("t1", "fp-tiny", "base@w1", ctx(2 * B), FMT, 2)
    assert got.num_pages == 0 and got.tokens == [] and got.kv.shape[0] == 0
    s = store.stream("t1", "fp-tiny", "base@w1", ctx(2 * B), FMT, 2)
    assert s.num_tokens == 0 and s.wait().num_pages == 0


def test_bad_requests(store):
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    with pytest.raises(KvRelayError, match="num_blocks"):
        store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3)  # more blocks than tokens
    with pytest.raises(KvRelayError, match="out of range"):
        store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 2, layers=[6])
    with pytest.raises(KvRelayError, match="e_layers"):
        store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 2, e_layers=[0])
    with pytest.raises(KvRelayError, match="block_size"):
        store.lookup("t1", p.fingerprint, p.tokens, 0)


def test_stream_yields_what_fetch_returns(store):
    p = make_pages(ctx(4 * B))
    store.put("t1", p)
    args = ("t1", p.fingerprint, p.producer, p.tokens, FMT, 4)
    for layers, e_layers in [(None, None), ([1, 2, 3, 5], [4, 2])]:
        fetched = store.fetch(*args, layers=layers, e_layers=e_layers)
        s = store.stream(*args, layers=layers, e_layers=e_layers)
        assert s.tokens == fetched.tokens and s.format == fetched.format and s.producer == p.producer
        assert s.num_tokens == 4 * B and s.layers == fetched.layers
        for l in s.format.e_layers:
            assert torch.equal(s.e_layer(l), fetched.e_layer(l))
        for l in fetched.layers or range(FMT.num_layers):
            assert torch.equal(s.kv_layer(l), fetched.kv_layer(l))
        assert_same_pages(s.wait(), fetched)
        if e_layers:
            order = [w for w in s.layer_times if w[0] == "e"]
            assert order == [("e", 4), ("e", 2)]  # E first, in the order asked
        assert list(s.layer_times)[: len(s.format.e_layers)] == [("e", l) for l in (e_layers or FMT.e_layers)]


def test_stream_fails_cleanly_when_a_layer_never_comes(store, monkeypatch):
    """A loader stuck on a layer: the engine's wait is bounded and ends in StoreUnavailable."""
    import threading

    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    release = threading.Event()
    real_read = store._read

    def stuck(handles, wants):
        if wants[0][0] == "k":
            release.wait(5)
        return real_read(handles, wants)

    monkeypatch.setattr(store, "_read", stuck)
    monkeypatch.setattr(store, "stream_wait_s", 0.2)
    s = store.stream("t1", p.fingerprint, p.producer, p.tokens, FMT, 2)
    assert torch.equal(s.e_layer(2), p.e_layer(2))  # E arrived; recompute could run
    with pytest.raises(StoreUnavailable, match="did not arrive"):
        s.kv_layer(0)
    release.set()


def test_stream_reports_a_failed_loader(store, monkeypatch):
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    real_read = store._read

    def broken(handles, wants):
        if wants[0] == ("k", 3):
            raise StoreUnavailable("connection lost")
        return real_read(handles, wants)

    monkeypatch.setattr(store, "_read", broken)
    s = store.stream("t1", p.fingerprint, p.producer, p.tokens, FMT, 2)
    assert torch.equal(s.kv_layer(2), p.kv_layer(2))  # loaded before the failure: still served
    with pytest.raises(StoreUnavailable, match="connection lost"):
        s.kv_layer(3)


def test_concurrent_use(store):
    import threading

    errors = []

    def worker(k):
        try:
            tokens = ctx(3 * B, start=1000 * k)
            p = make_pages(tokens, seed=k)
            for _ in range(5):
                store.put("t1", p)
                got = store.fetch("t1", p.fingerprint, p.producer, tokens, FMT, 3)
                assert torch.equal(got.kv, p.kv)
                assert store.lookup("t1", p.fingerprint, tokens, B) == {p.producer: 3}
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
