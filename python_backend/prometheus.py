"""kvrelay's Triton custom metrics (pb_utils.MetricFamily), exported on the server's /metrics."""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from kvrelay.serving.routes import RouteKind


class Metrics:
    def __init__(self):
        # MetricFamily is attached to pb_utils only once the stub runs a model, not at import
        f = lambda name, doc: pb_utils.MetricFamily(name=name, description=doc, kind=pb_utils.MetricFamily.COUNTER)
        self._fams = {
            "requests": f(
                "kvrelay_requests_total",
                "Requests by entry point (model), receiver, KV route (full, prefix, restore, reuse) and donor",
            ),
            "hits": f("kvrelay_store_hits_total", "Page-store hits used, by donor -> receiver"),
            "full": f(
                "kvrelay_full_prefill_total", "Requests prefilled without cross-model reuse, by receiver and reason"
            ),
            "recomputed": f("kvrelay_layers_recomputed_total", "Layers recomputed in re-prefill, by donor -> receiver"),
            "reused": f("kvrelay_layers_reused_total", "Layers whose KV was reused, by donor -> receiver"),
            "shared": f(
                "kvrelay_shared_layer_tokens_total",
                "Context tokens whose lower layers' KV a model took bit-exact from blocks another model of its "
                "engine computed with the same weights there (a LoRA adapter that leaves them untouched, "
                "or the base), by donor -> receiver",
            ),
            "bytes": f("kvrelay_kv_bytes_moved_total", "KV/E bytes moved between store and engines, by direction"),
            "prefill_s": f(
                "kvrelay_prefill_seconds_total",
                "Prefill seconds, by kind (full, prefix, reprefill, restore) and receiver",
            ),
            "prefill_n": f("kvrelay_prefill_count_total", "Prefills, by kind and receiver (divide seconds by this)"),
            "store_errors": f("kvrelay_store_errors_total", "Page-store failures that fell back to full prefill"),
            "rejected": f(
                "kvrelay_pages_rejected_total",
                "Stored pages dropped and recomputed, by reason (auth: "
                "corrupt, moved or forged; non_finite; malformed; incomplete)",
            ),
        }
        self._metrics: dict = {}
        self._lock = threading.Lock()

    def _add(self, fam: str, value, **labels) -> None:
        """labels include model=<the entry point the client used>, as Triton's own metrics name it."""
        # One metric IPC at a time: concurrent Metric calls from worker threads abort tritonserver
        # 2.51 (Metric::~Metric in the parent's metric-message handler; seen at 32 streams).
        key = (fam, tuple(sorted(labels.items())))
        with self._lock:
            m = self._metrics.get(key)
            if m is None:
                m = self._metrics[key] = self._fams[fam].Metric(labels=labels)
            m.increment(value)

    def prefill(self, entry: str, route, receiver: str, info: dict) -> None:
        donor = route.donor or "-"
        self._add("requests", 1, model=entry, receiver=receiver, route=route.kind, donor=donor)
        kind = {
            RouteKind.FULL: "full",
            RouteKind.PREFIX: "prefix",
            RouteKind.REUSE: "reprefill",
            RouteKind.RESTORE: "restore",
        }[route.kind]
        self._add("prefill_s", float(info["seconds"]), model=entry, kind=kind, receiver=receiver)
        self._add("prefill_n", 1, model=entry, kind=kind, receiver=receiver)
        if info["shared_tokens"]:
            self._add("shared", int(info["shared_tokens"]), model=entry, donor=info["shared_from"], receiver=receiver)
        if route.kind is RouteKind.FULL:
            self._add("full", 1, model=entry, receiver=receiver, reason=route.cause or "unspecified")
        if route.kind not in (RouteKind.REUSE, RouteKind.RESTORE):
            return
        self._add("hits", 1, model=entry, donor=donor, receiver=receiver)
        self._add("recomputed", int(info["recomputed_layers"]), model=entry, donor=donor, receiver=receiver)
        self._add("reused", int(info["reused_layers"]), model=entry, donor=donor, receiver=receiver)

    def bytes_moved(self, entry: str, direction: str, n: int) -> None:
        self._add("bytes", int(n), model=entry, direction=direction)

    def store_error(self, entry: str) -> None:
        self._add("store_errors", 1, model=entry)

    def page_rejected(self, reason: str) -> None:
        self._add("rejected", 1, reason=reason)
