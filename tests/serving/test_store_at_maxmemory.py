"""Redis at maxmemory (noeviction) under concurrent requests: every request is answered (publishes
that Redis refuses are dropped, never the request), and nothing is left without a TTL or an owner."""

from concurrent.futures import ThreadPoolExecutor

import redis

from helpers.redis_server import RedisServer
from kvrelay.serving.orchestrator import Orchestrator, ServeRequest
from kvrelay.store import RedisStore
from kvrelay.store.redis_stats import scan

from .conftest import deployment
from .test_core_in_process import Collect


def test_a_full_redis_fails_no_request_and_leaves_no_orphan(test_profiles):
    srv = RedisServer()
    raw = redis.Redis.from_url(srv.url)
    raw.config_set("maxmemory", "4mb")
    raw.config_set("maxmemory-policy", "noeviction")
    core = Orchestrator(deployment(test_profiles), store=RedisStore(srv.url, timeout_s=2.0, backoff_s=0.0))
    try:

        def one(i):
            sink = Collect()
            ctx = [2000 + 101 * i + t for t in range(16 * 20)]
            core.serve(ServeRequest(tokens=ctx + [i], max_tokens=2, model=("base", "code")[i % 2], tenant="t"), sink)
            return sink.replies[-1]

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(one, range(48)))
        core.router.flush()
        assert all(r.finished and r.output_tokens == 2 for r in replies)
        s = scan(raw, "kvrelay")
        assert core.store.stats()["errors"] > 0, "Redis never refused a write: the test proves nothing"
        assert s["orphan_values_without_ttl"] == 0 and s["dangling_index_entries"] == 0, s
    finally:
        core.close()
        srv.stop()
