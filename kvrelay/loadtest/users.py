"""Locust users for kvrelay's Triton entry points, and the per-request record they produce.

Importing this module imports Locust, which monkey-patches the process with gevent; gRPC is then
switched to its gevent-aware mode (grpc.experimental.gevent) so streaming calls yield to other users.

    TritonGrpcStreamUser  gRPC streaming to `ensemble_stream` (kvrelay.server.client.stream): client-side
                          TTFT and end-to-end latency; fires Locust request events itself
    TritonGrpcUser        gRPC unary to `ensemble` (latency only)
    TritonHttpUser        Locust HttpUser, POST /v2/models/ensemble/generate (latency only)
    TritonHttpStreamUser  HttpUser, POST /v2/models/ensemble_stream/generate_stream (SSE): TTFT too

Every user takes its requests from the run's shared `LoadState` (environment.kvrelay): a seeded
request sequence with count and time bounds; a user stops (StopUser) when the sequence is over.
Each answered or failed request becomes a record (see `make_record`) in LoadState.records and in
the Locust event's context["kvrelay"]; Locust's own stats are named by variant.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import gevent
import locust  # noqa: F401  (monkey-patches before anything else opens sockets)
from locust import HttpUser, User, constant
from locust.exception import StopUser

from kvrelay.loadtest.workload import Request, Schedule, Workload
from kvrelay.server import client


def _grpc_gevent() -> None:
    try:
        from grpc.experimental import gevent as grpc_gevent
    except ImportError:  # no grpcio: the gRPC users cannot run anyway
        return
    grpc_gevent.init_gevent()


_grpc_gevent()

PROTOCOLS = ("grpc-stream", "grpc", "http", "http-stream")


@dataclass
class LoadState:
    """What the users of one run share (attached to the Locust Environment as `.kvrelay`)."""

    workload: Workload
    schedule: Schedule
    grpc_url: str = "127.0.0.1:8001"
    http_url: str = "127.0.0.1:8000"
    timeout_s: float = 120.0
    records: list[dict] = field(default_factory=list)
    in_flight: dict[int, tuple[Request, float]] = field(default_factory=dict)

    def abandon_in_flight(self, why: str) -> None:
        """Requests cut off by the run's end count as failed."""
        for r, t0 in list(self.in_flight.values()):
            self.records.append(make_record(r, t0, time.time() - t0, error=why))
        self.in_flight.clear()


def split_route(route: str) -> tuple[str, str]:
    kind, _, reason = (route or "").partition(":")
    return kind.strip(), reason.strip()


def make_record(
    r: Request,
    start_s: float,
    latency_s: float,
    *,
    text: str = "",
    info: dict | None = None,
    ttft_s: float | None = None,
    error: str | None = None,
) -> dict:
    info = info or {}
    kind, reason = split_route(info.get("kv_route", ""))
    return {
        "index": r.index,
        "model": r.model,
        "context_id": r.context_id,
        "max_tokens": r.max_tokens,
        "ok": error is None,
        "error": error,
        "start_s": start_s,
        "latency_s": latency_s,
        "ttft_s": ttft_s,
        "output_tokens": info.get("output_tokens", 0),
        "route": kind,
        "route_reason": reason,
        "donor": info.get("kv_donor_model", ""),
        "reused_layers": info.get("kv_reused_layers", 0),
        "recomputed_layers": info.get("kv_recomputed_layers", 0),
        "reused_tokens": info.get("kv_reused_tokens", 0),
        "text": text,
    }


# --- one request, outside Locust (also used for the warm-up) ---------------------------------------


def send_grpc(state: LoadState, r: Request, streaming: bool = True) -> dict:
    text, ctx = state.workload.payload(r)
    t0 = time.time()
    try:
        if streaming:
            res = client.stream(
                state.grpc_url,
                text,
                r.max_tokens,
                model=r.model,
                context=ctx,
                tenant=r.tenant,
                timeout_s=state.timeout_s,
            )
        else:
            res = client.infer(
                state.grpc_url,
                text,
                r.max_tokens,
                protocol="grpc",
                model=r.model,
                context=ctx,
                tenant=r.tenant,
                timeout_s=state.timeout_s,
            )
    except Exception as e:  # noqa: BLE001 - a failed request is a data point, not a crash
        return make_record(r, t0, time.time() - t0, error=f"{type(e).__name__}: {e}")
    return make_record(r, t0, res.latency_s, text=res.text, info=res.info, ttft_s=res.ttft_s)


def send_http(state: LoadState, r: Request) -> dict:
    text, ctx = state.workload.payload(r)
    t0 = time.time()
    try:
        res = client.infer(
            state.http_url,
            text,
            r.max_tokens,
            protocol="http",
            model=r.model,
            context=ctx,
            tenant=r.tenant,
            timeout_s=state.timeout_s,
        )
    except Exception as e:  # noqa: BLE001
        return make_record(r, t0, time.time() - t0, error=f"{type(e).__name__}: {e}")
    return make_record(r, t0, res.latency_s, text=res.text, info=res.info)


def send_direct(state: LoadState, r: Request, protocol: str) -> dict:
    if protocol.startswith("grpc"):
        return send_grpc(state, r, streaming=protocol == "grpc-stream")
    return send_http(state, r)


def generate_body(state: LoadState, r: Request, stream: bool = False) -> dict:
    text, ctx = state.workload.payload(r)
    body = {"text_input": text, "max_tokens": r.max_tokens, "variant_name": r.model, "tenant": r.tenant}
    if ctx is not None:
        body["context"] = ctx
    if stream:
        body["stream"] = True
    return body


def info_from_json(d: dict) -> dict:
    keys = (
        "kv_reused_layers",
        "kv_recomputed_layers",
        "kv_reused_tokens",
        "output_tokens",
        "first_token_time_ns",
        "kv_donor_model",
        "kv_route",
    )
    return {k: d[k] for k in keys if k in d}


# --- Locust users -------------------------------------------------------------------------------


class _Workload:
    """Shared task: next request from the schedule (sleeping until a Poisson arrival), send, record."""

    wait_time = constant(0)
    request_type = "kvrelay"

    def _kvrelay(self) -> LoadState:
        st = getattr(self.environment, "kvrelay", None)
        if st is None:
            raise RuntimeError("no kvrelay LoadState on the Locust environment (see loadtest/locustfile.py)")
        return st

    def one_request(self):
        st = self._kvrelay()
        r = st.schedule.next()
        if r is None:
            raise StopUser()
        wait = st.schedule.wait_s(r)
        if wait > 0:
            gevent.sleep(wait)
        st.schedule.begin()
        st.in_flight[r.index] = (r, time.time())
        try:
            rec = self.send(st, r)
        finally:
            mine = st.in_flight.pop(r.index, None) is not None
            st.schedule.end()
        if mine:  # else the run's end already recorded it as cut off: one record per request
            st.records.append(rec)

    tasks = [one_request]  # a plain list: Locust collects tasks from bases' `tasks`, not from mixins' @task

    def fire(self, rec: dict) -> None:
        self.environment.events.request.fire(
            request_type=self.request_type,
            name=rec["model"],
            response_time=rec["latency_s"] * 1000.0,
            response_length=len(rec["text"].encode()),
            response=None,
            context={"kvrelay": rec},
            exception=None if rec["ok"] else RuntimeError(rec["error"]),
            start_time=rec["start_s"],
            url=None,
        )


class TritonGrpcStreamUser(_Workload, User):
    """gRPC streaming (`ensemble_stream`): TTFT as the client sees it."""

    request_type = "grpc-stream"

    def send(self, st: LoadState, r: Request) -> dict:
        rec = send_grpc(st, r, streaming=True)
        self.fire(rec)
        return rec


class TritonGrpcUser(_Workload, User):
    """gRPC unary (`ensemble`)."""

    request_type = "grpc"

    def send(self, st: LoadState, r: Request) -> dict:
        rec = send_grpc(st, r, streaming=False)
        self.fire(rec)
        return rec


class TritonHttpUser(_Workload, HttpUser):
    """Locust's HttpUser on /v2/models/ensemble/generate (one JSON answer)."""

    request_type = "http"

    def send(self, st: LoadState, r: Request) -> dict:
        t0 = time.time()
        with self.client.post(
            "/v2/models/ensemble/generate",
            json=generate_body(st, r),
            name=r.model,
            catch_response=True,
            timeout=st.timeout_s,
        ) as resp:
            lat = time.time() - t0
            try:
                d = resp.json()
            except ValueError:
                d = {}
            if resp.status_code != 200 or "error" in d:
                rec = make_record(r, t0, lat, error=f"HTTP {resp.status_code}: {d.get('error', resp.text[:200])}")
                resp.failure(rec["error"])
            else:
                rec = make_record(r, t0, lat, text=d.get("text_output", ""), info=info_from_json(d))
                resp.success()
            resp.request_meta["context"]["kvrelay"] = rec
        return rec


class TritonHttpStreamUser(_Workload, HttpUser):
    """HttpUser on /v2/models/ensemble_stream/generate_stream (server-sent events): TTFT too."""

    request_type = "http-stream"

    def send(self, st: LoadState, r: Request) -> dict:
        t0 = time.time()
        ttft, parts, info, error = None, [], {}, None
        with self.client.post(
            "/v2/models/ensemble_stream/generate_stream",
            json=generate_body(st, r, stream=True),
            name=r.model,
            catch_response=True,
            stream=True,
            timeout=st.timeout_s,
        ) as resp:
            try:
                if resp.status_code != 200:
                    error = f"HTTP {resp.status_code}: {resp.text[:200]}"
                else:
                    for line in resp.iter_lines():
                        if not line.startswith(b"data:"):
                            continue
                        ev = json.loads(line[5:])
                        if "error" in ev:
                            error = str(ev["error"])
                            break
                        if ttft is None:
                            ttft = time.time() - t0
                        parts.append(ev.get("text_output", ""))
                        info = info_from_json(ev)
            except Exception as e:  # noqa: BLE001
                error = f"{type(e).__name__}: {e}"
            lat = time.time() - t0
            rec = (
                make_record(r, t0, lat, error=error)
                if error
                else make_record(r, t0, lat, text="".join(parts), info=info, ttft_s=ttft)
            )
            resp.request_meta["response_time"] = lat * 1000.0
            resp.request_meta["context"]["kvrelay"] = rec
            if error:
                resp.failure(error)
            else:
                resp.success()
        return rec


USER_CLASSES = {
    "grpc-stream": TritonGrpcStreamUser,
    "grpc": TritonGrpcUser,
    "http": TritonHttpUser,
    "http-stream": TritonHttpStreamUser,
}


def quit_when_done(environment, poll_s: float = 0.25, grace_s: float = 30.0):
    """A greenlet that quits the runner once the schedule is done (or its time bound + grace passed)."""

    def watch():
        st: LoadState = environment.kvrelay
        while True:
            gevent.sleep(poll_s)
            sched = st.schedule
            over = sched.duration_s is not None and sched.elapsed() > sched.duration_s + grace_s
            if sched.done or over:
                sched.close()
                st.abandon_in_flight("cut off at the run's time limit")
                environment.runner.quit()
                return

    return gevent.spawn(watch)
