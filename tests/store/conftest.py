"""Fixtures for the page store tests: a real redis-server per test, and both tiers.

(tests/store is a package so that this conftest does not replace tests/conftest.py as the module
`conftest` that other test modules import from.)"""

from __future__ import annotations

import pytest

from helpers.redis_server import RedisServer
from kvrelay.store import MemoryStore, RedisStore


@pytest.fixture
def redis_server():
    """A fresh, empty, real redis-server for one test (about 30 ms to start)."""
    srv = RedisServer()
    yield srv
    srv.stop()


@pytest.fixture
def raw_redis(redis_server):
    """A plain client on the test's server, to corrupt or inspect what the store wrote."""
    import redis

    r = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    yield r
    r.close()


@pytest.fixture(params=["memory", "redis"])
def store(request):
    """Each tier, empty."""
    if request.param == "memory":
        s = MemoryStore(64 << 20)
    else:
        s = RedisStore(request.getfixturevalue("redis_server").url, timeout_s=1.0)
    yield s
    s.close()
