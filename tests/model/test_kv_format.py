import pytest
import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageFormat, block_hashes

FMT = PageFormat(num_layers=4, num_kv_heads=2, head_dim=8, hidden_size=32, block_size=4, e_layers=(2,))


def pages(n, fmt=FMT, tokens=None):
    tokens = tokens if tokens is not None else list(range(n * fmt.block_size))
    return KVPages(fmt, "m", "fp", tokens, torch.randn(n, *fmt.kv_shape), torch.randn(n, *fmt.e_shape))


def test_hash_chain_identifies_whole_prefix():
    a = block_hashes(list(range(12)), 4)
    b = block_hashes(list(range(12)) + [99, 98], 4)  # partial last block: no identity
    c = block_hashes([7] + list(range(1, 12)), 4)  # first block differs -> every later hash differs
    assert len(a) == 3 and a == b
    assert all(x != y for x, y in zip(a, c))


def test_salt_separates_hybrid_from_exact_kv():
    toks = list(range(8))
    assert block_hashes(toks, 4) != block_hashes(toks, 4, salt=b"donor|plan")
    assert block_hashes(toks, 4, salt=b"x") == block_hashes(toks, 4, salt=b"x")


def test_hash_chain_can_be_extended_incrementally():
    toks = list(range(16))
    whole = block_hashes(toks, 4, salt=b"s")
    head = block_hashes(toks[:8], 4, salt=b"s")
    assert head + block_hashes(toks[8:], 4, salt=b"s", parent=head[-1]) == whole


def test_page_is_a_tensorrt_llm_pool_block():
    """TRT-LLM's pool is [blocks, layers, 2, kv_heads * tokens_per_block * head_dim]; a page must be
    exactly one such block, so a TRT-LLM engine can copy it in with pool[block_id].copy_(page)."""
    p = pages(3)
    trt_pool = p.kv.reshape(3, FMT.num_layers, 2, FMT.num_kv_heads * FMT.block_size * FMT.head_dim)
    k_layer1_head1_token2 = p.kv[0, 1, 0, 1, 2]
    flat = trt_pool[0, 1, 0].view(FMT.num_kv_heads, FMT.block_size, FMT.head_dim)[1, 2]
    assert torch.equal(k_layer1_head1_token2, flat)
    assert p.kv.is_contiguous()


def test_page_bytes_counts_kv_and_e():
    kv = 4 * 2 * 2 * 4 * 8
    e = 1 * 4 * 32
    assert FMT.page_bytes == 4 * (kv + e)


def test_e_layer_view_and_missing_layer_error():
    p = pages(2)
    assert p.e_layer(2).shape == (8, 32)
    assert torch.equal(p.e_layer(2)[5], p.e[1, 0, 1])
    with pytest.raises(KvRelayError, match="carry E for layers \\[2\\], not for layer 3"):
        p.e_layer(3)


@pytest.mark.parametrize(
    "bad",
    [
        dict(tokens=list(range(7))),  # not whole blocks
    ],
)
def test_pages_refuse_partial_blocks(bad):
    with pytest.raises(KvRelayError, match="whole blocks"):
        pages(2, **bad)


def test_pages_refuse_wrong_shapes():
    with pytest.raises(KvRelayError, match="kv pages have shape"):
        KVPages(FMT, "m", "fp", list(range(8)), torch.randn(2, 3, 2, 2, 4, 8), torch.randn(2, *FMT.e_shape))


def test_format_validation_and_round_trip():
    with pytest.raises(KvRelayError, match="e_layers"):
        PageFormat(4, 2, 8, 32, 4, e_layers=(0,))
    with pytest.raises(KvRelayError, match="e_layers"):
        PageFormat(4, 2, 8, 32, 4, e_layers=(3, 2))
    with pytest.raises(KvRelayError, match="dtype"):
        PageFormat(4, 2, 8, 32, 4, dtype="int8")
    assert PageFormat.from_dict(FMT.to_dict()) == FMT
    assert FMT.compatible_with(PageFormat(4, 2, 8, 32, 4, dtype="bfloat16", e_layers=()))
    assert not FMT.compatible_with(PageFormat(4, 2, 8, 32, 8))


def test_prefix_keeps_identity():
    p = pages(3)
    q = p.prefix(2)
    assert q.tokens == p.tokens[:8] and q.hashes == p.hashes[:2] and torch.equal(q.kv, p.kv[:2])


def test_layer_subset_pages():
    kv = torch.randn(2, 2, 2, 2, 4, 8)
    p = KVPages(FMT, "m", "fp", list(range(8)), kv, torch.randn(2, *FMT.e_shape), layers=(1, 3))
    assert torch.equal(p.kv_layer(3), kv[:, 1]) and p.has_layers([1]) and not p.has_layers([0, 1])
    with pytest.raises(KvRelayError, match="carry KV for layers \\[1, 3\\], not 0"):
        p.kv_layer(0)
    with pytest.raises(KvRelayError, match="kv pages have shape"):
        KVPages(FMT, "m", "fp", list(range(8)), kv, torch.randn(2, *FMT.e_shape), layers=(1,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pack_round_trip_and_corruption_detected(dtype):
    from kvrelay.model.kv_format import PageCorrupt, pack_tensor, unpack_tensor

    t = torch.randn(3, 2, 5).to(dtype)
    blob = pack_tensor(t)
    assert torch.equal(unpack_tensor(blob), t)
    flipped = bytearray(blob)
    flipped[-3] ^= 0x40
    with pytest.raises(PageCorrupt, match="authentication failed") as e:
        unpack_tensor(bytes(flipped))
    assert e.value.kind == "auth"
    with pytest.raises(PageCorrupt, match="payload is"):
        unpack_tensor(blob[:-4])
    with pytest.raises(PageCorrupt, match="header"):
        unpack_tensor(b"\x05\x00garbage")


def test_a_blob_proves_the_key_it_was_written_under_and_who_wrote_it():
    from kvrelay.model.kv_format import PageCorrupt, pack_tensor, unpack_tensor

    t, secret = torch.randn(2, 4), b"s" * 32
    blob = pack_tensor(t, b"tenant:fp:p:base:16:abc:g1:k3", secret)
    assert torch.equal(unpack_tensor(blob, b"tenant:fp:p:base:16:abc:g1:k3", secret), t)
    for bind, key in (
        (b"tenant:fp:p:base:16:abc:g1:k4", secret),  # moved to another layer's key
        (b"other:fp:p:base:16:abc:g1:k3", secret),  # ... to another tenant's
        (b"tenant:fp:p:base:16:abc:g1:k3", b"x" * 32),
    ):  # written without the secret
        with pytest.raises(PageCorrupt, match="authentication failed"):
            unpack_tensor(blob, bind, key)


def test_non_finite_values_are_refused_even_with_a_valid_mac():
    from kvrelay.model.kv_format import PageCorrupt, pack_tensor, unpack_tensor

    for bad in (float("nan"), float("inf")):
        t = torch.zeros(2, 4)
        t[1, 2] = bad
        with pytest.raises(PageCorrupt, match="non-finite") as e:
            unpack_tensor(pack_tensor(t, b"k", b"s" * 32), b"k", b"s" * 32)
        assert e.value.kind == "non_finite"


def test_an_old_crc_only_blob_is_refused_as_malformed():
    import zlib

    from kvrelay.model.kv_format import PageCorrupt, unpack_tensor

    payload = bytes(32)
    header = f"float32:2,4:{zlib.crc32(payload):08x}".encode()
    with pytest.raises(PageCorrupt, match="unreadable page header") as e:
        unpack_tensor(len(header).to_bytes(2, "little") + header + payload)
    assert e.value.kind == "malformed"
