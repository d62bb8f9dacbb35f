"""A real `redis-server` on a free 127.0.0.1 port for tests: `RedisServer()` returns once it answers
PING; `.url`, `.stop()`, `.kill()` (SIGKILL, a crash), `.pause()` / `.resume()` (a hung server),
`.restart()`. Needs only the `redis-server` binary (standard library otherwise).

The implementation lives in the package (kvrelay.store.redis_server) because `kvrelay bench prefill
--store redis` starts one too; this module is the tests' stable import path."""

from kvrelay.store.redis_server import RedisServer, free_port, ping

__all__ = ["RedisServer", "free_port", "ping"]
