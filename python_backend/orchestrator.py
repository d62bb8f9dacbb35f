"""Triton orchestrator (BLS): page-store lookup, plan choice, the engine call, publishing, metrics.

Each request runs on a worker thread so one orchestrator instance keeps many requests in flight
(the engines batch them). The decoupled `orchestrator_stream` does the work and streams every token
(`ensemble_stream`); the non-decoupled `orchestrator` (behind `ensemble`: HTTP /infer, gRPC unary)
forwards to it and answers once, so one process owns the in-memory page store and its lookups.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kvrelay import deployment as dp
from kvrelay import routing
from kvrelay.errors import KvRelayError
from kvrelay.kv_format import KVPages, block_hashes
from kvrelay.plan import RecomputePlan
from kvrelay.triton import io
from kvrelay.triton.metrics import Metrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
ENGINE_OUTPUTS = ["output_ids", "finished", "finish_reason", "prefill_info", "first_token_time_ns",
                  "pages_kv", "pages_e", "pages_tokens", "pages_meta"]
OUTPUTS = ["output_ids", "prev_len", "kv_reused_layers", "kv_recomputed_layers", "kv_reused_tokens",
           "kv_donor_model", "kv_route", "output_tokens", "first_token_time_ns"]
log = logging.getLogger("kvrelay.orchestrator")
COALESCE_ROUNDS = 3        # in-flight prefills a request waits for, one after another, before prefilling itself
COALESCE_WAIT_S = 300.0    # longest wait for one of them


class TritonPythonModel:
    def initialize(self, args):
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        self.pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="orchestrate")
        if not self.decoupled:
            return  # a proxy: the streaming orchestrator owns store, selector and metrics
        from kvrelay.paths import repo_root
        from kvrelay.selector import Selector
        from kvrelay.store import open_store
        p = io.params(args)
        self.dep = dp.Deployment.from_json(Path(p["deployment"]).read_text(encoding="utf-8"))
        self.ids = dp.identities(self.dep)
        self.store = open_store(self.dep.store)
        self.selector = Selector(Path(self.dep.profiles_dir or repo_root() / "profiles"), self.dep.family,
                                 quality_target=self.dep.quality_target)
        self.recent = routing.RecentlyComputed()
        self.inflight = routing.InFlightPrefills()
        self.route_lock = threading.Lock()   # see-then-register of in-flight prefills is one step
        self.metrics = Metrics(args["model_name"])
        self.publisher = ThreadPoolExecutor(max_workers=2, thread_name_prefix="publish")
        self.in_flight = 0
        self.lock = threading.Lock()

    def execute(self, requests):
        # Read every input here, on the stub's thread: once execute returns, Triton may release the
        # requests' shared memory, and a worker thread touching it then crashes the server.
        for r in requests:
            sender = r.get_response_sender()
            try:
                args = self._read(r)
            except KvRelayError as e:
                io.send_error(sender, str(e))
                continue
            self.pool.submit(self._serve if self.decoupled else self._proxy, args, sender)
        return None

    def _read(self, r) -> dict:
        if not self.decoupled:
            if io.scalar(r, "stream", bool, False):
                raise io.BadInput("stream=true needs the streaming entry point 'ensemble_stream' "
                                  "(HTTP generate_stream or gRPC streaming)")
            return {"inputs": [pb_utils.Tensor(t.name(), t.as_numpy().copy()) for t in r.inputs() if t.name() != "stream"]}
        return {
            "model": io.scalar(r, "model", str, ""), "tokens": io.ints(r, "input_ids", required=True),
            "max_tokens": io.scalar(r, "max_tokens", int, required=True), "stream": bool(io.scalar(r, "stream", bool, False)),
            "tenant": io.scalar(r, "tenant", str, "") or "default",
            "passthrough": [pb_utils.Tensor(n, t.as_numpy().copy()) for n, t in
                            ((n, pb_utils.get_input_tensor_by_name(r, n))
                             for n in ("temperature", "top_p", "random_seed", "stop_ids", "request_id")) if t is not None],
        }

    def _proxy(self, args, sender):
        """Forward to orchestrator_stream with stream=false; exactly one response comes back."""
        try:
            final = None
            for resp in pb_utils.InferenceRequest(model_name="orchestrator_stream", requested_output_names=OUTPUTS,
                                                  inputs=args["inputs"]).exec(decoupled=True):
                if resp.has_error():
                    io.send_error(sender, resp.error().message())
                    return
                if pb_utils.get_output_tensor_by_name(resp, "output_ids") is not None:
                    final = resp
            if final is None:
                raise KvRelayError("no response from orchestrator_stream")
            io.send(sender, pb_utils.InferenceResponse(final.output_tensors()), FINAL)
        except KvRelayError as e:
            io.send_error(sender, str(e))
        except Exception as e:
            log.exception("orchestrator proxy failure")
            io.send_error(sender, f"internal error: {e}", pb_utils.TritonError.INTERNAL)

    # --- one request ------------------------------------------------------------------------------

    def _serve(self, args, sender):
        with self.lock:
            self.in_flight += 1
        try:
            self._handle(args, sender)
        except KvRelayError as e:
            io.send_error(sender, str(e))
        except Exception as e:  # never leave a client hanging
            log.exception("orchestrator failure")
            io.send_error(sender, f"internal error: {e}", pb_utils.TritonError.INTERNAL)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _handle(self, args, sender):
        receiver = args["model"] or self.dep.models[0].name
        if receiver not in self.ids:
            raise io.BadInput(f"unknown model {receiver!r}; this deployment serves {self.dep.model_names}")
        me = self.ids[receiver]
        tokens, max_tokens = args["tokens"], args["max_tokens"]
        if not 1 <= max_tokens <= self.dep.max_tokens_limit:
            raise io.BadInput(f"max_tokens must be in 1..{self.dep.max_tokens_limit}, got {max_tokens}")
        if not tokens:
            raise io.BadInput("the prompt is empty")
        if len(tokens) + max_tokens > me.max_model_len:
            raise io.BadInput(f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                              f"{me.max_model_len}-token context of {receiver!r}")
        tenant = args["tenant"]
        route, prefill = self._route(receiver, me, tenant, tokens)
        call = _Call(route, me, tenant, tokens, args["stream"], sender)
        call.prefill = prefill
        try:
            donor = self._fetch(route, me, tenant, tokens)
            if route.kind != "full" and donor is None:
                call.route = routing.Route("full", "donor pages unavailable", export=False)
            base_inputs = [io.tensor("input_ids", np.asarray(tokens, np.int32)),
                           io.tensor("max_tokens", np.array([max_tokens], np.int32))] + args["passthrough"]
            try:
                self._run(call, base_inputs, donor)
            except _EngineRefusedDonor as e:  # e.g. a stale page: degrade to a correct full prefill
                log.warning("engine refused donor pages, full prefill: %s", e)
                call.route = routing.Route("full", "engine refused donor pages", export=False)
                self._run(call, base_inputs, None)
        finally:
            if not call.publishing:  # else the publisher ends it once the pages are stored
                self.inflight.end(prefill)

    def _route(self, receiver, me, tenant, tokens):
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
                                          slo_s=self.dep.slo_s)
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

    def _run(self, call, base_inputs, donor):
        inputs = base_inputs + [io.tensor("export_pages", np.array([call.route.export]))]
        if donor is not None:
            plan = RecomputePlan.none() if call.route.kind == "restore" else call.route.plan
            # the receiver's engine declares its own KV dtype; a donor may run in another
            inputs += io.pages_tensors("donor", donor, call.me.page_format.torch_dtype) + [io.tensor("plan", str(plan))]
        req = pb_utils.InferenceRequest(model_name=f"engine_{call.me.name}", requested_output_names=ENGINE_OUTPUTS,
                                        inputs=inputs)
        for resp in req.exec(decoupled=True):
            self._forward(resp, call)

    def _fetch(self, route, me, tenant, tokens):
        if route.kind == "full":
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
            pages = self.store.fetch(tenant, me.fingerprint, route.producer, tokens, fmt, route.blocks,
                                     layers=layers, e_layers=e_layers)
        except KvRelayError as e:
            log.warning("fetching pages from %s failed, full prefill: %s", route.producer, e)
            self.metrics.store_error()
            return None
        if pages is None or pages.num_pages == 0:
            return None
        self.metrics.bytes_moved("fetch", pages.kv.nbytes + pages.e.nbytes)
        return pages

    def _forward(self, resp, call):
        route = call.route
        if resp.has_error():
            msg = resp.error().message()
            if call.info is None and route.kind != "full" and resp.error().code() == pb_utils.TritonError.INVALID_ARG \
                    and any(w in msg for w in ("donor", "plan", "pages", "fingerprint")):
                raise _EngineRefusedDonor(msg)
            raise KvRelayError(msg)
        get = pb_utils.get_output_tensor_by_name
        ids_t = get(resp, "output_ids")
        if ids_t is None:  # the empty final flag-only response of a decoupled stream
            return
        ids = ids_t.as_numpy().reshape(-1)
        finished = bool(get(resp, "finished").as_numpy().reshape(-1)[0])
        info_s = get(resp, "prefill_info").as_numpy().reshape(-1)[0]
        info_s = info_s.decode() if isinstance(info_s, bytes) else str(info_s)
        if info_s:
            self._prefill_done(json.loads(info_s), call, resp)
        if not (call.stream or finished):
            return
        info = call.info or {}
        reusing = route.kind != "full"
        out = [io.tensor("output_ids", ids.astype(np.int32)),
               io.tensor("prev_len", np.array([max(len(ids) - 1, 0) if call.stream else 0], np.int32)),
               io.tensor("kv_reused_layers", np.array([info.get("reused_layers", 0) if reusing else 0], np.int32)),
               io.tensor("kv_recomputed_layers", np.array([info.get("recomputed_layers", 0) if reusing else 0], np.int32)),
               io.tensor("kv_reused_tokens", np.array([info.get("reused_tokens", 0) if reusing else 0], np.int32)),
               io.tensor("kv_donor_model", route.donor if reusing else ""),
               io.tensor("kv_route", f"{route.kind}: {route.reason}"),
               io.tensor("output_tokens", np.array([len(ids)], np.int32)),
               io.tensor("first_token_time_ns", get(resp, "first_token_time_ns").as_numpy().astype(np.int64))]
        io.send(call.sender, pb_utils.InferenceResponse(out), FINAL if finished else 0)

    def _prefill_done(self, info, call, resp):
        call.info = info
        self.metrics.prefill(call.route, call.me.name, info)
        B = call.me.page_format.block_size
        if call.route.export:
            pages = io.pages_from(resp, "pages", pb_utils.get_output_tensor_by_name, copy=True)  # outlives resp
            if pages is not None and pages.num_pages:
                self.recent.add(call.me.name, call.tenant, pages.hashes)
                call.publishing = True
                self.publisher.submit(self._publish, call.tenant, pages, call.prefill)
        elif call.route.kind == "full":
            self.recent.add(call.me.name, call.tenant, block_hashes(call.tokens, B))
        if call.route.kind == "reuse":
            if info.get("reused_tokens", 0) and not str(info.get("plan", "")).startswith("donor failed"):
                self.recent.add_hybrid(call.me.name, call.tenant, call.route, call.tokens, B)
            else:  # evicted, or the engine fell back: the next repeat sends pages again
                self.recent.forget_hybrid(call.me.name, call.tenant, call.route, call.tokens, B)

    def _publish(self, tenant, pages, prefill=None):
        try:
            n = self.store.put(tenant, pages)
            self.metrics.bytes_moved("publish", (pages.kv.nbytes + pages.e.nbytes) * n // max(pages.num_pages, 1))
        except KvRelayError as e:
            log.warning("publishing pages failed (requests unaffected): %s", e)
            self.metrics.store_error()
        finally:
            self.inflight.end(prefill)   # waiters route now: the pages are in the store (or never will be)

    def finalize(self):
        self.pool.shutdown(wait=True, cancel_futures=False)
        if self.decoupled:
            self.publisher.shutdown(wait=True)
            self.store.close()


class _EngineRefusedDonor(Exception):
    pass


class _Call:
    """One request's state across its engine responses (requests run concurrently on threads)."""
    __slots__ = ("route", "me", "tenant", "tokens", "stream", "sender", "info", "prefill", "publishing")

    def __init__(self, route, me, tenant, tokens, stream, sender):
        self.route, self.me, self.tenant, self.tokens, self.stream, self.sender = route, me, tenant, tokens, stream, sender
        self.info = None
        self.prefill = None        # this request's registration in InFlightPrefills, if any
        self.publishing = False    # its pages went to the publisher, which ends the registration
