import pytest

from kvrelay.errors import KvRelayError
from kvrelay.store import DEFAULT_MEMORY_BYTES, MemoryStore, RedisStore, open_store, parse_bytes


def test_specs():
    assert isinstance(open_store("memory"), MemoryStore) and open_store("memory").max_bytes == DEFAULT_MEMORY_BYTES
    assert open_store("memory:2GiB").max_bytes == 2 << 30
    assert open_store("memory:512MB").max_bytes == 512 * 10**6
    r = open_store("redis://127.0.0.1:1/0?timeout=0.25&ttl=60&prefix=kv")  # lazy: nothing listens there
    assert isinstance(r, RedisStore) and (r.timeout_s, r.ttl_s, r.key_prefix) == (0.25, 60, "kv")
    assert not r.ping()
    assert open_store("redis://:secret@127.0.0.1:1/0").url == "redis://:***@127.0.0.1:1/0"
    assert parse_bytes("1.5k") == 1500 and parse_bytes("1048576") == 1 << 20


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "mem",
        "memory:",
        "memory:lots",
        "memory:0",
        "memory:-1GiB",
        "memcached://h:1",
        "redis://",
        "redis://h:notaport/0",
        "redis://h:1/zero",
        "redis://h:1/0?bogus=1",
        "redis://h:1/0?timeout=fast",
        "redis://h:1/0?ttl=0",
        "redis://h:1/0?timeout=0",
    ],
)
def test_bad_specs(spec):
    with pytest.raises(KvRelayError):
        open_store(spec)
