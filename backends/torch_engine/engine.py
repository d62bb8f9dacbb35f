"""The PyTorch engine: paged KV, prefix caching, DroidSpeak re-prefill, continuous-batching decode.

One engine serves one base model and any number of LoRA adapters over it, unmerged: a request
names its adapter (Request.adapter, "" = the base), `max_loras` adapters are resident at once (LRU,
pinned while a sequence uses one, read from disk on first use), and one decode step runs every
running sequence together whatever its adapter (backends/torch_engine/lora.py).

`add_request` may be called from any thread (it validates at once and queues); `step` runs on one
thread: it admits queued requests (prefill or re-prefill, then the first token) and then decodes one
token for every running sequence together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvrelay.model import fingerprint as fp
from kvrelay.model.engine_api import DonorKV, EngineConfig, PrefillInfo, Request, RequestOutput
from kvrelay.errors import KvRelayError, PlanError
from kvrelay.model import checkpoint as ck
from kvrelay.model.kv_format import DTYPES, KVPages, PageFormat, block_hashes, dtype_name, shared_blocks
from kvrelay.model.spec import ModelSpec, adapter_weights, read_hf_config
from kvrelay.model.plan import RecomputePlan

from .attention import DecodeAttention, DenseAttention, PagedKVPool, PrefillAttention
from .block_manager import BlockManager
from .config import ModelConfig
from .lora import LoraBatch, LoraWeights, load_lora
from .model import LlamaModel, load_weights, random_init
from .sampler import sample
from .weights import read_weights

log = logging.getLogger("kvrelay.engine")


@dataclass(frozen=True, slots=True)
class _Adapter:
    """A registered adapter: its files, the identity its pages carry, and the lowest layer it
    changes (PEFT layers_to_transform, or target modules that skip the first layers): below that
    layer its KV is the base's bit for bit, so the two share those layers' blocks."""

    files: ck.LoraAdapter
    model_id: str
    first_layer: int


@dataclass(frozen=True, slots=True)
class _LowerLayers:
    """Blocks in this engine whose lower layers a prompt can take as they are (same tokens, same
    weights in those layers): the leading `blocks` blocks under `hashes`, computed by `donor`."""

    donor: str  # model name (the base's, or an adapter's)
    layers: int  # layers [0, layers) copied; [layers, L) recomputed from the E kept at `layers`
    blocks: int
    hashes: list[bytes]


@dataclass(slots=True, eq=False)  # identity: a sequence is itself, not its contents
class Sequence:
    req: Request
    tokens: list[int]  # prompt + generated so far
    table: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)  # chain hashes of registered full blocks
    salt: bytes = b""  # prefix-cache scope of its blocks: the request's cache_salt, + donor and
    derived: str = ""  # plan when the KV is hybrid ("" = exact own KV)
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    prefill_sent: bool = False
    first_token_time_ns: int = 0
    admitted_at: int = 0
    model_id: str = ""  # the weights it runs: the base's, or its adapter's
    base_layers: int = 0  # its lowest layers whose weights are the base's (all for the base itself)
    lora: LoraWeights | None = None  # its adapter while admitted (pinned resident)

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_tokens)


class TorchEngine:
    def __init__(
        self,
        name: str,
        model_cfg: ModelConfig,
        model: LlamaModel,
        fingerprint: str,
        config: EngineConfig,
        model_dir: Path | None = None,
        weights_id: str = "",
    ):
        self.name, self.cfg, self.model, self.fingerprint, self.config = name, model_cfg, model, fingerprint, config
        self.model_dir = model_dir  # None for random weights
        self.weights = weights_id  # digest of the weights, or random-<family>-seed<n>
        self.model_id = f"{name}@{weights_id}" if weights_id else name  # identity of these exact weights
        self.num_layers = model_cfg.num_layers
        self.device = torch.device(config.device)
        self.max_model_len = config.max_model_len or model_cfg.max_position_embeddings
        self.page_format = PageFormat.for_model(
            model_cfg.num_layers,
            model_cfg.num_kv_heads,
            model_cfg.head_dim,
            model_cfg.hidden_size,
            config.block_size,
            config.dtype,
            config.e_layers,
        )
        num_blocks = config.kv_cache_bytes // self.page_format.page_bytes
        if num_blocks < 2:
            raise KvRelayError(
                f"kv_cache_bytes={config.kv_cache_bytes} holds {num_blocks} blocks of "
                f"{self.page_format.page_bytes} bytes; give the engine more cache"
            )
        self.pool = PagedKVPool(self.page_format, num_blocks, self.device)
        self.blocks = BlockManager(num_blocks)
        self._inbox: deque[Sequence] = deque()  # filled by add_request from any thread
        self._aborts: deque[str] = deque()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._admissions = 0
        self._active: set[str] = set()  # request ids queued or running
        # LoRA adapters: registered (name -> adapter on disk, its model id), resident (LRU), pins
        self._adapters: dict[str, _Adapter] = {}
        self._resident: OrderedDict[str, LoraWeights] = OrderedDict()
        self._pins: Counter[str] = Counter()
        self._adapters_lock = threading.Lock()  # register / remove come from other threads

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_spec(cls, spec: ModelSpec, config: EngineConfig | None = None) -> "TorchEngine":
        """The engine of one model of a family (kvrelay.model.spec): weights from its directory, or
        drawn from its seed for synthetic families (benchmarks of e.g. Llama-3-8B with nothing on disk)."""
        config = config or EngineConfig()
        mcfg = ModelConfig.from_hf(spec.hf_config)
        model = cls._build(mcfg, config)
        if spec.synthetic:
            random_init(model, spec.seed)
        else:
            load_weights(model, read_weights(spec.model_dir), spec.model_dir)
        return cls(spec.name, mcfg, model, spec.fingerprint, config, spec.model_dir, spec.weights)

    @classmethod
    def from_dir(cls, name: str, model_dir: str | Path, config: EngineConfig | None = None) -> "TorchEngine":
        return cls.from_spec(ModelSpec.from_dir(name, model_dir), config)

    @classmethod
    def with_adapters(
        cls, base: ModelSpec, variants: list[ModelSpec], config: EngineConfig | None = None
    ) -> "TorchEngine":
        """The base's engine with each variant's PEFT adapter registered under the variant's name and
        model id (so its pages and profiles are the merged model's). A full fine-tune has no adapter:
        an error naming it (it needs an engine of its own)."""
        engine = cls.from_spec(base, config)
        for v in variants:
            d = ck.adapter_dir(v.model_dir)
            if d is None:
                raise KvRelayError(
                    f"{v.name}: {v.model_dir} holds no PEFT adapter (adapter_config.json); a full "
                    "fine-tune is served by an engine of its own"
                )
            engine.add_adapter(v.name, d, v.model_id)
        return engine

    @staticmethod
    def _build(mcfg: ModelConfig, config: EngineConfig) -> LlamaModel:
        if config.dtype not in DTYPES:
            raise KvRelayError(f"dtype must be one of {sorted(DTYPES)}, got {config.dtype!r}")
        if config.device.startswith("cuda") and not torch.cuda.is_available():
            raise KvRelayError(f"device {config.device!r} asked for, but torch sees no CUDA device")
        prev = torch.get_default_dtype()
        torch.set_default_dtype(DTYPES[config.dtype])  # build in the target dtype: no fp32 copy of 8B weights
        try:
            with torch.device(config.device):
                model = LlamaModel(mcfg)
        finally:
            torch.set_default_dtype(prev)
        model.inv_freq = model.inv_freq.float()
        return model.eval().requires_grad_(False)

    # --- adapters -------------------------------------------------------------------------------

    def add_adapter(self, name: str, directory: str | Path, model_id: str | None = None) -> None:
        """Register a PEFT LoRA adapter over this engine's base (from any thread): checked now (config,
        tensor shapes against the base), read into memory on first use."""
        if not name or name == self.name:
            raise KvRelayError(f"adapter name {name!r} is empty or the base's own name")
        adapter = ck.read_adapter(Path(directory), self._hf_config())
        model_id = model_id or f"{name}@{adapter_weights(self.weights, adapter.weights)}"
        first = min((m.layer for m in adapter.modules), default=self.num_layers)
        with self._adapters_lock:
            if name in self._adapters:
                raise KvRelayError(f"adapter {name!r} is already registered on {self.name!r}")
            self._adapters[name] = _Adapter(adapter, model_id, first)

    def remove_adapter(self, name: str) -> None:
        """Unregister (from any thread): new requests for it are refused; running ones finish."""
        with self._adapters_lock:
            if self._adapters.pop(name, None) is None:
                raise KvRelayError(f"no adapter {name!r} registered on {self.name!r}")

    @property
    def adapters(self) -> dict[str, str]:
        """Registered adapter -> its model id."""
        with self._adapters_lock:
            return {n: a.model_id for n, a in self._adapters.items()}

    @property
    def resident_adapters(self) -> list[str]:
        """Model ids of the adapters in memory, least recently used first."""
        return list(self._resident)

    def _hf_config(self) -> dict:
        if self.model_dir is None:
            raise KvRelayError(f"{self.name}: random weights take no adapters (no config.json to check them against)")
        return read_hf_config(self.model_dir)

    def _pin_adapter(self, seq: Sequence) -> bool:
        """Make the sequence's adapter resident and pin it; False when every slot is pinned by
        running sequences (the sequence waits). Resident adapters are keyed by model id, so one
        re-registered under the same name with new weights never mixes with the old. Engine thread."""
        if not seq.req.adapter:
            return True
        key = seq.model_id
        w = self._resident.get(key)
        if w is None:
            if len(self._resident) >= max(1, self.config.max_loras):
                victim = next((k for k in self._resident if not self._pins[k]), None)
                if victim is None:
                    return False
                del self._resident[victim]
                self._pins.pop(victim, None)
            with self._adapters_lock:
                reg = self._adapters.get(seq.req.adapter)
            if reg is None or reg.model_id != key:
                raise KvRelayError(f"adapter {seq.req.adapter!r} ({key}) was removed from {self.name!r}")
            w = load_lora(seq.req.adapter, key, reg.files, self.model, self.pool.kv.dtype, self.device)
            self._resident[key] = w
        self._resident.move_to_end(key)
        self._pins[key] += 1
        seq.lora = w
        return True

    def _unpin_adapter(self, seq: Sequence) -> None:
        if seq.lora is not None:
            self._pins[seq.lora.model_id] -= 1
            seq.lora = None

    # --- requests -------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Validate now (errors reach the caller), run later in step()."""
        toks = request.prompt_tokens
        if not toks:
            raise KvRelayError("empty prompt: at least one token is needed")
        if min(toks) < 0 or max(toks) >= self.cfg.vocab_size:
            raise KvRelayError(f"token ids must be in 0..{self.cfg.vocab_size - 1}")
        request.sampling.validate(self.max_model_len)
        total = len(toks) + request.sampling.max_tokens
        if total > self.max_model_len:
            raise KvRelayError(
                f"prompt ({len(toks)} tokens) + max_tokens ({request.sampling.max_tokens}) = "
                f"{total} exceeds the model's context limit of {self.max_model_len} tokens"
            )
        need = -(-total // self.page_format.block_size)
        if need > self.blocks.num_blocks:
            raise KvRelayError(f"request needs {need} KV blocks; this engine's cache holds {self.blocks.num_blocks}")
        if request.donor is not None:
            self._check_donor(request.donor, request.plan)
        if request.request_id in self._active:
            raise KvRelayError(f"request_id {request.request_id!r} is already running on {self.name!r}")
        model_id, base_layers = self.model_id, self.num_layers
        if request.adapter:
            with self._adapters_lock:
                reg = self._adapters.get(request.adapter)
                if reg is None:
                    raise KvRelayError(
                        f"no adapter {request.adapter!r} on {self.name!r}; registered: "
                        f"{sorted(self._adapters) or 'none'}"
                    )
                model_id, base_layers = reg.model_id, reg.first_layer
        gen = None
        if request.sampling.seed is not None:
            gen = torch.Generator().manual_seed(request.sampling.seed)
        self._active.add(request.request_id)
        self._inbox.append(Sequence(request, list(toks), generator=gen, model_id=model_id, base_layers=base_layers))

    def _check_donor(self, donor: DonorKV, plan: RecomputePlan | None) -> None:
        if donor.derived_from:
            raise KvRelayError(
                f"pages from {donor.producer!r} were themselves derived from {donor.derived_from!r}; "
                "only a model's own KV can be a donor"
            )
        fp.require_same(donor.producer, donor.fingerprint, self.name, self.fingerprint)
        if not donor.format.compatible_with(self.page_format):
            raise KvRelayError(f"donor pages {donor.format} do not fit this engine's pages {self.page_format}")
        if plan is None:
            raise PlanError("a donor needs a recompute plan (RecomputePlan.none() to reuse every layer)")
        plan.validate(self.num_layers)
        if not _carries_payload(donor):
            return  # a reference: the hybrid blocks are expected in this engine's cache (checked at prefill)
        self._check_payload(donor, plan)

    def _check_payload(self, donor: DonorKV, plan: RecomputePlan) -> None:
        reused = plan.kv_layers_needed(self.num_layers)
        if not donor.has_layers(reused):
            raise PlanError(
                f"plan {plan} reuses layers {reused}, but pages from {donor.producer!r} carry KV "
                f"only for layers {list(donor.layers)}"
            )
        missing = [a for a in plan.e_layers_needed(self.num_layers) if a not in donor.format.e_layers]
        if missing:
            what = "starts recomputing or corrects K/V" if plan.correct_kv else "starts recomputing"
            raise PlanError(
                f"plan {plan} {what} at layers {missing}, but pages from "
                f"{donor.producer!r} carry E only for layers {list(donor.format.e_layers)}"
            )

    def abort(self, request_id: str) -> None:
        self._aborts.append(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._inbox or self.waiting or self.running or self._aborts)

    # --- the loop -------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        while self._inbox:
            self.waiting.append(self._inbox.popleft())
        outputs = self._apply_aborts()
        admitted, budget = [], self.config.max_prefill_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            blocks_needed = -(-(len(seq.tokens) + 1) // self.page_format.block_size)
            if blocks_needed > self.blocks.num_available or (admitted and len(seq.tokens) > budget):
                break
            try:
                if not self._pin_adapter(seq):
                    break  # every adapter slot busy: wait for one
            except KvRelayError as e:  # removed, or its files went bad, since it was queued
                self.waiting.popleft()
                self._finish(seq)
                outputs.append(RequestOutput(seq.req.request_id, [], list(seq.output), True, "abort", error=str(e)))
                continue
            self.waiting.popleft()
            budget -= len(seq.tokens)
            outputs.append(self._prefill(seq))
            admitted.append(seq)
        decoding = [s for s in self.running if s not in admitted]
        if decoding:
            outputs.extend(self._decode(decoding))
        return outputs

    def generate(self, requests: list[Request]) -> dict[str, RequestOutput]:
        """Run requests to completion; one merged output per request (tests, profiler, benchmarks)."""
        for r in requests:
            self.add_request(r)
        done: dict[str, RequestOutput] = {}
        while self.has_unfinished():
            for o in self.step():
                prev = done.get(o.request_id)
                if prev is not None:
                    o.prefill, o.pages = prev.prefill, prev.pages
                    o.logits = prev.logits + o.logits
                    o.first_token_time_ns = prev.first_token_time_ns
                done[o.request_id] = o
        return done

    # --- prefill --------------------------------------------------------------------------------

    def _prefill(self, seq: Sequence) -> RequestOutput:
        t0 = time.perf_counter()
        seq.admitted_at = self._admissions = self._admissions + 1
        req = seq.req
        if req.donor is not None:
            try:
                info, h_last = self._reprefill(seq, req.donor, req.plan.merged())
            except KvRelayError as e:  # the donor failed mid-load (store down, corrupt page): start over
                log.warning("request %s: donor pages failed (%s); full prefill instead", req.request_id, e)
                self.blocks.release(seq.table)
                seq.table, seq.hashes, seq.salt, seq.derived = [], [], req.cache_salt, ""
                req.donor = req.plan = None
                info, h_last = self._full_prefill(seq)
                info.donor_failed = str(e)
        else:
            info, h_last = self._full_prefill(seq)
        all_logits = self.model.logits(h_last)
        logits = all_logits[-1]
        self._sync()
        info.seconds = time.perf_counter() - t0
        first = not seq.prefill_sent  # a preempted sequence coming back does not report its prefill twice
        pages = self._export(seq) if first and req.export_pages else None  # before _emit may free blocks
        self.running.append(seq)
        out = self._emit(seq, logits)
        if first:
            out.prefill, out.pages, seq.prefill_sent = info, pages, True
            if req.sampling.prompt_logits:
                out.prompt_logits = all_logits.float().cpu()
        return out

    def _full_prefill(self, seq: Sequence) -> tuple[PrefillInfo, torch.Tensor]:
        B, L = self.page_format.block_size, self.num_layers
        toks = seq.tokens
        seq.salt = self._scope(seq)
        hashes = block_hashes(toks, B, salt=seq.salt)
        limit = (len(toks) - self._tail(seq)) // B  # keep >= 1 token to compute: its logits start generation
        cached = self.blocks.match_prefix(hashes[:limit]) if self.config.prefix_caching else []
        lower = self._lower_layers(seq, len(cached), limit)
        need, src = -(-len(toks) // B) - len(cached), []
        if lower is not None:  # take references first, so that our own allocation cannot evict them
            src = self.blocks.match_prefix(lower.hashes[: lower.blocks])
            self.blocks.release(src[: len(cached)])
            src = src[len(cached) :]
            if self.blocks.num_available < need:  # holding them leaves too little room: compute every layer
                self.blocks.release(src)
                src, lower = [], None
        seq.table = cached + self.blocks.allocate(need)
        start = len(cached) * B
        info = PrefillInfo(prompt_tokens=len(toks), cached_tokens=start)
        if lower is not None:
            h = self._copy_lower_layers(src, seq.table[len(cached) : len(cached) + len(src)], lower.layers)
            self.blocks.release(src)
            self._run(seq, None, start, lower.layers, L, h=h, capture_e=True)
            info.shared_tokens, info.shared_layers, info.shared_from = len(src) * B, lower.layers, lower.donor
            start += len(src) * B
        h = self._run(seq, toks[start:], start, 0, L, capture_e=True)
        self._register(seq, hashes)
        return info, h[-self._tail(seq) :]

    def _lower_layers(self, seq: Sequence, own: int, limit: int) -> _LowerLayers | None:
        """Where another model of this engine computed this prompt's blocks past our own `own` cached
        ones with the same weights in the lowest layers: the base for an adapter that leaves them
        untouched, or such an adapter for the base or another adapter. The longest run wins, then
        the most layers. Our own KV in those layers is theirs bit for bit, so it is taken as it is;
        the rest is recomputed from the hidden state they kept (E) where our weights start to differ."""
        if not (self.config.prefix_caching and self.config.share_lower_layers) or limit <= own or seq.base_layers == 0:
            return None
        B, salt = self.page_format.block_size, seq.req.cache_salt
        # (name, the adapter model id its blocks are scoped by: "" for the base, first adapted layer)
        donors = [(self.name, "", self.num_layers)] if seq.req.adapter else []
        with self._adapters_lock:
            donors += [(n, a.model_id, a.first_layer) for n, a in self._adapters.items() if a.first_layer > 0]
        best = None
        for name, adapter_id, first in donors:
            if adapter_id == seq.model_id:
                continue
            layers = max((l for l in self.page_format.e_layers if l <= min(first, seq.base_layers)), default=0)
            if layers == 0:
                continue
            hashes = block_hashes(seq.tokens[: limit * B], B, salt=_scope(salt, adapter_id))
            n = self.blocks.cached_prefix(hashes)
            if n > own and (best is None or (n, layers) > (best.blocks, best.layers)):
                best = _LowerLayers(name, layers, n, hashes)
        return best

    def _copy_lower_layers(self, src: list[int], dst: list[int], layers: int) -> torch.Tensor:
        """KV of layers [0, layers) and the E kept below `layers` from blocks src into dst; returns
        the E entering layer `layers` over those blocks' tokens, where recomputing starts."""
        s = torch.tensor(src, dtype=torch.long, device=self.device)
        d = torch.tensor(dst, dtype=torch.long, device=self.device)
        self.pool.kv[d, :layers] = self.pool.kv[s, :layers]
        below = sum(1 for l in self.page_format.e_layers if l < layers)
        self.pool.e[d, :below] = self.pool.e[s, :below]
        return self.pool.e[s, self.pool.e_index[layers]].flatten(0, 1)

    def _scope(self, seq: Sequence) -> bytes:
        """The prefix-cache scope of a sequence's own KV: its request's salt, and its adapter's
        weights (blocks of different weights never match)."""
        return _scope(seq.req.cache_salt, seq.model_id if seq.req.adapter else "")

    @staticmethod
    def _tail(seq: Sequence) -> int:
        """Prompt positions whose logits the prefill returns (and so must compute itself)."""
        return max(1, min(seq.req.sampling.prompt_logits, len(seq.tokens))) if not seq.prefill_sent else 1

    def _reprefill(self, seq: Sequence, donor: DonorKV, plan: RecomputePlan) -> tuple[PrefillInfo, torch.Tensor]:
        """DroidSpeak: recompute `plan`'s layer groups over the shared context from the donor's E,
        reuse the donor's KV in every other layer, then prefill the rest through all layers."""
        B, L = self.page_format.block_size, self.num_layers
        toks = seq.tokens
        n_reuse_blocks = min(shared_blocks(donor.tokens, toks, B), (len(toks) - self._tail(seq)) // B)
        if n_reuse_blocks == 0:
            info, h = self._full_prefill(seq)
            info.donor, info.donor_failed = donor.producer, "the donor's pages share no block with the prompt"
            return info, h
        own = donor.producer == seq.model_id and plan.num_recomputed == 0 and not plan.correct_kv
        # Our own KV coming back (evicted here, kept by a store): exact, so the request's own scope;
        # anything else is hybrid and salted with donor and plan too.
        seq.derived = "" if own else f"{donor.producer}|{donor.fingerprint}|{plan}"
        seq.salt = self._scope(seq) + (b"\x00" + seq.derived.encode() if seq.derived else b"")
        hashes = block_hashes(toks, B, salt=seq.salt)
        # Same donor and plan seen before: the hybrid blocks may still be cached here.
        hit = self.blocks.match_prefix(hashes[:n_reuse_blocks]) if self.config.prefix_caching else []
        seq.table = hit + self.blocks.allocate(-(-len(toks) // B) - len(hit))
        lo, n_reuse = len(hit) * B, n_reuse_blocks * B
        needs_payload = bool(plan.kv_layers_needed(L)) or bool(plan.e_layers_needed(L))
        if lo < n_reuse and needs_payload and not _carries_payload(donor):  # -> full prefill in _prefill
            raise KvRelayError(
                f"the hybrid KV of {donor.producer} + plan {plan} is no longer cached here "
                f"({len(hit)} of {n_reuse_blocks} blocks) and no donor pages came with the request"
            )
        if lo < n_reuse:
            for a, b in plan.groups:  # recompute groups first: they need only E, not the donor's KV
                h = (
                    self.model.embed(self._tensor(toks[lo:n_reuse]))
                    if a == 0
                    else donor.e_layer(a)[lo:n_reuse].to(self.device, self.pool.kv.dtype)
                )
                self._run(seq, None, lo, a, b, h=h)
            if plan.correct_kv:
                self._correct_kv(seq, donor, plan.reused_layers(L), toks, lo, n_reuse)
        reused = set(plan.kv_layers_needed(L)) if lo < n_reuse else set()
        fresh = torch.tensor(seq.table[len(hit) : n_reuse_blocks], dtype=torch.long, device=self.device)

        def load_layer(layer, _h):  # donor KV of a reused layer, fetched just before the suffix needs it
            if layer in reused:
                self.pool.kv[fresh, layer] = donor.kv_layer(layer)[len(hit) : n_reuse_blocks].to(
                    self.device, self.pool.kv.dtype
                )

        h = self._run(seq, toks[n_reuse:], n_reuse, 0, L, on_enter=load_layer)
        self._register(seq, hashes)
        info = PrefillInfo(
            prompt_tokens=len(toks),
            cached_tokens=len(hit) * B,
            reused_tokens=n_reuse,
            donor=donor.producer,
            reused_layers=L - plan.num_recomputed,
            recomputed_layers=plan.num_recomputed,
            plan=str(plan),
        )
        return info, h[-self._tail(seq) :]

    def _correct_kv(self, seq: Sequence, donor: DonorKV, layers: list[int], toks: list[int], lo: int, hi: int) -> None:
        """K/V correction: each reused layer's K, V over positions [lo, hi) rebuilt from the donor's E
        entering it (layer 0: the receiver's own embeddings) with this model's norm, k/v projections
        and RoPE, instead of the donor's K, V."""
        blocks, offs = self.pool.slots(seq.table, lo, hi)
        positions = torch.arange(lo, hi, device=self.device)
        for l in layers:
            h = (
                self.model.embed(self._tensor(toks[lo:hi]))
                if l == 0
                else donor.e_layer(l)[lo:hi].to(self.device, self.pool.kv.dtype)
            )
            k, v = self.model.layers[l].project_kv(
                h,
                *self.model.rope(positions, l),  # each layer's own RoPE
                lora=LoraBatch.single(seq.lora, hi - lo),
            )
            self.pool.write_kv(l, blocks, offs, k, v)

    def _run(
        self, seq: Sequence, tokens, start: int, first: int, last: int, h=None, capture_e=False, on_enter=None
    ) -> torch.Tensor:
        """Layers [first, last) over the sequence's tokens at positions start.. (h given or embedded)."""
        if h is None:
            h = self.model.embed(self._tensor(tokens))
        n = h.shape[0]
        attn = PrefillAttention(self.pool, seq.table, start, n)
        if capture_e:

            def on_enter(layer, x):
                self.pool.write_e(layer, attn.blocks, attn.offs, x)

        positions = torch.arange(start, start + n, device=self.device)
        return self.model.run_layers(
            h, positions, attn, first, last, on_enter=on_enter, lora=LoraBatch.single(seq.lora, n)
        )

    # --- decode ---------------------------------------------------------------------------------

    def _decode(self, seqs: list[Sequence]) -> list[RequestOutput]:
        B = self.page_format.block_size
        for s in sorted(seqs, key=lambda s: s.admitted_at):
            if s in self.running and len(s.table) * B < len(s.tokens):
                self._grow(s)
        # rows grouped by adapter: each adapter's weights are read once per step
        seqs = sorted((s for s in seqs if s in self.running), key=lambda s: s.req.adapter)
        if not seqs:
            return []
        attn = DecodeAttention(self.pool, [s.table for s in seqs], [len(s.tokens) for s in seqs])
        h = self.model.embed(self._tensor([s.tokens[-1] for s in seqs]))
        positions = torch.tensor([len(s.tokens) - 1 for s in seqs], device=self.device)

        def capture_e(layer, x):
            self.pool.write_e(layer, attn.blocks, attn.offs, x)

        h = self.model.run_layers(h, positions, attn, 0, self.num_layers, on_enter=capture_e, lora=_segments(seqs))
        logits = self.model.logits(h)
        outs = []
        for i, s in enumerate(seqs):
            self._register(s, None)
            outs.append(self._emit(s, logits[i]))
        return outs

    def _grow(self, seq: Sequence) -> None:
        """One more block for a decoding sequence, preempting the newest others if the cache is full."""
        while self.blocks.num_available == 0:
            victim = max((s for s in self.running if s is not seq), key=lambda s: s.admitted_at, default=None)
            if victim is None:
                raise KvRelayError("KV cache too small for a single sequence")
            self._preempt(victim)
        seq.table += self.blocks.allocate(1)

    def _preempt(self, seq: Sequence) -> None:
        """Free a sequence's blocks; it re-prefills prompt + output so far when re-admitted."""
        self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.table, seq.hashes = [], []
        self._unpin_adapter(seq)
        self.waiting.appendleft(seq)

    # --- outputs --------------------------------------------------------------------------------

    def _emit(self, seq: Sequence, logits: torch.Tensor) -> RequestOutput:
        sp = seq.req.sampling
        stops = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.cfg.eos_token_ids))
        early = len(seq.output) < sp.min_tokens
        banned = self._banned(seq, stops if early else ())
        tok = sample(
            logits.index_fill(0, torch.tensor(banned, device=logits.device), float("-inf")) if banned else logits,
            sp.temperature,
            sp.top_p,
            sp.top_k,
            seq.generator,
        )
        if not seq.output:
            seq.first_token_time_ns = time.time_ns()
        seq.tokens.append(tok)
        seq.output.append(tok)
        out = RequestOutput(
            seq.req.request_id, [tok], list(seq.output), False, first_token_time_ns=seq.first_token_time_ns
        )
        if len(seq.output) <= sp.return_logits:
            out.logits = [logits.float().cpu().clone()]
        stopped = not early and (
            tok in stops or any(s and tuple(seq.output[-len(s) :]) == s for s in sp.stop_sequences)
        )
        if stopped or len(seq.output) >= sp.max_tokens:
            out.finished, out.finish_reason = True, "stop" if stopped else "length"
            self._finish(seq)
        return out

    @staticmethod
    def _banned(seq: Sequence, stops) -> list[int]:
        """Tokens the next step may not pick: stop tokens before min_tokens, and the last token of a
        bad-words sequence whose other tokens the output just produced."""
        out = seq.output
        banned = set(stops)
        for b in seq.req.sampling.bad_sequences:
            if b and (len(b) == 1 or tuple(out[-(len(b) - 1) :]) == tuple(b[:-1])):
                banned.add(b[-1])
        return sorted(banned)

    def _finish(self, seq: Sequence) -> None:
        self._active.discard(seq.req.request_id)
        if seq in self.running:
            self.running.remove(seq)
        self.blocks.release(seq.table)
        seq.table = []
        self._unpin_adapter(seq)

    def _apply_aborts(self) -> list[RequestOutput]:
        outs = []
        while self._aborts:
            rid = self._aborts.popleft()
            for s in [s for s in self.running + list(self.waiting) if s.req.request_id == rid]:
                if s in self.waiting:
                    self.waiting.remove(s)
                self._finish(s)
                outs.append(RequestOutput(rid, [], list(s.output), True, "abort"))
        return outs

    def _register(self, seq: Sequence, hashes: list[bytes] | None) -> None:
        """Publish full blocks not yet registered (prefill passes its hashes; decode extends the chain)."""
        if not self.config.prefix_caching:
            return
        B = self.page_format.block_size
        full = len(seq.tokens) // B  # every token of seq.tokens has its KV in the cache by now
        if hashes is None:
            parent = seq.hashes[-1] if seq.hashes else b""
            hashes = seq.hashes + block_hashes(seq.tokens[len(seq.hashes) * B : full * B], B, seq.salt, parent)
        for i in range(len(seq.hashes), min(full, len(hashes))):
            self.blocks.register(seq.table[i], hashes[i])
        seq.hashes = list(hashes[:full])

    def _export(self, seq: Sequence) -> KVPages:
        """The prompt's full blocks as pages. A re-prefilled prompt's KV is hybrid: it is exported
        without E and marked derived_from, and no engine or store accepts it as a donor's own."""
        B = self.page_format.block_size
        n = seq.prompt_len // B
        idx = torch.tensor(seq.table[:n], dtype=torch.long, device=self.device)
        fmt, e = self.page_format, self.pool.e[idx].clone()
        if seq.derived:
            fmt = PageFormat(**{**fmt.to_dict(), "e_layers": ()})
            e = e[:, :0]
        return KVPages(
            fmt,
            seq.model_id,
            self.fingerprint,
            seq.req.prompt_tokens[: n * B],
            self.pool.kv[idx].clone(),
            e,
            block_hashes(seq.req.prompt_tokens[: n * B], B),
            seq.derived,
        )

    # --- helpers --------------------------------------------------------------------------------

    def _tensor(self, tokens: list[int]) -> torch.Tensor:
        return torch.tensor(tokens, dtype=torch.long, device=self.device)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward_dense(self, tokens: list[int]) -> torch.Tensor:
        """Logits at every position with no cache at all (the unpaged reference)."""
        h = self.model.embed(self._tensor(tokens))
        h = self.model.run_layers(
            h, torch.arange(len(tokens), device=self.device), DenseAttention(), 0, self.num_layers
        )
        return self.model.logits(h)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.pool.kv.dtype)


def _segments(seqs: list[Sequence]) -> LoraBatch | None:
    """The decode batch's adapter segments (seqs sorted by adapter); None when all run the base."""
    segs, i = [], 0
    while i < len(seqs):
        j = i
        while j < len(seqs) and seqs[j].lora is seqs[i].lora:
            j += 1
        if seqs[i].lora is not None:
            segs.append((seqs[i].lora, i, j))
        i = j
    return LoraBatch(segs) if segs else None


def _scope(salt: bytes, adapter_model_id: str) -> bytes:
    """Prefix-cache scope: the tenant's salt, and an adapter's weights ("" = the base's)."""
    return salt + (b"\x00lora\x00" + adapter_model_id.encode() if adapter_model_id else b"")


def _carries_payload(donor: DonorKV) -> bool:
    """False for a reference (KVPages.reference: no KV, no E): "the hybrid KV of this donor and plan
    should still be in your prefix cache" (the orchestrator remembers the reuses it ran), so a
    repeat does not move the donor's pages again."""
    return not donor.is_reference
