"""The Redis tier against a real redis-server: corruption, partial pages, a dead or hung server, sharing."""

import time

import pytest
import torch

from kvrelay.store import RedisStore, StoreUnavailable

from .util import FMT, ctx, make_pages

B = FMT.block_size


def _value_keys(raw, page_hash: bytes, kind_layer: str):
    return [k for k in raw.scan_iter(f"kvrelay:*:p:*:{B}:{page_hash.hex()}:*:{kind_layer}")]


def test_two_servers_share_pages_through_one_redis(redis_server):
    """Engines on different machines: one puts, the other finds and fetches the same bytes."""
    a, b = RedisStore(redis_server.url), RedisStore(redis_server.url)
    p = make_pages(ctx(3 * B))
    assert a.put("t1", p) == 3
    assert b.put("t1", p) == 0  # idempotent across clients too
    assert b.lookup("t1", p.fingerprint, p.tokens, B) == {p.producer: 3}
    assert torch.equal(b.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3).kv, p.kv)


def test_one_value_per_page_and_layer(redis_server, raw_redis):
    store = RedisStore(redis_server.url, ttl_s=600)
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    for h in p.hashes:
        assert len(_value_keys(raw_redis, h, "k*")) == FMT.num_layers
        assert len(_value_keys(raw_redis, h, "e*")) == len(FMT.e_layers)
    assert all(0 < raw_redis.ttl(k) <= 600 for k in raw_redis.scan_iter("kvrelay:*"))


def test_a_corrupt_value_is_detected_dropped_and_missing(redis_server, raw_redis):
    store = RedisStore(redis_server.url)
    p = make_pages(ctx(4 * B))
    store.put("t1", p)
    (key,) = _value_keys(raw_redis, p.hashes[2], "k3")
    blob = bytearray(raw_redis.get(key))
    blob[-1] ^= 0xFF  # one flipped byte in the payload
    raw_redis.set(key, bytes(blob))
    got = store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 4)
    assert got.num_pages == 2 and torch.equal(got.kv, p.kv[:2])  # the valid prefix
    assert store.stats()["corrupt_dropped"] == 1
    assert _value_keys(raw_redis, p.hashes[2], "*") == []  # page deleted from the store
    assert store.lookup("t1", p.fingerprint, p.tokens, B) == {p.producer: 2}
    assert store.put("t1", p) == 1  # recomputed and stored again
    assert torch.equal(store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 4).kv, p.kv)


def test_a_truncated_value_or_marker_is_corrupt(redis_server, raw_redis):
    store = RedisStore(redis_server.url)
    p = make_pages(ctx(3 * B))
    store.put("t1", p)
    (key,) = _value_keys(raw_redis, p.hashes[1], "e2")
    raw_redis.set(key, raw_redis.get(key)[:-7])
    assert store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3).num_pages == 1
    (marker,) = [k for k in raw_redis.scan_iter(f"kvrelay:*:p:*:{B}:{p.hashes[0].hex()}")]
    raw_redis.set(marker, b"{not json")
    assert store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3).num_pages == 0
    assert store.stats()["corrupt_dropped"] == 2


def test_a_partial_page_counts_as_missing(redis_server, raw_redis):
    store = RedisStore(redis_server.url)
    p = make_pages(ctx(4 * B))
    store.put("t1", p)
    # a layer evicted (maxmemory policy) or expired: the page is incomplete
    (key,) = _value_keys(raw_redis, p.hashes[3], "k5")
    raw_redis.delete(key)
    got = store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 4)
    assert got.num_pages == 3 and store.stats()["partial_dropped"] == 1
    assert store.lookup("t1", p.fingerprint, p.tokens, B) == {p.producer: 3}
    # a writer that died before committing: values there, marker not; never visible
    (marker,) = [k for k in raw_redis.scan_iter(f"kvrelay:*:p:*:{B}:{p.hashes[1].hex()}")]
    raw_redis.delete(marker)
    assert store.lookup("t1", p.fingerprint, p.tokens, B) == {p.producer: 1}
    assert store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 4).num_pages == 1


def test_a_layer_lost_after_a_stream_started_fails_the_stream(redis_server, raw_redis, monkeypatch):
    store = RedisStore(redis_server.url)
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    (key,) = _value_keys(raw_redis, p.hashes[1], "k4")
    real_read = store._read

    def read(handles, wants):  # the value vanishes between the stream's start and its layer's load
        if wants == [("k", 4)]:
            raw_redis.delete(key)
        return real_read(handles, wants)

    monkeypatch.setattr(store, "_read", read)
    s = store.stream("t1", p.fingerprint, p.producer, p.tokens, FMT, 2)
    assert s.num_pages == 2 and torch.equal(s.kv_layer(3), p.kv_layer(3))
    with pytest.raises(StoreUnavailable, match="lost"):
        s.kv_layer(4)


def test_killed_server_means_store_unavailable_quickly(redis_server):
    store = RedisStore(redis_server.url, timeout_s=0.3, backoff_s=0.2)
    p = make_pages(ctx(3 * B))
    store.put("t1", p)
    redis_server.kill()
    for call in (
        lambda: store.lookup("t1", p.fingerprint, p.tokens, B),
        lambda: store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 3),
        lambda: store.stream("t1", p.fingerprint, p.producer, p.tokens, FMT, 3),
        lambda: store.put("t1", p),
    ):
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailable):
            call()
        assert time.monotonic() - t0 < 1.0
    s = store.stats()
    assert s["errors"] >= 1 and not s["available"]
    # back up (empty): usable again once the backoff has passed
    redis_server.restart()
    time.sleep(0.25)
    assert store.lookup("t1", p.fingerprint, p.tokens, B) == {}
    assert store.put("t1", p) == 3


def test_hung_server_times_out(redis_server):
    """SIGSTOPped: connections are accepted but never answered. Every call is bounded by timeout_s."""
    store = RedisStore(redis_server.url, timeout_s=0.3, backoff_s=0.0)
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    redis_server.pause()
    try:
        for call in (
            lambda: store.lookup("t1", p.fingerprint, p.tokens, B),
            lambda: store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 2),
        ):
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable, match="Timeout"):
                call()
            assert time.monotonic() - t0 < 1.5
    finally:
        redis_server.resume()


def test_server_dying_mid_stream(redis_server, monkeypatch):
    store = RedisStore(redis_server.url, timeout_s=0.3)
    p = make_pages(ctx(2 * B))
    store.put("t1", p)
    real_read = store._read

    def read(handles, wants):
        if wants == [("k", 0)]:
            redis_server.kill()
        return real_read(handles, wants)

    monkeypatch.setattr(store, "_read", read)
    s = store.stream("t1", p.fingerprint, p.producer, p.tokens, FMT, 2)
    assert torch.equal(s.e_layer(4), p.e_layer(4))
    t0 = time.monotonic()
    with pytest.raises(StoreUnavailable):
        s.kv_layer(0)
    assert time.monotonic() - t0 < 1.5


# --- attacks by a writer who can reach Redis (issue: pages that prove what they are) ---------------


def _attacked(redis_server, raw_redis, attack):
    """Put 4 pages, let `attack(key_of_page2_layer3, raw)` rewrite one value, fetch: the valid prefix
    comes back, the attacked page is dropped, counted by kind and reported to the callback."""
    store = RedisStore(redis_server.url, secret=b"deployment-secret-32-bytes-long!")
    seen = []
    store.on_reject = seen.append
    p = make_pages(ctx(4 * B))
    store.put("t1", p)
    (key,) = _value_keys(raw_redis, p.hashes[2], "k3")
    attack(key, raw_redis, p)
    got = store.fetch("t1", p.fingerprint, p.producer, p.tokens, FMT, 4)
    assert got.num_pages == 2 and torch.equal(got.kv, p.kv[:2])
    return store, seen


def test_a_valid_blob_moved_from_another_layers_key_is_refused(redis_server, raw_redis):
    def move(key, raw, p):
        (other,) = _value_keys(raw, p.hashes[2], "k4")  # a genuine page value, right shape and dtype
        raw.set(key, raw.get(other))

    store, seen = _attacked(redis_server, raw_redis, move)
    assert seen == ["auth"] and store.rejected == {"auth": 1}


def test_a_blob_forged_without_the_secret_is_refused_zeros_or_nans(redis_server, raw_redis):
    from kvrelay.model.kv_format import pack_tensor

    for fill in (0.0, float("nan")):

        def forge(key, raw, p):  # what an attacker can compute: the format, the key, but not the secret
            raw.set(key, pack_tensor(torch.full(tuple(p.kv.shape[2:]), fill), key, b""))

        store, seen = _attacked(redis_server, raw_redis, forge)
        assert seen == ["auth"]
        raw_redis.flushdb()


def test_nan_values_under_a_valid_mac_are_refused(redis_server, raw_redis):
    from kvrelay.model.kv_format import pack_tensor

    secret = b"deployment-secret-32-bytes-long!"

    def poison(key, raw, p):  # e.g. a buggy engine that published NaNs with the right secret
        raw.set(key, pack_tensor(torch.full(tuple(p.kv.shape[2:]), float("nan")), key, secret))

    store, seen = _attacked(redis_server, raw_redis, poison)
    assert seen == ["non_finite"] and store.rejected == {"non_finite": 1}
