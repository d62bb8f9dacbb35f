"""Triton model for one variant: a TorchEngine stepped by a background thread (continuous batching).

Decoupled: every generated token goes back as a response. The orchestrator reaches it over BLS with
input_ids, sampling inputs, optionally donor pages (`donor_*` tensors + `plan`) and `export_pages`.
"""
from __future__ import annotations

import json
import threading
import time
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kvrelay import deployment as dp
from kvrelay.engine_api import Request, SamplingParams
from kvrelay.errors import KvRelayError
from kvrelay.plan import RecomputePlan
from kvrelay.triton import io

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        from kvrelay.backends.torch_engine.config import EngineConfig
        from kvrelay.engines import make_engine
        p = io.params(args)
        self.dep = dp.Deployment.from_json(Path(p["deployment"]).read_text(encoding="utf-8"))
        m = self.dep.model(p["model"])
        device = m.device
        if device.startswith("cuda") and args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        if device == "cpu":
            import torch
            torch.set_num_threads(self.dep.cpu_threads(m.name))
        self.engine = make_engine(self.dep.family, m.name, EngineConfig(
            device=device, dtype=m.dtype, block_size=self.dep.block_size, kv_cache_bytes=m.kv_cache_bytes))
        self.limit = self.dep.max_tokens_limit
        self.live: dict[str, tuple] = {}          # engine request id -> (triton request, sender)
        self.wake = threading.Event()
        self.stopping = False
        self.loop = threading.Thread(target=self._loop, name=f"engine-{m.name}", daemon=True)
        self.loop.start()

    def execute(self, requests):
        for r in requests:
            sender, req = r.get_response_sender(), None
            try:
                req = self._request(r)
                self.live[req.request_id] = (r, sender)   # before the loop thread can answer it
                self.engine.add_request(req)
            except KvRelayError as e:
                if req is not None:
                    self.live.pop(req.request_id, None)
                io.send_error(sender, str(e))
                continue
            self.wake.set()
        return None

    def _request(self, r) -> Request:
        ids = io.ints(r, "input_ids", required=True)
        sp = SamplingParams(
            max_tokens=io.scalar(r, "max_tokens", int, required=True),
            temperature=io.scalar(r, "temperature", float, 0.0),
            top_p=io.scalar(r, "top_p", float, 1.0),
            seed=io.scalar(r, "random_seed", int, None),
            stop_sequences=_split(io.ints(r, "stop_ids")))
        if sp.max_tokens > self.limit:
            raise io.BadInput(f"max_tokens must be at most {self.limit} in this deployment, got {sp.max_tokens}")
        donor = io.pages_from(r, "donor", copy=True)  # the engine reads it after execute returns
        plan_s = io.scalar(r, "plan", str, "")
        plan = RecomputePlan.parse(plan_s) if donor is not None else None
        rid = f"{io.scalar(r, 'request_id', str, '') or 'req'}-{uuid.uuid4().hex[:12]}"
        return Request(rid, ids, sp, donor=donor, plan=plan,
                       export_pages=bool(io.scalar(r, "export_pages", bool, False)))

    def _loop(self):
        while not self.stopping:
            if not self.engine.has_unfinished():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            self._abort_cancelled()
            try:
                outs = self.engine.step()
            except Exception as e:  # an engine bug must not hang clients: fail what was in flight
                traceback.print_exc()
                for rid, (_, sender) in list(self.live.items()):
                    self.engine.abort(rid)
                    io.send_error(sender, f"engine failure: {e}", pb_utils.TritonError.INTERNAL)
                self.live.clear()
                continue
            for o in outs:
                entry = self.live.get(o.request_id)
                if entry is None:
                    continue
                io.send(entry[1], self._response(o), FINAL if o.finished else 0)
                if o.finished:
                    del self.live[o.request_id]

    def _abort_cancelled(self):
        for rid, (r, _) in list(self.live.items()):
            if r.is_cancelled():
                self.engine.abort(rid)

    def _response(self, o):
        info = json.dumps(asdict(o.prefill)) if o.prefill else ""
        outs = [io.tensor("output_ids", np.asarray(o.output_tokens, np.int32)),
                io.tensor("finished", np.array([o.finished])),
                io.tensor("finish_reason", o.finish_reason or ""),
                io.tensor("prefill_info", info),
                io.tensor("first_token_time_ns", np.array([o.first_token_time_ns], np.int64))]
        return pb_utils.InferenceResponse(outs + io.pages_tensors("pages", o.pages, self.engine.pool.kv.dtype))

    def finalize(self):
        self.stopping = True
        self.wake.set()
        self.loop.join(timeout=5)


def _split(flat: list[int]) -> tuple[tuple[int, ...], ...]:
    """stop_ids arrive flattened with -1 between sequences."""
    out, cur = [], []
    for t in flat:
        if t == -1:
            if cur:
                out.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    if cur:
        out.append(tuple(cur))
    return tuple(out)
