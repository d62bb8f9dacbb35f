"""The serving core: one process holds every variant's engine, the page store and the router.

A request's whole path runs here, free of Triton: validate, wait for an in-flight prefill of the same
context (coalescing), route (store lookup, plan choice), fetch the donor's pages, run the receiver's
engine (full prefill, restore or DroidSpeak re-prefill), forward each output to a Sink, publish the
prompt's pages. Triton's models are thin adapters: they turn tensors into a ServeRequest and Replies
back into tensors (kvrelay.triton.orchestrator).

Why one process: engines reached over Triton BLS from a multi-threaded orchestrator crashed the
Python backend of Triton 2.51 (it frees numpy arrays of BLS responses without holding the GIL; see
the README's "Serving" section). Engines in-process also hand pages over as tensors, not copies.
"""
from __future__ import annotations

import logging
import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

from kvrelay import deployment as dp
from kvrelay import routing
from kvrelay.engine_api import PrefillInfo, Request, RequestOutput, SamplingParams
from kvrelay.errors import KvRelayError
from kvrelay.kv_format import KVPages, block_hashes
from kvrelay.plan import RecomputePlan
from kvrelay.serving.engine_runner import EngineFailure, EngineRunner

log = logging.getLogger("kvrelay.orchestrator")
COALESCE_ROUNDS = 3        # in-flight prefills a request waits for, one after another, before prefilling itself
COALESCE_WAIT_S = 300.0    # longest wait for one of them
CANCEL_POLL_S = 0.5        # how often a request waiting on its engine asks whether the client left ...
CANCEL_EVERY = 8           # ... and every this many outputs (a client that hung up mid-stream)
MAX_LABEL_CHARS = 128      # tenant and request_id: store keys and log lines, not documents


class ClientGone(Exception):
    """The client cancelled or disconnected: stop its request, nobody is listening."""


@dataclass(slots=True)
class ServeRequest:
    tokens: list[int]
    max_tokens: int
    model: str = ""                      # "" = the deployment's first model
    stream: bool = False                 # every token as it comes, else one final reply
    tenant: str = "default"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: list[int] = field(default_factory=list)   # tokenized stop words, -1 between them
    bad_ids: list[int] = field(default_factory=list)    # tokenized bad words, -1 between them
    min_tokens: int = 0                  # tensorrtllm_backend's min_length
    end_id: int | None = None            # an extra end-of-sequence token
    top_k: int = 0
    request_id: str = ""
    entry: str = "ensemble"              # the Triton entry point the client used (metrics label)


@dataclass(slots=True)
class Reply:
    output_ids: list[int]                # every token generated so far
    prev_len: int                        # tokens the client already has (streaming), 0 otherwise
    finished: bool
    route: str                           # "<kind>: <reason>"
    donor: str = ""
    reused_layers: int = 0
    recomputed_layers: int = 0
    reused_tokens: int = 0
    first_token_time_ns: int = 0         # wall clock (epoch ns) when the engine produced the first token
    model: str = ""                      # the variant that answered

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)


class Sink(Protocol):
    def send(self, reply: Reply) -> None: ...      # raises ClientGone when the client left
    def cancelled(self) -> bool: ...


class NoMetrics:
    def prefill(self, entry: str, route, receiver: str, info: dict) -> None: ...
    def bytes_moved(self, entry: str, direction: str, n: int) -> None: ...
    def store_error(self, entry: str) -> None: ...
    def page_rejected(self, reason: str) -> None: ...


class Orchestrator:
    def __init__(self, dep: dp.Deployment, engines: dict | None = None, metrics=None, store=None, selector=None):
        """engines: name -> Engine (default: built from the deployment); store/selector likewise."""
        from kvrelay.paths import repo_root
        from kvrelay.selector import OnlineLatency, Selector
        from kvrelay.store import open_store
        self.dep = dep
        self.ids = dp.identities(dep)
        self.store = store if store is not None else open_store(dep.store)
        # with an SLO, the selector's idle rule (the most recompute whose predicted prefill meets it)
        # runs on a latency model fitted to this server's own prefills
        self.latency = OnlineLatency() if dep.slo_s else None
        self.selector = selector or Selector(Path(dep.profiles_dir or repo_root() / "profiles"), dep.family,
                                             quality_target=dep.quality_target, latency=self.latency)
        self.metrics = metrics or NoMetrics()
        self.store.on_reject = self.metrics.page_rejected   # each dropped page: logged by the store, counted here
        # with prefix caching off the engines keep nothing: nothing is "recently computed" either
        self.recent = routing.RecentlyComputed(capacity=65536 if dep.prefix_caching else 0)
        self.inflight = routing.InFlightPrefills()
        self.route_lock = threading.Lock()     # see-then-register of in-flight prefills is one step
        self.publisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="publish")
        self.in_flight = 0
        self._count_lock = threading.Lock()
        engines = engines if engines is not None else build_engines(dep)
        self.runners = {name: EngineRunner(e, threads=_threads(dep, name)) for name, e in engines.items()}

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
        if receiver not in self.ids:
            raise KvRelayError(f"unknown model {receiver!r}; this deployment serves {self.dep.model_names}")
        me = self.ids[receiver]
        tokens, max_tokens = req.tokens, req.max_tokens
        if not 1 <= max_tokens <= self.dep.max_tokens_limit:
            raise KvRelayError(f"max_tokens must be in 1..{self.dep.max_tokens_limit}, got {max_tokens}" + (
                " (max_tokens is INT32: Triton's HTTP front end wraps a JSON number of 2^31 or more modulo 2^32 "
                "before kvrelay sees it)" if max_tokens <= 0 else ""))
        if not tokens:
            raise KvRelayError("the prompt is empty")
        if not 0 <= req.min_tokens <= max_tokens:
            raise KvRelayError(f"min_length must be in 0..max_tokens ({max_tokens}), got {req.min_tokens}")
        if req.top_k < 0:
            raise KvRelayError(f"top_k must be >= 0, got {req.top_k}")
        if req.end_id is not None and req.end_id < 0:
            raise KvRelayError(f"end_id must be a token id (>= 0), got {req.end_id}")
        if len(tokens) + max_tokens > me.max_model_len:
            raise KvRelayError(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                               f"{me.max_model_len}-token context of {receiver!r}")
        for name, value in (("tenant", req.tenant), ("request_id", req.request_id)):
            if len(value) > MAX_LABEL_CHARS or not value.isprintable():
                raise KvRelayError(f"{name} must be at most {MAX_LABEL_CHARS} printable characters, got "
                                   f"{len(value)} characters")
        scope = self.cache_scope(req)
        route, prefill = self._route(receiver, me, req.tenant, scope, tokens)
        call = _Call(route, me, req, sink, scope)
        call.prefill = prefill
        try:
            donor = self._fetch(route, me, req, tokens)
            if route.kind in ("reuse", "restore") and donor is None:
                call.route = routing.Route("full", "donor pages unavailable", export=False)
            try:
                self._run(call, donor)
            except _DonorRefused as e:  # e.g. a stale page: degrade to a correct full prefill
                log.warning("engine refused donor pages, full prefill: %s", e)
                call.route = routing.Route("full", "engine refused donor pages", export=False)
                self._run(call, None)
        finally:
            if not call.publishing:  # else the publisher ends it once the pages are stored
                self.inflight.end(prefill)

    def cache_scope(self, req: ServeRequest) -> str:
        """Which engine prefix-cache blocks a request may hit: its tenant's, unless the deployment
        shares them. Without this, tenant B's first request on a context tenant A just sent is a
        prefix hit, and its latency tells B what A sent (the store is keyed by tenant already)."""
        return "" if self.dep.shared_prefix_cache else req.tenant

    def _route(self, receiver, me, tenant, scope, tokens):
        """routing.route, after waiting for in-flight prefills whose pages would serve this context
        (COALESCE_ROUNDS at most). Returns the route and, for a full prefill that will publish, its
        in-flight registration."""
        hashes = block_hashes(tokens, me.page_format.block_size) if self.dep.coalesce else []
        waited = False
        for attempt in range(COALESCE_ROUNDS + 1):
            with self.route_lock:
                other = self.inflight.covering(tenant, me.fingerprint, hashes, lambda m: self._worth_waiting(m, receiver)) \
                    if hashes and attempt < COALESCE_ROUNDS else None
                if other is None:
                    route = routing.route(self.store, self.selector, self.ids, receiver, tenant, tokens, self.recent,
                                          sharing=self.dep.sharing, queued=max(0, self.in_flight - 1),
                                          slo_s=self.dep.slo_s, scope=scope)
                    route.export = route.export and self.dep.publish
                    prefill = self.inflight.begin(receiver, tenant, me.fingerprint, hashes) \
                        if hashes and route.kind == "full" and route.export else None
                    if waited:
                        route.reason += " (after an in-flight prefill)"
                    return route, prefill
            other.done.wait(COALESCE_WAIT_S)
            waited = True

    def _worth_waiting(self, model: str, receiver: str) -> bool:
        """Its own pages always serve a model; another's only with sharing on and a usable plan."""
        if model == receiver:
            return True
        return self.dep.sharing and model in self.ids and self.selector.has_plan(
            model, receiver, self.ids[model].fingerprint, self.ids[receiver].fingerprint)

    def _fetch(self, route, me, req: ServeRequest, tokens) -> KVPages | None:
        if route.kind not in ("reuse", "restore"):
            return None
        fmt = self.ids[route.donor].page_format
        if route.cached:  # the engine should hold the hybrid KV already: send a reference, not pages
            return KVPages.reference_to(fmt, route.producer, self.ids[route.donor].fingerprint,
                                        tokens[: route.blocks * fmt.block_size])
        layers = e_layers = None
        if route.kind == "restore":
            e_layers = []
        else:
            layers, e_layers = route.plan.reused_layers(me.num_layers), route.plan.e_layers_needed()
        try:
            pages = self.store.fetch(req.tenant, me.fingerprint, route.producer, tokens, fmt, route.blocks,
                                     layers=layers, e_layers=e_layers)
        except KvRelayError as e:
            log.warning("fetching pages from %s failed, full prefill: %s", route.producer, e)
            self.metrics.store_error(req.entry)
            return None
        if pages is None or pages.num_pages == 0:
            return None
        self.metrics.bytes_moved(req.entry, "fetch", pages.kv.nbytes + pages.e.nbytes)
        return pages

    def _run(self, call: "_Call", donor: KVPages | None) -> None:
        req = call.req
        plan = None
        if donor is not None:
            plan = RecomputePlan.none() if call.route.kind == "restore" else call.route.plan
        sampling = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p,
                                  top_k=req.top_k, seed=req.seed, stop_sequences=split_stops(req.stop_ids),
                                  stop_token_ids=() if req.end_id is None else (req.end_id,),
                                  min_tokens=req.min_tokens, bad_sequences=split_stops(req.bad_ids))
        rid = f"{req.request_id or 'req'}-{uuid.uuid4().hex[:12]}"
        outputs: queue.Queue = queue.Queue()
        runner = self.runners[call.me.name]
        try:
            runner.submit(Request(rid, list(req.tokens), sampling, donor=donor, plan=plan,
                                  export_pages=call.route.export, cache_salt=call.scope.encode()),
                          lambda o, e: outputs.put((o, e)))
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
            runner.abort(rid)   # client gone, or our own failure: free the engine's slot
            raise

    def _forward(self, out: RequestOutput, call: "_Call") -> None:
        if out.prefill is not None:
            self._prefill_done(out.prefill, call, out)
        if not (call.req.stream or out.finished):
            return
        route, info = call.route, call.info
        reusing = route.kind in ("reuse", "restore") and info is not None
        ids = list(out.output_tokens)
        # the tokens whose KV was not computed for this request: the donor's, or this engine's prefix cache
        reused_tokens = info.reused_tokens if reusing else info.cached_tokens if info else 0
        call.sink.send(Reply(
            output_ids=ids, prev_len=max(len(ids) - 1, 0) if call.req.stream else 0, finished=out.finished,
            route=f"{route.kind}: {route.reason}", donor=route.donor if reusing else "",
            reused_layers=info.reused_layers if reusing else 0,
            recomputed_layers=info.recomputed_layers if reusing else 0,
            reused_tokens=reused_tokens,
            first_token_time_ns=out.first_token_time_ns or call.first_token_time_ns, model=call.me.name))
        call.first_token_time_ns = call.first_token_time_ns or out.first_token_time_ns

    def _prefill_done(self, info: PrefillInfo, call: "_Call", out: RequestOutput) -> None:
        call.info = info
        self.metrics.prefill(call.req.entry, call.route, call.me.name, asdict(info))
        if self.latency is not None:
            if info.reused_tokens and not info.donor_failed:
                self.latency.observe(info.reused_tokens, info.recomputed_layers, info.seconds)
            elif not info.cached_tokens:
                self.latency.observe(info.prompt_tokens, call.me.num_layers, info.seconds)
        B = call.me.page_format.block_size
        scope, tokens = call.scope, call.req.tokens
        if call.route.export:
            pages = out.pages
            if pages is not None and pages.num_pages:
                self.recent.add(call.me.name, scope, pages.hashes)
                call.publishing = True
                self.publisher.submit(self._publish, call.req, pages, call.prefill)
        elif call.route.kind in ("full", "prefix"):
            self.recent.add(call.me.name, scope, block_hashes(tokens, B))
        if call.route.kind == "reuse":
            if info.reused_tokens and not info.donor_failed:
                self.recent.add_hybrid(call.me.name, scope, call.route, tokens, B)
            else:  # evicted, or the engine fell back: the next repeat sends pages again
                self.recent.forget_hybrid(call.me.name, scope, call.route, tokens, B)

    def _publish(self, req: ServeRequest, pages, prefill=None):
        try:
            n = self.store.put(req.tenant, pages)
            self.metrics.bytes_moved(req.entry, "publish",
                                     (pages.kv.nbytes + pages.e.nbytes) * n // max(pages.num_pages, 1))
        except KvRelayError as e:
            log.warning("publishing pages failed (requests unaffected): %s", e)
            self.metrics.store_error(req.entry)
        except Exception:
            log.exception("publishing pages failed (requests unaffected)")
        finally:
            self.inflight.end(prefill)   # waiters route now: the pages are in the store (or never will be)

    def close(self) -> None:
        for r in self.runners.values():
            r.close()
        self.publisher.shutdown(wait=True)
        self.store.close()


class _DonorRefused(Exception):
    pass


class _Call:
    """One request's state across its engine outputs."""
    __slots__ = ("route", "me", "req", "sink", "scope", "info", "prefill", "publishing", "first_token_time_ns")

    def __init__(self, route, me, req: ServeRequest, sink: Sink, scope: str = ""):
        self.route, self.me, self.req, self.sink, self.scope = route, me, req, sink, scope
        self.info: PrefillInfo | None = None
        self.prefill = None        # this request's registration in InFlightPrefills, if any
        self.publishing = False    # its pages went to the publisher, which ends the registration
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


def build_engines(dep: dp.Deployment) -> dict:
    from kvrelay.backends.torch_engine.config import EngineConfig
    from kvrelay.engines import make_engine
    out = {}
    for m in dep.models:
        if m.instances != 1:
            raise KvRelayError(f"model {m.name}: instances = {m.instances}; the in-process engines serve one "
                               "instance per model (run more servers behind a shared Redis store to scale out)")
        out[m.name] = make_engine(dep.family, m.name, EngineConfig(
            device=m.device, dtype=m.dtype, block_size=dep.block_size, kv_cache_bytes=m.kv_cache_bytes,
            prefix_caching=dep.prefix_caching))
    return out


def _threads(dep: dp.Deployment, name: str) -> int:
    m = dep.model(name)
    return dep.cpu_threads(name) if m.device == "cpu" else 0

