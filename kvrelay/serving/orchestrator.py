"""The serving core: one process holds every variant's engine, the page store and the router.

A request's whole path runs here, free of Triton: validate, ask the Router for its route (coalescing,
store lookup, plan choice, donor pages; kvrelay.serving.router), run the receiver's engine (full
prefill, restore or DroidSpeak re-prefill), forward each output to a Sink, tell the Router what was
computed (it publishes). Triton's models are thin adapters: they turn tensors into a ServeRequest and
Replies back into tensors (kvrelay.triton.orchestrator).

Why one process: engines reached over Triton BLS from a multi-threaded orchestrator crashed the
Python backend of Triton 2.51 (it frees numpy arrays of BLS responses without holding the GIL; see
docs/serving.md). Engines in-process also hand pages over as tensors, not copies.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from kvrelay.engines import make_engine
from kvrelay.families import family_spec
from kvrelay.errors import KvRelayError
from kvrelay.model import checkpoint as ck
from kvrelay.model.engine_api import Engine, EngineConfig, PrefillInfo, Request, RequestOutput, SamplingParams
from kvrelay.model.kv_format import KVPages
from kvrelay.paths import profiles_dir
from kvrelay.serving import deployment as dp
from kvrelay.serving.engine_runner import EngineFailure, EngineRunner
from kvrelay.serving.router import Decision, Router
from kvrelay.serving.metrics import Metrics, NoMetrics
from kvrelay.serving.routes import RouteKind
from kvrelay.serving.selector import OnlineLatency, Selector
from kvrelay.store import open_store
from kvrelay.store.base import PageStore

log = logging.getLogger("kvrelay.orchestrator")
CANCEL_POLL_S = 0.5  # how often a request waiting on its engine asks whether the client left ...
CANCEL_EVERY = 8  # ... and every this many outputs (a client that hung up mid-stream)
MAX_LABEL_CHARS = 128  # tenant and request_id: store keys and log lines, not documents


class ClientGone(Exception):
    """The client cancelled or disconnected: stop its request, nobody is listening."""


@dataclass(slots=True)
class ServeRequest:
    tokens: list[int]
    max_tokens: int
    model: str = ""  # "" = the deployment's first model
    stream: bool = False  # every token as it comes, else one final reply
    tenant: str = "default"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)  # tokenized stop words, -1 between them
    bad_ids: list[int] = field(default_factory=list)  # tokenized bad words, -1 between them
    min_tokens: int = 0  # tensorrtllm_backend's min_length
    end_id: int | None = None  # an extra end-of-sequence token
    top_k: int = 0
    request_id: str = ""
    entry: str = "ensemble"  # the Triton entry point the client used (metrics label)
    lora_path: str = ""  # a PEFT adapter directory on the server: registered as `model` if new
    # (lora = "unmerged"), as tensorrtllm_backend's lora_weights with a task id


@dataclass(slots=True)
class Reply:
    output_ids: list[int]  # every token generated so far
    prev_len: int  # tokens the client already has (streaming), 0 otherwise
    finished: bool
    route: str  # "<kind>: <reason>"
    donor: str = ""
    reused_layers: int = 0
    recomputed_layers: int = 0
    reused_tokens: int = 0
    first_token_time_ns: int = 0  # wall clock (epoch ns) when the engine produced the first token
    model: str = ""  # the variant that answered

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)


class Sink(Protocol):
    def send(self, reply: Reply) -> None: ...  # raises ClientGone when the client left
    def cancelled(self) -> bool: ...


class Orchestrator:
    def __init__(
        self,
        dep: dp.Deployment,
        engines: dict[str, Engine] | None = None,
        metrics: Metrics | None = None,
        store: PageStore | None = None,
        selector: Selector | None = None,
    ):
        """engines: name -> Engine (default: built from the deployment); store/selector likewise."""
        self.dep = dep
        self.ids = dp.identities(dep)
        self.store = store if store is not None else open_store(dep.store)
        # with an SLO, the selector's idle rule (the most recompute whose predicted prefill meets it)
        # runs on a latency model fitted to this server's own prefills
        self.latency = OnlineLatency() if dep.slo_s else None
        self.selector = selector or Selector(
            profiles_dir(dep.profiles_dir),
            dep.family,
            quality_target=dep.quality_target,
            latency=self.latency,
            quality_mode=dep.quality_mode,
            e_layers=_e_layers(dep, self.ids),
        )
        self.metrics = metrics or NoMetrics()
        self.store.on_reject = self.metrics.page_rejected  # each dropped page: logged by the store, counted here
        self.router = Router(dep, self.ids, self.store, self.selector, self.metrics)
        self.in_flight = 0
        self._count_lock = threading.Lock()
        engines = engines if engines is not None else build_engines(dep)
        # one runner per engine; with unmerged LoRA several models name the same engine and run on it
        # as its adapters (Request.adapter), decoded in one batch
        self.runners: dict[str, EngineRunner] = {}
        self.adapter_of: dict[str, str] = {}
        by_engine: dict[int, EngineRunner] = {}
        n_cpu = len({id(e) for name, e in engines.items() if dep.model(name).device == "cpu"})
        for name, e in engines.items():
            if id(e) not in by_engine:
                by_engine[id(e)] = EngineRunner(e, threads=_threads(dep, name, n_cpu))
            self.runners[name] = by_engine[id(e)]
            self.adapter_of[name] = name if name in e.adapters else ""
        self._base = family_spec(dep.family).base
        self._runtime_adapters: dict[str, str] = {}
        self._adapters_lock = threading.Lock()

    # --- adapters registered while serving ----------------------------------------------------------

    def add_adapter(self, name: str, directory: str) -> None:
        """Serve the PEFT adapter in `directory` as variant `name` from now on (lora = "unmerged"):
        checked against the base (clear errors, nothing registered), then a variant like the others,
        with no profiles (full prefill) until it has some. The same name and directory again is a
        no-op; another directory under a served name is refused. Not written to the family: gone
        when the server stops (vLLM's /v1/load_lora_adapter does the same)."""
        with self._adapters_lock:
            known = self._runtime_adapters.get(name)
            if known is not None:
                if known != str(directory):
                    raise KvRelayError(f"variant {name!r} is already served from {known}; pick another name")
                return
            if name in self.ids:
                raise KvRelayError(f"variant {name!r} is one of the deployment's models; it cannot be replaced")
            if self.dep.lora != "unmerged":
                raise KvRelayError('adapters can be added while serving only with lora = "unmerged" in the deployment')
            base = self.runners.get(self._base)
            if base is None:
                raise KvRelayError(
                    f"the family's base {self._base!r} is not in this deployment; adapters run on its engine"
                )
            me = self.ids[self._base]
            adapter = ck.read_adapter(Path(directory), me.spec.hf_config)  # clear errors before anything changes
            ident = dp.ServedModel(me.spec.adapter_over(name, adapter.weights), me.page_format)
            base.engine.add_adapter(name, directory, ident.model_id)
            # copy-on-write: the router and routes read these dicts on other threads without locks
            self.ids = {**self.ids, name: ident}
            self.router.ids = self.ids
            self.runners = {**self.runners, name: base}
            self.adapter_of = {**self.adapter_of, name: name}
            self._runtime_adapters[name] = str(directory)
        log.info("adapter %s registered from %s (%s)", name, directory, ident.model_id)

    # --- one request ------------------------------------------------------------------------------

    def serve(self, req: ServeRequest, sink: Sink) -> None:
        """Run one request to its end on the calling thread, replies to `sink`. Raises KvRelayError
        for bad input (the caller's), EngineFailure for the server's own failures, ClientGone when
        the client left."""
        with self._count_lock:
            self.in_flight += 1
        try:
            self._serve(req, sink)
        finally:
            with self._count_lock:
                self.in_flight -= 1

    def _serve(self, req: ServeRequest, sink: Sink) -> None:
        receiver = req.model or self.dep.models[0].name
        if req.lora_path:
            self.add_adapter(receiver, req.lora_path)
        if receiver not in self.ids:
            raise KvRelayError(f"unknown model {receiver!r}; this deployment serves {self.dep.model_names}")
        me = self.ids[receiver]
        tokens, max_tokens = req.tokens, req.max_tokens
        if not 1 <= max_tokens <= self.dep.max_tokens_limit:
            raise KvRelayError(
                f"max_tokens must be in 1..{self.dep.max_tokens_limit}, got {max_tokens}"
                + (
                    " (max_tokens is INT32: Triton's HTTP front end wraps a JSON number of 2^31 or more modulo 2^32 "
                    "before kvrelay sees it)"
                    if max_tokens <= 0
                    else ""
                )
            )
        if not tokens:
            raise KvRelayError("the prompt is empty")
        if not 0 <= req.min_tokens <= max_tokens:
            raise KvRelayError(f"min_length must be in 0..max_tokens ({max_tokens}), got {req.min_tokens}")
        if req.top_k < 0:
            raise KvRelayError(f"top_k must be >= 0, got {req.top_k}")
        if req.end_id is not None and req.end_id < 0:
            raise KvRelayError(f"end_id must be a token id (>= 0), got {req.end_id}")
        if len(tokens) + max_tokens > me.max_model_len:
            raise KvRelayError(
                f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"{me.max_model_len}-token context of {receiver!r}"
            )
        for name, value in (("tenant", req.tenant), ("request_id", req.request_id)):
            if len(value) > MAX_LABEL_CHARS or not value.isprintable():
                raise KvRelayError(
                    f"{name} must be at most {MAX_LABEL_CHARS} printable characters, got {len(value)} characters"
                )
        d = self.router.decide(receiver, req.tenant, self.cache_scope(req), tokens, queued=max(0, self.in_flight - 1))
        call = _Call(d, me, req, sink)
        try:
            donor = self.router.pages(d, tokens, req.entry)
            try:
                self._run(call, donor)
            except _DonorRefused as e:  # e.g. a stale page: degrade to a correct full prefill
                self.router.donor_refused(d, str(e))
                self._run(call, None)
        finally:
            self.router.finish(d)

    def cache_scope(self, req: ServeRequest) -> str:
        """Which engine prefix-cache blocks a request may hit: its tenant's, unless the deployment
        shares them. Without this, tenant B's first request on a context tenant A just sent is a
        prefix hit, and its latency tells B what A sent (the store is keyed by tenant already)."""
        return "" if self.dep.shared_prefix_cache else req.tenant

    def _run(self, call: "_Call", donor: KVPages | None) -> None:
        req = call.req
        plan = call.d.plan if donor is not None else None
        sampling = SamplingParams(
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            seed=req.seed,
            stop_sequences=split_stops(req.stop_ids),
            stop_token_ids=() if req.end_id is None else (req.end_id,),
            min_tokens=req.min_tokens,
            bad_sequences=split_stops(req.bad_ids),
        )
        rid = f"{req.request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        outputs: queue.Queue = queue.Queue()
        runner = self.runners[call.me.name]
        try:
            runner.submit(
                Request(
                    rid,
                    list(req.tokens),
                    sampling,
                    donor=donor,
                    plan=plan,
                    export_pages=call.d.route.export,
                    cache_salt=call.d.scope.encode(),
                    adapter=self.adapter_of[call.me.name],
                ),
                lambda o, e: outputs.put((o, e)),
            )
        except EngineFailure:
            raise
        except KvRelayError as e:
            if donor is not None:
                raise _DonorRefused(str(e)) from None
            raise
        try:
            n = 0
            while True:
                try:
                    out, err = outputs.get(timeout=CANCEL_POLL_S)
                except queue.Empty:
                    if call.sink.cancelled():
                        raise ClientGone() from None
                    continue
                if err is not None:
                    raise err
                self._forward(out, call)
                if out.finished:
                    return
                n += 1
                if n % CANCEL_EVERY == 0 and call.sink.cancelled():
                    raise ClientGone()
        except BaseException:
            runner.abort(rid)  # client gone, or our own failure: free the engine's slot
            raise

    def _forward(self, out: RequestOutput, call: "_Call") -> None:
        if out.prefill is not None:
            self._prefill_done(out.prefill, call, out)
        if not (call.req.stream or out.finished):
            return
        route, info = call.d.route, call.info
        reusing = route.kind in (RouteKind.REUSE, RouteKind.RESTORE) and info is not None
        ids = list(out.output_tokens)
        # what the client is told of the context's KV: the donor's (reuse, restore), else this engine's
        # prefix cache plus the lower layers another model of the engine computed with the same weights
        donor, reused_layers, recomputed_layers, reused_tokens = "", 0, 0, 0
        if reusing:
            donor, reused_layers, recomputed_layers = route.donor, info.reused_layers, info.recomputed_layers
            reused_tokens = info.reused_tokens
        elif info is not None:
            reused_tokens = info.cached_tokens + info.shared_tokens
            if info.shared_tokens:
                donor, reused_layers = info.shared_from, info.shared_layers
                recomputed_layers = call.me.num_layers - info.shared_layers
        call.sink.send(
            Reply(
                output_ids=ids,
                prev_len=max(len(ids) - 1, 0) if call.req.stream else 0,
                finished=out.finished,
                route=f"{route.kind}: {route.reason}",
                donor=donor,
                reused_layers=reused_layers,
                recomputed_layers=recomputed_layers,
                reused_tokens=reused_tokens,
                first_token_time_ns=out.first_token_time_ns or call.first_token_time_ns,
                model=call.me.name,
            )
        )
        call.first_token_time_ns = call.first_token_time_ns or out.first_token_time_ns

    def _prefill_done(self, info: PrefillInfo, call: "_Call", out: RequestOutput) -> None:
        call.info = info
        self.metrics.prefill(call.req.entry, call.d.route, call.me.name, asdict(info))
        if self.latency is not None:
            if info.reused_tokens and not info.donor_failed:
                self.latency.observe(info.reused_tokens, info.recomputed_layers, info.seconds)
            elif not info.cached_tokens:
                self.latency.observe(info.prompt_tokens, call.me.num_layers, info.seconds)
        self.router.prefill_done(call.d, info, out.pages, call.req.tokens, call.req.entry)

    def close(self) -> None:
        for r in {id(r): r for r in self.runners.values()}.values():
            r.close()
        self.router.close()
        self.store.close()


class _DonorRefused(Exception):
    pass


class _Call:
    """One request's state across its engine outputs."""

    __slots__ = ("d", "me", "req", "sink", "info", "first_token_time_ns")

    def __init__(self, d: Decision, me, req: ServeRequest, sink: Sink):
        self.d, self.me, self.req, self.sink = d, me, req, sink
        self.info: PrefillInfo | None = None
        self.first_token_time_ns = 0


def split_stops(flat) -> tuple[tuple[int, ...], ...]:
    """stop_ids arrive flattened with -1 between sequences."""
    out, cur = [], []
    for t in flat:
        if t == -1:
            if cur:
                out.append(tuple(cur))
            cur = []
        else:
            cur.append(int(t))
    if cur:
        out.append(tuple(cur))
    return tuple(out)


def _e_layers(dep: dp.Deployment, ids: dict) -> tuple[int, ...]:
    """Layers every model's pages carry E for (the selector serves only plans that need no other)."""
    sets = [set(i.page_format.e_layers) for i in ids.values()]
    return tuple(sorted(set.intersection(*sets))) if sets else ()


def build_engines(dep: dp.Deployment) -> dict:
    """Model name -> its engine (dp.engine_groups: with unmerged LoRA, variants share the base's,
    whose KV cache is the largest of their kv_cache_bytes: one pool, set once, however many
    adapters share it)."""
    ids = dp.identities(dep)  # the engines' pages are the identities' page formats (E layers included)
    out = {}
    for m in dep.models:
        if m.instances != 1:
            raise KvRelayError(
                f"model {m.name}: instances = {m.instances}; the in-process engines serve one "
                "instance per model (run more servers behind a shared Redis store to scale out)"
            )
    for engine, members in dp.engine_groups(dep).items():
        m = dep.model(members[0])
        adapters = [n for n in members if n != engine]
        e = make_engine(
            dep.family,
            engine,
            EngineConfig(
                device=m.device,
                dtype=m.dtype,
                block_size=dep.block_size,
                max_loras=dep.max_loras,
                kv_cache_bytes=max(dep.model(n).kv_cache_bytes for n in members),
                prefix_caching=dep.prefix_caching,
                share_lower_layers=dep.sharing,
                e_layers=ids[m.name].page_format.e_layers,
            ),
            adapters=adapters,
        )
        out.update({n: e for n in members})
    return out


def _threads(dep: dp.Deployment, name: str, cpu_engines: int) -> int:
    m = dep.model(name)
    return dep.cpu_threads(name, engines=cpu_engines) if m.device == "cpu" else 0
