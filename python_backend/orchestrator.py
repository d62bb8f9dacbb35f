"""Triton adapters of the serving core (kvrelay.serving.orchestrator): tensors in, tensors out.

- `orchestrator_stream` (decoupled, behind `ensemble_stream`) hosts the core: every engine, the page
  store and the router live in its process. Each request runs on a worker thread and streams its
  replies back through the request's response sender.
- `orchestrator` (behind `ensemble`: HTTP /infer and /generate, gRPC unary) forwards each request to
  the core over a local authenticated socket (kvrelay.serving.unary_channel) and answers once.

No BLS: Triton 2.51's Python backend frees numpy arrays of BLS responses without the GIL, which
corrupted the heap of a multi-threaded orchestrator under concurrent load (issue 10).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kvrelay.errors import KvRelayError
from kvrelay.serving import deployment as dp
from kvrelay.serving.engine_runner import EngineFailure
from kvrelay.serving.orchestrator import ClientGone, Orchestrator, Reply, ServeRequest
from kvrelay.serving.unary_channel import UnaryClient, UnaryServer
from kvrelay.triton import tensors
from kvrelay.triton.prometheus import Metrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
log = logging.getLogger("kvrelay.triton.orchestrator")
WORKERS = 64  # requests in flight per process (each waits on its engine on a thread)


class TritonPythonModel:
    def initialize(self, args):
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(json.loads(args["model_config"]))
        p = tensors.params(args)
        self.dep = dp.Deployment.from_json(Path(p["deployment"]).read_text(encoding="utf-8"))
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="orchestrate")
        if self.decoupled:
            self.core = Orchestrator(self.dep, metrics=Metrics())
            self.unary = UnaryServer(self.core, p["core_address"], Path(p["core_key"]))
        else:
            self.client = UnaryClient(p["core_address"], Path(p["core_key"]))

    def execute(self, requests):
        # Read every input here, on the stub's thread: once execute returns, Triton may release the
        # requests' shared memory.
        for r in requests:
            sender = r.get_response_sender()
            try:
                req = _read(r, self.decoupled)
            except KvRelayError as e:
                tensors.send_error(sender, str(e))
                continue
            if self.decoupled:
                self.pool.submit(self._stream, req, r, sender)
            else:
                self.pool.submit(self._unary, req, sender)
        return None

    def _stream(self, req: ServeRequest, r, sender):
        sink = _Sink(r, sender)
        try:
            self.core.serve(req, sink)
        except ClientGone:
            sink.close()
        except Exception as e:
            _fail(sender, e)

    def _unary(self, req: ServeRequest, sender):
        try:
            reply = self.client.call(req)
        except Exception as e:
            _fail(sender, e)
            return
        tensors.send(sender, pb_utils.InferenceResponse(_tensors(reply)), FINAL)

    def finalize(self):
        # Triton calls this after its graceful period (--exit-timeout-secs) for requests in flight.
        # Whatever still runs then is failed at once (UNAVAILABLE), never left without an answer.
        if self.decoupled:
            self.unary.close()
            self.core.close()
        else:
            self.client.close()
        self.pool.shutdown(wait=True, cancel_futures=False)


class _Sink:
    """The core's replies to one request's response sender."""

    def __init__(self, request, sender):
        self.request, self.sender, self.done = request, sender, False

    def send(self, reply: Reply) -> None:
        try:
            tensors.send(self.sender, pb_utils.InferenceResponse(_tensors(reply)), FINAL if reply.finished else 0)
        except Exception as e:  # the stream is gone (client disconnected, request cancelled)
            raise ClientGone(str(e)) from None
        self.done = reply.finished

    def cancelled(self) -> bool:
        return not self.done and self.request.is_cancelled()

    def close(self) -> None:
        if not self.done:  # release Triton's request: a final flag with no response
            try:
                tensors.send(self.sender, None, FINAL)
            except Exception:
                pass
            self.done = True


def _fail(sender, e: Exception) -> None:
    if isinstance(e, EngineFailure):
        tensors.send_error(sender, str(e), pb_utils.TritonError.UNAVAILABLE)
    elif isinstance(e, KvRelayError):
        tensors.send_error(sender, str(e))
    else:
        log.error("orchestrator failure", exc_info=e)
        tensors.send_error(sender, f"internal error: {e}", pb_utils.TritonError.INTERNAL)


def _read(r, decoupled: bool) -> ServeRequest:
    # The unary entry point answers stream=true with one final response (genai-perf --streaming -m
    # ensemble sends it); token by token needs 'ensemble_stream' or a variant's own name.
    stream = decoupled and bool(tensors.scalar(r, "stream", bool, False))
    _refuse_unsupported(r)
    return ServeRequest(
        tokens=tensors.ints(r, "input_ids", required=True),
        max_tokens=tensors.scalar(r, "max_tokens", int, required=True),
        model=tensors.scalar(r, "model", str, ""),
        stream=stream,
        tenant=tensors.scalar(r, "tenant", str, "") or "default",
        temperature=tensors.scalar(r, "temperature", float, 0.0),
        top_p=tensors.scalar(r, "top_p", float, 1.0),
        top_k=tensors.scalar(r, "top_k", int, 0),
        seed=tensors.scalar(r, "random_seed", int, None),
        stop_ids=tensors.ints(r, "stop_ids"),
        bad_ids=tensors.ints(r, "bad_ids"),
        min_tokens=tensors.scalar(r, "min_length", int, 0),
        end_id=tensors.scalar(r, "end_id", int, None),
        request_id=tensors.scalar(r, "request_id", str, ""),
        lora_path=tensors.scalar(r, "lora_path", str, ""),
        entry=tensors.scalar(r, "entry", str, "") or ("ensemble_stream" if decoupled else "ensemble"),
    )


def _refuse_unsupported(r) -> None:
    """tensorrtllm_backend's inputs that kvrelay cannot honour: a clear refusal, not a silent change
    (pad_id is accepted and has nothing to do: outputs are never padded)."""
    if tensors.scalar(r, "beam_width", int, 1) != 1:
        raise tensors.BadInput("beam_width must be 1: kvrelay decodes one sequence per request (no beam search)")
    if tensors.scalar(r, "return_log_probs", bool, False):
        raise tensors.BadInput("return_log_probs is not supported")
    if not tensors.scalar(r, "exclude_input_in_output", bool, True):
        raise tensors.BadInput("exclude_input_in_output must be true: kvrelay returns the generated text only")


def _tensors(reply: Reply) -> list:
    i32 = lambda v: np.array([v], np.int32)
    return [
        tensors.tensor("output_ids", np.asarray(reply.output_ids, np.int32)),
        tensors.tensor("prev_len", i32(reply.prev_len)),
        tensors.tensor("kv_reused_layers", i32(reply.reused_layers)),
        tensors.tensor("kv_recomputed_layers", i32(reply.recomputed_layers)),
        tensors.tensor("kv_reused_tokens", i32(reply.reused_tokens)),
        tensors.tensor("kv_donor_model", reply.donor),
        tensors.tensor("kv_route", reply.route),
        tensors.tensor("output_tokens", i32(reply.output_tokens)),
        tensors.tensor("first_token_time_ns", np.array([reply.first_token_time_ns], np.int64)),
        tensors.tensor("variant", reply.model),
    ]
