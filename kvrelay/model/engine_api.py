"""What an inference engine offers kvrelay, independent of how it runs the model.

The PyTorch engine (kvrelay.backends.torch_engine) implements it; a TensorRT-LLM engine can too:
its paged pool already has the page layout of kvrelay.model.kv_format, `Request.donor` maps onto a KV-cache
connector's `start_load_kv` / `wait_for_layer_load`, and exporting pages onto `save_kv_layer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvrelay.errors import KvRelayError
from kvrelay.model.kv_format import KVPages, PageFormat
from kvrelay.model.plan import RecomputePlan


@dataclass(slots=True)
class EngineConfig:
    """Engine settings any backend takes (the PyTorch engine reads them all)."""

    device: str = "cpu"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    block_size: int = 16
    kv_cache_bytes: int = 2 << 30  # KV + E pool cap; sets the number of blocks
    max_num_seqs: int = 64  # sequences decoding together (continuous batching)
    max_prefill_tokens: int = 8192  # prompt tokens prefilled per step before decoding resumes
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    e_layers: tuple[int, ...] | None = None  # layers whose entering hidden state is kept for export;
    # None = every 2nd layer (the profiler's stride-2 group starts)
    prefix_caching: bool = True
    share_lower_layers: bool = True  # take untouched lower layers' KV from another model's blocks
    # in this engine (False: each model prefills every layer itself; the no-sharing baseline)
    max_loras: int = 4  # LoRA adapters resident at once (LRU; the rest stay on disk)


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # multi-token stops (tokenized stop words)
    ignore_eos: bool = False
    min_tokens: int = 0  # no stop (EOS, stop ids, stop sequences) before this many tokens
    bad_sequences: tuple[tuple[int, ...], ...] = ()  # never generated (tokenized bad words)
    return_logits: int = 0  # full next-token logits for the first N generated tokens
    prompt_logits: int = 0  # and for the last N prompt positions (teacher forcing: row i
    # predicts the token after prompt position len-N+i; the last row
    # is the first generated token's); those N positions are computed,
    # never taken from a cache or a donor

    def validate(self, max_tokens_limit: int) -> "SamplingParams":
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_tokens_limit:
            raise KvRelayError(f"max_tokens must be an integer in 1..{max_tokens_limit}, got {self.max_tokens!r}")
        if not (self.temperature >= 0 and self.temperature < float("inf")):
            raise KvRelayError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise KvRelayError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise KvRelayError(f"top_k must be >= 0, got {self.top_k!r}")
        if not isinstance(self.prompt_logits, int) or self.prompt_logits < 0:
            raise KvRelayError(f"prompt_logits must be an integer >= 0, got {self.prompt_logits!r}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise KvRelayError(f"min_tokens must be in 0..max_tokens ({self.max_tokens}), got {self.min_tokens!r}")
        return self


class DonorKV(Protocol):
    """Another model's KV for a context prefix. KVPages is one; a streaming store loader is another
    (its e_layer / kv_layer block until that layer has arrived)."""

    format: PageFormat
    producer: str  # model id of the weights that computed it
    fingerprint: str
    tokens: list[int]
    derived_from: str  # "" = the producer's own exact KV; else hybrid (never a donor)
    layers: tuple[int, ...] | None  # the layers whose KV it carries (None = every layer)

    @property
    def num_tokens(self) -> int: ...
    @property
    def is_reference(self) -> bool: ...  # no payload: "the hybrid KV should still be in your cache"
    def has_layers(self, layers) -> bool: ...
    def e_layer(self, layer: int) -> torch.Tensor: ...
    def kv_layer(self, layer: int) -> torch.Tensor: ...


@dataclass(slots=True)
class Request:
    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    donor: DonorKV | None = None  # re-prefill from these pages ...
    plan: RecomputePlan | None = None  # ... recomputing these layer groups (required with donor)
    export_pages: bool = False  # return this prompt's full-block pages (KV + E) after prefill
    cache_salt: bytes = b""  # prefix-cache scope: blocks are shared only between equal salts
    # (vLLM's cache_salt; the orchestrator puts the tenant in it)
    adapter: str = ""  # the LoRA adapter to run, by its registered name ("" = the base);
    # vLLM's lora_request, tensorrtllm_backend's lora_task_id


@dataclass(slots=True)
class PrefillInfo:
    prompt_tokens: int
    cached_tokens: int = 0  # same-model prefix-cache hit
    reused_tokens: int = 0  # tokens whose KV came from the donor
    donor: str = ""
    reused_layers: int = 0
    recomputed_layers: int = 0
    plan: str = ""  # the recompute plan run ("" for a plain prefill)
    seconds: float = 0.0
    donor_failed: str = ""  # why donor pages given with the request were not used ("": they were,
    # or none were given); the prefill was then a full one
    # Exact lower-layer sharing inside one engine: tokens whose KV in layers [0, shared_layers) came
    # from blocks another model of the engine computed with the same weights there (an adapter that
    # leaves them untouched, or the base); their upper layers were recomputed. Own KV, not hybrid.
    shared_tokens: int = 0
    shared_layers: int = 0
    shared_from: str = ""  # that model's name


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_tokens: list[int]
    output_tokens: list[int]
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prefill: PrefillInfo | None = None  # on the first output of a request
    pages: KVPages | None = None  # with export_pages, on the first output
    logits: list[torch.Tensor] = field(default_factory=list)  # with return_logits, as they come
    prompt_logits: torch.Tensor | None = None  # with prompt_logits: [N, vocab], on the first output
    first_token_time_ns: int = 0
    error: str = ""  # why an "abort" ended it when the engine did (adapter removed)


class Engine(Protocol):
    name: str
    fingerprint: str
    page_format: PageFormat
    num_layers: int

    def add_request(self, request: Request) -> None: ...
    def step(self) -> list[RequestOutput]: ...
    def abort(self, request_id: str) -> None: ...
    def has_unfinished(self) -> bool: ...

    @property
    def adapters(self) -> dict[str, str]: ...  # LoRA adapters it serves: name -> model id
    def add_adapter(self, name: str, directory, model_id: str | None = None) -> None: ...
    def remove_adapter(self, name: str) -> None: ...
