import pytest

from kvrelay.backends.torch_engine.block_manager import BlockManager
from kvrelay.errors import KvRelayError


def test_prefix_match_shares_blocks_and_counts_refs():
    bm = BlockManager(4)
    a = bm.allocate(2)
    bm.register(a[0], b"h0")
    bm.register(a[1], b"h1")
    assert bm.match_prefix([b"h0", b"h1", b"h2"]) == a
    bm.release(a)
    assert bm.num_available == 2  # still referenced by the matcher
    bm.release(a)
    assert bm.num_available == 4  # cached, evictable


def test_lru_evicts_oldest_unreferenced_first():
    bm = BlockManager(3)
    blocks = bm.allocate(3)
    for i, b in enumerate(blocks):
        bm.register(b, f"h{i}".encode())
    bm.release([blocks[1]])
    bm.release([blocks[0]])
    bm.release([blocks[2]])
    bm.match_prefix([b"h1"])  # touching h1 makes it most recent... and referenced
    new = bm.allocate(1)
    assert new == [blocks[0]]  # h0 was released before h2
    assert bm.match_prefix([b"h0"]) == []  # evicted: its hash is gone
    assert bm.match_prefix([b"h2"]) == [blocks[2]]


def test_unhashed_blocks_go_back_to_free_list():
    bm = BlockManager(2)
    b = bm.allocate(2)
    bm.release(b)
    assert list(bm.free) == b and not bm.lru


def test_full_cache_is_a_clear_error_and_double_release_is_caught():
    bm = BlockManager(2)
    b = bm.allocate(2)
    with pytest.raises(KvRelayError, match="KV cache full: need 1 blocks, 0 available"):
        bm.allocate(1)
    bm.release(b)
    with pytest.raises(AssertionError):
        bm.release(b)


def test_first_writer_wins_on_duplicate_hash():
    bm = BlockManager(2)
    x, y = bm.allocate(2)
    bm.register(x, b"h")
    bm.register(y, b"h")
    assert bm.match_prefix([b"h"]) == [x]
