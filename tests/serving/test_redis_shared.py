"""Two tritonservers sharing one real redis-server: a variant on B reuses pages A made; Redis killed
mid-run degrades to full prefill and every request still succeeds."""

import time
import uuid

import pytest

from kvrelay.server import client
from kvrelay.store.redis_server import RedisServer

from .conftest import Running, deployment
from .test_server import CONTEXT


@pytest.fixture(scope="module")
def redis():
    r = RedisServer()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, test_profiles, redis):
    store = f"{redis.url}?timeout=0.5"
    a = Running(deployment(test_profiles, store=store), tmp_path_factory.mktemp("server_a"))
    b = Running(deployment(test_profiles, store=store), tmp_path_factory.mktemp("server_b"))
    yield a.server, b.server
    a.close()
    b.close()


def ask(server, model, t, q="Summarise."):
    return client.infer(server.http_url, q, 8, model=model, context=CONTEXT, tenant=t)


def test_server_b_reuses_pages_server_a_made(pair):
    a, b = pair
    t = f"t-{uuid.uuid4().hex[:8]}"
    first = ask(a, "base", t)
    assert first.info["kv_route"] == "full: miss"
    time.sleep(1.0)  # publishing is off the request path
    r = ask(b, "code", t)
    assert r.info["kv_donor_model"] == "base" and r.info["kv_route"].startswith("reuse")
    restored = ask(b, "base", t, "Another question?")
    assert restored.info["kv_route"].startswith("restore")  # base's own pages, made on A


def test_a_page_moved_to_another_key_is_refused_counted_and_the_request_still_served(pair, redis):
    import urllib.request

    import redis as redis_client

    a, b = pair
    t = f"t-{uuid.uuid4().hex[:8]}"
    clean = ask(a, "code", t)  # code's pages go to Redis
    time.sleep(1.0)
    raw = redis_client.Redis.from_url(redis.url)
    k5 = sorted(raw.scan_iter(f"kvrelay:{t}:*:k5"))  # code -> base reuses layer 5 (plan 2-4)
    k6 = sorted(raw.scan_iter(f"kvrelay:{t}:*:k6"))
    assert clean.info["kv_route"] == "full: miss" and len(k5) == len(k6) > 1
    raw.set(k5[0], raw.get(k6[0]))  # a genuine value of another layer, under this key
    got = ask(b, "base", t, "Who produces pages?")
    assert got.info["output_tokens"] == 8  # still served, by a shorter reuse or a full prefill
    assert got.info["kv_reused_tokens"] < len(k5) * 16
    text = urllib.request.urlopen(b.metrics_url, timeout=10).read().decode()
    rejected = [l for l in text.splitlines() if l.startswith("kvrelay_pages_rejected_total") and 'reason="auth"' in l]
    assert rejected and float(rejected[0].split()[-1]) >= 1


def test_redis_killed_mid_run_requests_still_succeed(pair, redis):
    a, b = pair
    t = f"t-{uuid.uuid4().hex[:8]}"
    ask(a, "base", t)
    redis.kill()
    for server in (a, b):
        for model in ("base", "code"):
            r = ask(server, model, t)
            assert r.info["output_tokens"] == 8
            assert r.info["kv_route"].startswith("full")
