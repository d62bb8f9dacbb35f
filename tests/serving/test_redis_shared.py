"""Two tritonservers sharing one real redis-server: a variant on B reuses pages A made; Redis killed
mid-run degrades to full prefill and every request still succeeds."""
import uuid

import pytest

from kvrelay import client
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
    import time
    time.sleep(1.0)                                # publishing is off the request path
    r = ask(b, "code", t)
    assert r.info["kv_donor_model"] == "base" and r.info["kv_route"].startswith("reuse")
    restored = ask(b, "base", t, "Another question?")
    assert restored.info["kv_route"].startswith("restore")   # base's own pages, made on A


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
