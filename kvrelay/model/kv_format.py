"""The KV page format: the one place that says how cached context travels between models.

A *page* is one block of `block_size` consecutive context tokens, for every layer:

    kv  [num_layers, 2, num_kv_heads, block_size, head_dim]   (2 = K, V)
    e   [len(e_layers), block_size, hidden_size]             hidden state *entering* each layer in e_layers

The kv layout is TensorRT-LLM's paged block layout: its pool is [num_blocks, num_layers, 2,
num_kv_heads * tokens_per_block * head_dim], so a page here is exactly `pool[block_id]` viewed 6-D, and
the engine's own cache is a pool of pages in this layout. E (DroidSpeak's "E cache") is only needed at
layers where a receiver starts recomputing, hence `e_layers`.

Pages are addressed by a hash chain over token blocks (parent digest + block tokens + salt), so a
page's identity includes everything before it; `salt` separates exact KV (b"") from hybrid KV that a
receiver assembled from a donor (never served as a plain prefix hit).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
from dataclasses import dataclass, field

import torch

from kvrelay.errors import KvRelayError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HASH_BYTES = 16


class PageCorrupt(KvRelayError):
    """Bytes that do not decode to the page they claim to be. `kind` names why, for counting:
    "malformed" (header, size), "auth" (the MAC over key + payload fails: corrupt, moved to another key
    or forged), "non_finite" (NaN or infinity in the values)."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise KvRelayError(f"unsupported KV dtype {dtype}; use one of {sorted(DTYPES)}")


@dataclass(frozen=True, slots=True)
class PageFormat:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    block_size: int
    dtype: str = "float32"
    e_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise KvRelayError(f"unsupported KV dtype {self.dtype!r}; use one of {sorted(DTYPES)}")
        if any(not 0 < l < self.num_layers for l in self.e_layers) or list(self.e_layers) != sorted(set(self.e_layers)):
            raise KvRelayError(f"e_layers must be sorted, distinct and in 1..{self.num_layers - 1}: {self.e_layers}")

    @classmethod
    def for_model(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        hidden_size: int,
        block_size: int,
        dtype: str = "float32",
        e_layers: tuple[int, ...] | None = None,
    ) -> "PageFormat":
        """The default E policy lives here: every 2nd layer, the group starts the profiler's stride-2
        grid can choose, so any profiled plan finds the E it starts from."""
        e = tuple(range(2, num_layers, 2)) if e_layers is None else tuple(e_layers)
        return cls(num_layers, num_kv_heads, head_dim, hidden_size, block_size, dtype, e)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def kv_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_kv_heads, self.block_size, self.head_dim)

    @property
    def e_shape(self) -> tuple[int, ...]:
        return (len(self.e_layers), self.block_size, self.hidden_size)

    @property
    def page_bytes(self) -> int:
        per = self.torch_dtype.itemsize
        kv = self.num_layers * 2 * self.num_kv_heads * self.block_size * self.head_dim
        return per * (kv + len(self.e_layers) * self.block_size * self.hidden_size)

    def compatible_with(self, other: "PageFormat") -> bool:
        """Same geometry: one's KV can be placed into the other's cache (dtype may be converted)."""
        return (self.num_layers, self.num_kv_heads, self.head_dim, self.hidden_size, self.block_size) == (
            other.num_layers,
            other.num_kv_heads,
            other.head_dim,
            other.hidden_size,
            other.block_size,
        )

    def to_dict(self) -> dict:
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
            "block_size": self.block_size,
            "dtype": self.dtype,
            "e_layers": list(self.e_layers),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "PageFormat":
        return cls(**{**d, "e_layers": tuple(d.get("e_layers", ()))})


def block_hashes(tokens: list[int], block_size: int, salt: bytes = b"", parent: bytes = b"") -> list[bytes]:
    """Chain digests of the *full* blocks of `tokens` (a partial last block has no identity yet)."""
    out = []
    for i in range(len(tokens) // block_size):
        h = hashlib.sha256()
        h.update(parent)
        h.update(salt)
        h.update(torch.tensor(tokens[i * block_size : (i + 1) * block_size], dtype=torch.int64).numpy().tobytes())
        parent = h.digest()[:HASH_BYTES]
        out.append(parent)
    return out


def shared_blocks(donor_tokens: list[int], prompt: list[int], block_size: int) -> int:
    """Leading blocks of a donor's pages whose tokens the prompt repeats. At least one prompt token is
    left out, so a receiver always computes the logits it starts generating from."""
    n = min(len(donor_tokens) // block_size, (len(prompt) - 1) // block_size)
    for i in range(n):
        if donor_tokens[i * block_size : (i + 1) * block_size] != prompt[i * block_size : (i + 1) * block_size]:
            return i
    return n


@dataclass(slots=True)
class KVPages:
    """Consecutive pages of one context as produced by one model: the unit a donor hands a receiver.

    kv [n, len(layers), 2, H, B, D]; e [n, len(format.e_layers), B, hidden]; tokens = the n*B context
    tokens. `layers` is None when every layer is present; a receiver that recomputes some layers only
    needs the others' KV, so a subset travels. Implements the donor interface the engine reads
    (`e_layer`, `kv_layer`), which a streaming loader implements too so that recompute can start
    before every layer has arrived.
    """

    format: PageFormat
    producer: str
    fingerprint: str
    tokens: list[int]
    kv: torch.Tensor
    e: torch.Tensor
    hashes: list[bytes] = field(default_factory=list)
    derived_from: str = ""  # "" = the producer's own exact KV; else the donor+plan it was assembled from
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        n = len(self.tokens) // self.format.block_size
        if len(self.tokens) != n * self.format.block_size:
            raise KvRelayError(
                f"pages hold whole blocks: {len(self.tokens)} tokens is not a multiple of "
                f"block_size {self.format.block_size}"
            )
        nl = self.format.num_layers if self.layers is None else len(self.layers)
        if self.layers is not None and any(not 0 <= l < self.format.num_layers for l in self.layers):
            raise KvRelayError(f"page layers {self.layers} out of range for {self.format.num_layers} layers")
        want = (n, nl, *self.format.kv_shape[1:])
        if tuple(self.kv.shape) != want:
            raise KvRelayError(f"kv pages have shape {tuple(self.kv.shape)}, format wants {want}")
        if tuple(self.e.shape) != (n, *self.format.e_shape):
            raise KvRelayError(f"e pages have shape {tuple(self.e.shape)}, format wants {(n, *self.format.e_shape)}")
        if not self.hashes:
            self.hashes = block_hashes(self.tokens, self.format.block_size)

    @property
    def num_pages(self) -> int:
        return self.kv.shape[0]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def e_layer(self, layer: int) -> torch.Tensor:
        """Hidden states entering `layer` for every page token: [num_tokens, hidden]."""
        if layer not in self.format.e_layers:
            raise KvRelayError(
                f"pages from {self.producer!r} carry E for layers {list(self.format.e_layers)}, not for layer {layer}"
            )
        i = self.format.e_layers.index(layer)
        return self.e[:, i].reshape(-1, self.format.hidden_size)

    def kv_layer(self, layer: int) -> torch.Tensor:
        """K and V of one layer for every page: [n, 2, H, B, D]."""
        if self.layers is None:
            return self.kv[:, layer]
        if layer not in self.layers:
            raise KvRelayError(f"pages from {self.producer!r} carry KV for layers {list(self.layers)}, not {layer}")
        return self.kv[:, self.layers.index(layer)]

    def has_layers(self, layers) -> bool:
        return self.layers is None or set(layers) <= set(self.layers)

    def meta(self) -> dict:
        """Everything but the tensors, JSON-ready: travels beside kv/e/tokens (Triton, stores)."""
        return {
            "format": self.format.to_dict(),
            "producer": self.producer,
            "fingerprint": self.fingerprint,
            "derived_from": self.derived_from,
            "layers": None if self.layers is None else list(self.layers),
        }

    def reference(self) -> "KVPages":
        """The same pages with no KV and no E: what a repeat reuse sends when the receiver should
        still hold the hybrid KV it built from these pages (an engine then reuses its cached blocks,
        or, if they were evicted, falls back to a full prefill)."""
        return KVPages.reference_to(self.format, self.producer, self.fingerprint, self.tokens)

    @staticmethod
    def reference_to(fmt: PageFormat, producer: str, fingerprint: str, tokens: list[int]) -> "KVPages":
        """A reference to `producer`'s pages of `tokens` (whole blocks), made without them."""
        fmt = dataclasses.replace(fmt, e_layers=())
        n = len(tokens) // fmt.block_size
        return KVPages(
            fmt,
            producer,
            fingerprint,
            list(tokens[: n * fmt.block_size]),
            torch.empty((n, 0, *fmt.kv_shape[1:]), dtype=fmt.torch_dtype),
            torch.empty((n, *fmt.e_shape), dtype=fmt.torch_dtype),
            layers=(),
        )

    @property
    def is_reference(self) -> bool:
        return self.layers == () and not self.format.e_layers

    def prefix(self, num_pages: int) -> "KVPages":
        n = num_pages * self.format.block_size
        return KVPages(
            self.format,
            self.producer,
            self.fingerprint,
            self.tokens[:n],
            self.kv[:num_pages],
            self.e[:num_pages],
            self.hashes[:num_pages],
            self.derived_from,
            self.layers,
        )


# --- bytes on the wire / in a store ------------------------------------------------------------

MAC_VERSION = "m1"  # header tag of the authenticated format (older CRC-only blobs are rejected)
UNKEYED = b"kvrelay-page"  # the MAC key when a store has no secret: binds key + payload, forgeable


def _mac(secret: bytes, bind: bytes, head: str, payload: bytes) -> str:
    h = hmac.new(secret or UNKEYED, digestmod=hashlib.sha256)
    for part in (bind, head.encode(), payload):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()[:32]


def pack_tensor(t: torch.Tensor, bind: bytes = b"", secret: bytes = b"") -> bytes:
    """Raw tensor bytes behind a small header (dtype, shape) and a MAC: HMAC-SHA256 over `bind` (the
    store key the blob is written under: tenant, fingerprint, producer, block hash, layer), the header
    and the payload. A corrupt, truncated or moved blob fails it; with a secret, so does one forged
    by a writer who can reach the store but does not hold the secret."""
    t = t.detach().contiguous().cpu()
    payload = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    head = f"{MAC_VERSION}:{dtype_name(t.dtype)}:{','.join(map(str, t.shape))}"
    header = f"{head}:{_mac(secret, bind, head, payload)}".encode()
    return len(header).to_bytes(2, "little") + header + payload


def unpack_tensor(blob: bytes, bind: bytes = b"", secret: bytes = b"") -> torch.Tensor:
    """Inverse of pack_tensor; PageCorrupt (with its kind) if the header, size or MAC do not match or
    the values are not all finite."""
    try:
        hlen = int.from_bytes(blob[:2], "little")
        version, dt, shape_s, mac = blob[2 : 2 + hlen].decode().split(":")
        shape = tuple(int(x) for x in shape_s.split(",")) if shape_s else ()
        payload = blob[2 + hlen :]
        dtype = DTYPES[dt]
        if version != MAC_VERSION:
            raise ValueError(f"page format {version!r}, expected {MAC_VERSION!r}")
    except Exception as e:  # any malformed header
        raise PageCorrupt(f"unreadable page header: {e}") from None
    if len(payload) != dtype.itemsize * math.prod(shape):
        raise PageCorrupt(f"page payload is {len(payload)} bytes, header says {shape} {dt}")
    if not hmac.compare_digest(_mac(secret, bind, f"{version}:{dt}:{shape_s}", payload), mac):
        raise PageCorrupt("page authentication failed: corrupt, moved from another key or forged", "auth")
    t = (
        torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(shape)
        if payload
        else torch.empty(shape, dtype=dtype)
    )
    if not bool(torch.isfinite(t).all()):
        raise PageCorrupt("page holds non-finite values (NaN or infinity)", "non_finite")
    return t
