"""A Redis store at maxmemory (noeviction) refuses writes half way: the store must not keep what a
refused publish wrote (no key without a TTL or an owner), requests must not fail, and
`kvrelay store stats` must see what is there."""

import json
import subprocess
import sys

import pytest

from kvrelay.store import RedisStore
from kvrelay.store.base import StoreUnavailable
from kvrelay.store.redis_stats import scan

from .util import FMT, ctx, make_pages

B = FMT.block_size


def fill_until_refused(store, rounds=400):
    refused = 0
    for i in range(rounds):
        try:
            store.put("t", make_pages(ctx(16 * B, start=100_000 * i), seed=i))
        except StoreUnavailable:
            refused += 1
            if refused >= 20:
                break
    return refused


def test_refused_publishes_leave_no_key_without_ttl_or_owner(redis_server, raw_redis):
    raw_redis.config_set("maxmemory", "3mb")
    raw_redis.config_set("maxmemory-policy", "noeviction")
    store = RedisStore(redis_server.url, timeout_s=2.0, backoff_s=0.0)
    assert fill_until_refused(store) > 0, "the store never reached maxmemory: the test proves nothing"
    s = scan(raw_redis, "kvrelay")
    assert s["orphan_values_without_ttl"] == 0, s
    values_without_ttl = s["without_ttl"].get("value", 0)
    assert values_without_ttl == s["keys"].get("value", 0) - s["orphan_values"], s  # committed ones only
    # what is committed is whole and readable
    assert s["pages"] > 0


def test_values_wait_for_their_marker_under_a_short_ttl(redis_server, raw_redis, monkeypatch):
    store = RedisStore(redis_server.url)
    p = make_pages(ctx(2 * B))

    def die(*a, **k):  # the writer dies between its values and its marker
        raise StoreUnavailable("killed")

    monkeypatch.setattr(store, "_forget", lambda *a, **k: None)  # dead: no clean-up either
    real = store._put_values
    monkeypatch.setattr(store, "_put_values", lambda *a, **k: (real(*a, **k), die())[0])
    with pytest.raises(StoreUnavailable):
        store.put("t", p)
    values = [k for k in raw_redis.scan_iter("kvrelay:*") if k.count(b":") == 8]
    assert values and all(0 < raw_redis.ttl(k) <= 300 for k in values)
    assert scan(raw_redis, "kvrelay")["orphan_values"] == len(values)


def test_a_committed_page_keeps_its_values_with_the_marker(redis_server, raw_redis):
    RedisStore(redis_server.url).put("t", make_pages(ctx(2 * B)))
    s = scan(raw_redis, "kvrelay")
    assert s["pages"] == 2 and s["orphan_values"] == 0 and s["keys"]["value"] == 2 * (FMT.num_layers + 2)
    assert s["without_ttl"]["value"] == s["keys"]["value"]  # ttl_s None: they live with their marker
    RedisStore(redis_server.url, ttl_s=60).put("t2", make_pages(ctx(2 * B)))
    s = scan(raw_redis, "kvrelay")
    assert s["without_ttl"]["value"] == 2 * (FMT.num_layers + 2)  # the ttl store's values all expire


def test_store_stats_cli_reports_and_deletes_orphans(redis_server, raw_redis):
    RedisStore(redis_server.url).put("t", make_pages(ctx(2 * B)))
    raw_redis.set("kvrelay:t:fp-tiny:p:base%40w1:4:" + "ab" * 8 + ":deadbeef:k0", b"x")  # an orphan
    cmd = [sys.executable, "-m", "kvrelay.cli", "store", "stats", "--store", redis_server.url, "--json"]
    s = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout)
    assert s["pages"] == 2 and s["orphan_values"] == 1 and s["orphan_values_without_ttl"] == 1
    s = json.loads(
        subprocess.run(cmd + ["--delete-orphans"], capture_output=True, text=True, check=True, timeout=60).stdout
    )
    assert s["orphans_deleted"] == 1
    assert scan(raw_redis, "kvrelay")["orphan_values"] == 0


def test_store_stats_needs_a_redis_url():
    r = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "store", "stats", "--store", "memory"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "only a Redis store can be inspected" in r.stderr
