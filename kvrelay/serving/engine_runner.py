"""One engine stepped by its own thread (continuous batching), fed from any thread.

`submit` validates at once (the engine's add_request raises to the caller) and returns; the runner's
thread steps the engine and hands every RequestOutput to the callback given with the request. An
engine bug fails every request in flight with an EngineFailure, never leaves one hanging.
"""

from __future__ import annotations

import logging
import threading
import traceback
from typing import Callable

from kvrelay.model.engine_api import Request, RequestOutput
from kvrelay.errors import KvRelayError

log = logging.getLogger("kvrelay.engine_runner")


class EngineFailure(KvRelayError):
    """The engine raised while running a batch: every request in that batch failed (server-side)."""


OnOutput = Callable[[RequestOutput | None, Exception | None], None]


class EngineRunner:
    def __init__(self, engine, threads: int = 0):
        self.engine, self.name = engine, engine.name
        self.threads = threads  # torch intra-op threads of this runner's thread (0 = torch's)
        self._callbacks: dict[str, OnOutput] = {}
        self._lock = threading.Lock()  # the callback table and add_request, against the loop
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.name}", daemon=True)
        self._thread.start()

    def submit(self, request: Request, on_output: OnOutput) -> None:
        """Queue a request; raises KvRelayError at once if the engine refuses it."""
        if self._stopping:
            raise EngineFailure(f"engine {self.name!r} is shutting down")
        with self._lock:  # the callback first: the loop may emit the first token before add_request returns
            if request.request_id in self._callbacks:
                raise KvRelayError(f"request_id {request.request_id!r} is already running on {self.name!r}")
            self._callbacks[request.request_id] = on_output
            try:
                self.engine.add_request(request)
            except BaseException:
                del self._callbacks[request.request_id]
                raise
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request (a client that went away); its callback gets no further output."""
        with self._lock:
            if self._callbacks.pop(request_id, None) is not None:
                self.engine.abort(request_id)
        self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._callbacks)

    def _loop(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # per thread under OpenMP: each engine gets its share
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outs = self.engine.step()
            except Exception as e:  # an engine bug must not hang clients: fail what was in flight
                log.error("engine %s failed a step:\n%s", self.name, traceback.format_exc())
                with self._lock:
                    failed = list(self._callbacks.items())
                    self._callbacks.clear()
                    for rid, _ in failed:
                        self.engine.abort(rid)
                for _, cb in failed:
                    _safe(cb, None, EngineFailure(f"engine failure: {e}"))
                continue
            for o in outs:
                cb = self._callbacks.get(o.request_id)
                if cb is None:
                    continue
                if o.finished:
                    with self._lock:
                        self._callbacks.pop(o.request_id, None)
                _safe(cb, o, None)

    def close(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        with self._lock:
            pending = list(self._callbacks.values())
            self._callbacks.clear()
        for cb in pending:
            _safe(cb, None, EngineFailure(f"engine {self.name!r} shut down"))


def _safe(cb: OnOutput, out, err) -> None:
    try:
        cb(out, err)
    except Exception:  # a consumer's bug stays the consumer's: the loop serves everyone else
        log.exception("output callback failed")
