"""A stress run against a kvrelay server: many concurrent clients mixing every way in.

Each client is a thread that, until the deadline, picks a protocol (HTTP unary `ensemble`, gRPC unary
`ensemble`, gRPC streaming `ensemble_stream`, HTTP SSE `generate_stream`), a variant and a shared
context, and sends one request; a fraction of the streaming requests disconnect after the first
token. It checks each answer (text present, output_tokens in range) and records errors by message.
The server's processes are sampled from /proc all along: RSS and threads of tritonserver and every
stub, and whether any stub died or was replaced.

No Locust here on purpose: plain threads with the real tritonclient, one client object per thread
(as applications hold them), so what is measured is the server, not a load generator's scheduler.
"""

from __future__ import annotations

import http.client
import json
import queue
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.loadtest.report import percentile
from kvrelay.model.synthetic import is_synthetic
from kvrelay.server import procstats
from kvrelay.server.client import _info, _inputs, _message, _text

KINDS = ("http", "grpc", "grpc-stream", "http-stream")
QUESTIONS = (
    "Summarise the text above.",
    "What is this about?",
    "Name one function above.",
    "Which term appears most?",
    "Explain the first line.",
)


@dataclass(slots=True)
class StressSpec:
    http_url: str
    grpc_url: str
    models: tuple[str, ...]
    contexts: tuple[str, ...]
    clients: int = 64
    duration_s: float = 600.0
    max_tokens: tuple[int, int] = (4, 16)
    disconnect: float = 0.1  # fraction of streaming requests that hang up after the first token
    kinds: tuple[str, ...] = KINDS
    timeout_s: float = 180.0  # per request: past it the request counts as an error ("timeout")
    seed: int = 0
    tenants: tuple[str, ...] = ("stress",)
    server_pid: int | None = None
    sample_every_s: float = 5.0

    def validate(self) -> "StressSpec":
        if self.clients < 1:
            raise KvRelayError("--clients must be >= 1")
        if self.duration_s <= 0:
            raise KvRelayError("--duration must be > 0")
        if not 0 <= self.disconnect <= 1:
            raise KvRelayError(f"--disconnect must be in 0..1, got {self.disconnect}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise KvRelayError(f"unknown client kind(s) {bad}; choose from {list(KINDS)}")
        if not self.models or not self.contexts:
            raise KvRelayError("a stress run needs at least one model and one context")
        return self


@dataclass(slots=True)
class Outcome:
    kind: str
    model: str
    ok: bool
    latency_s: float
    ttft_s: float | None = None
    error: str = ""
    disconnected: bool = False
    route: str = ""


@dataclass(slots=True)
class StressResult:
    spec: StressSpec
    outcomes: list[Outcome] = field(default_factory=list)
    samples: list[tuple[float, list[procstats.Proc]]] = field(default_factory=list)
    wall_s: float = 0.0


def _norm(msg: str) -> str:
    """Group error messages: numbers, ids and addresses vary from one request to the next."""
    msg = re.sub(r"0x[0-9a-f]+|\b[0-9a-f]{8,}\b", "<id>", msg.strip().splitlines()[0] if msg.strip() else "?")
    return re.sub(r"\d+(\.\d+)?", "N", msg)[:200]


class _Client:
    """One thread's clients: an HTTP and a gRPC tritonclient, kept for the thread's whole run."""

    def __init__(self, spec: StressSpec, rng: random.Random):
        import tritonclient.grpc as grpcclient
        import tritonclient.http as httpclient

        self.spec, self.rng = spec, rng
        self.http = httpclient.InferenceServerClient(
            spec.http_url, network_timeout=spec.timeout_s, connection_timeout=spec.timeout_s
        )
        self.grpc = grpcclient.InferenceServerClient(spec.grpc_url)
        self.httpmod, self.grpcmod = httpclient, grpcclient

    def close(self):
        for c in (self.http, self.grpc):
            try:
                c.close()
            except Exception:
                pass

    def one(self) -> Outcome:
        s, rng = self.spec, self.rng
        kind, model = rng.choice(s.kinds), rng.choice(s.models)
        context, question = rng.choice(s.contexts), rng.choice(QUESTIONS)
        n = rng.randint(*s.max_tokens)
        hang_up = kind.endswith("stream") and rng.random() < s.disconnect
        kw = dict(model=model, context=context, tenant=rng.choice(s.tenants))
        t0 = time.perf_counter()
        out = Outcome(kind, model, False, 0.0, disconnected=hang_up)
        try:
            if kind in ("http", "grpc"):
                info = self._unary(kind, question, n, kw)
            elif kind == "grpc-stream":
                info, out.ttft_s = self._grpc_stream(question, n, kw, hang_up, t0)
            else:
                info, out.ttft_s = self._sse(question, n, kw, hang_up, t0)
            _check(info, n, hang_up)
            out.ok, out.route = True, str(info.get("kv_route", "")).split(":")[0]
        except Exception as e:  # every failure is a finding: keep its message
            out.error = f"{kind}: {_norm(_message(e))}"
        out.latency_s = time.perf_counter() - t0
        return out

    def _unary(self, kind, question, n, kw) -> dict:
        if kind == "http":
            res = self.http.infer("ensemble", _inputs(self.httpmod, question, n, **kw))
        else:
            res = self.grpc.infer(
                "ensemble", _inputs(self.grpcmod, question, n, **kw), client_timeout=self.spec.timeout_s
            )
        return {**_info(res), "text": _text(res)}

    def _grpc_stream(self, question, n, kw, hang_up, t0) -> tuple[dict, float | None]:
        q: queue.Queue = queue.Queue()
        ttft, info, text, complete = None, {}, "", False
        self.grpc.start_stream(callback=lambda result, error: q.put((result, error)))
        try:
            self.grpc.async_stream_infer(
                "ensemble_stream",
                _inputs(self.grpcmod, question, n, stream=True, **kw),
                enable_empty_final_response=True,
            )
            while True:
                try:
                    res, err = q.get(timeout=self.spec.timeout_s)
                except queue.Empty:
                    raise KvRelayError("timeout") from None
                if err is not None:
                    raise KvRelayError(_message(err))
                if res.as_numpy("text_output") is not None:
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text += _text(res)
                    info = _info(res)
                    if hang_up:
                        return {**info, "text": text}, ttft
                p = res.get_response().parameters.get("triton_final_response")
                if p is not None and p.bool_param:
                    complete = True
                    return {**info, "text": text}, ttft
        finally:  # an unfinished stream is cancelled, else stop_stream waits for the server forever
            self.grpc.stop_stream(cancel_requests=not complete)

    def _sse(self, question, n, kw, hang_up, t0) -> tuple[dict, float | None]:
        host, port = self.spec.http_url.rsplit(":", 1)
        body = {"text_input": question, "max_tokens": n, "stream": True, **{k: v for k, v in kw.items() if v}}
        conn = http.client.HTTPConnection(host, int(port), timeout=self.spec.timeout_s)
        ttft, info, text = None, {}, ""
        try:
            conn.request(
                "POST",
                "/v2/models/ensemble_stream/generate_stream",
                json.dumps(body),
                {"Content-Type": "application/json"},
            )
            r = conn.getresponse()
            if r.status != 200:
                raise KvRelayError(f"HTTP {r.status}: {r.read()[:300].decode(errors='replace')}")
            for line in r:
                if not line.startswith(b"data:"):
                    continue
                ev = json.loads(line[5:])
                if "error" in ev:
                    raise KvRelayError(ev["error"])
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text += ev.get("text_output", "")
                info = ev
                if hang_up:
                    break
            return {**info, "text": text}, ttft
        finally:
            conn.close()


def _check(info: dict, n: int, hung_up: bool) -> None:
    got = info.get("output_tokens")
    if got is None:
        raise KvRelayError("no output_tokens in the answer")
    if not hung_up and not 1 <= int(got) <= n:
        raise KvRelayError(f"output_tokens {got} outside 1..{n}")


def run(spec: StressSpec, progress=None) -> StressResult:
    spec.validate()
    res = StressResult(spec)
    deadline = time.monotonic() + spec.duration_s
    lock, stop = threading.Lock(), threading.Event()
    t_start = time.monotonic()

    def sample():
        if spec.server_pid:
            res.samples.append((time.monotonic() - t_start, procstats.server_tree(spec.server_pid)))

    def worker(i):
        c = _Client(spec, random.Random(spec.seed * 1000 + i))
        try:
            while time.monotonic() < deadline and not stop.is_set():
                o = c.one()
                with lock:
                    res.outcomes.append(o)
        finally:
            c.close()

    sample()
    threads = [threading.Thread(target=worker, args=(i,), name=f"stress-{i}", daemon=True) for i in range(spec.clients)]
    for t in threads:
        t.start()
    give_up = deadline + spec.timeout_s + 30  # a client stuck past its own timeout is itself a finding
    try:
        while any(t.is_alive() for t in threads) and time.monotonic() < give_up:
            time.sleep(min(spec.sample_every_s, 1.0))
            if time.monotonic() - t_start >= len(res.samples) * spec.sample_every_s:
                sample()
                if progress:
                    progress(res)
    except KeyboardInterrupt:
        stop.set()
        raise
    finally:
        stop.set()
    stuck = [t for t in threads if t.is_alive()]
    for _ in stuck:
        res.outcomes.append(
            Outcome("?", "?", False, time.monotonic() - t_start, error="no answer: client stuck past its timeout")
        )
    res.wall_s = time.monotonic() - t_start
    sample()
    return res


def _pct(xs: list[float], q: float) -> float | None:
    v = percentile(xs, q)  # the load tests' one percentile (linear), as report.py and goodput compute it
    return None if v is None else round(v, 3)


def _procs_summary(res: StressResult) -> dict:
    if not res.samples:
        return {}
    first, last = res.samples[0][1], res.samples[-1][1]
    warm = [s for t, s in res.samples if t >= min(60.0, res.spec.duration_s / 4)] or [last]
    by = lambda procs: {f"{p.name}[{p.pid}]": p for p in procs}
    f, l, w = by(first), by(last), by(warm[0])
    died = sorted(set(f) - set(l))
    started = sorted(set(l) - set(f))
    rows = {}
    for k, p in l.items():
        b = f.get(k)
        rows[k] = {
            "rss_mib_start": round(b.rss_mib, 1) if b else None,
            "rss_mib_after_warmup": round(w[k].rss_mib, 1) if k in w else None,
            "rss_mib_end": round(p.rss_mib, 1),
            "threads_start": b.threads if b else None,
            "threads_end": p.threads,
        }
    return {
        "processes": rows,
        "died": died,
        "started": started,
        "total_rss_mib_start": round(sum(p.rss_mib for p in first), 1),
        "total_rss_mib_after_warmup": round(sum(p.rss_mib for p in warm[0]), 1),
        "total_rss_mib_end": round(sum(p.rss_mib for p in last), 1),
    }


def summary(res: StressResult) -> dict:
    oc = res.outcomes
    errors = Counter(o.error for o in oc if not o.ok)
    kinds = {}
    for k in res.spec.kinds:
        mine = [o for o in oc if o.kind == k]
        good = [o for o in mine if o.ok and not o.disconnected]
        kinds[k] = {
            "requests": len(mine),
            "errors": sum(not o.ok for o in mine),
            "disconnected": sum(o.disconnected for o in mine),
            "latency_s": {f"p{q}": _pct([o.latency_s for o in good], q) for q in (50, 90, 99)},
            "ttft_s": {f"p{q}": _pct([o.ttft_s for o in good if o.ttft_s is not None], q) for q in (50, 90, 99)},
        }
    return {
        "clients": res.spec.clients,
        "duration_s": res.spec.duration_s,
        "wall_s": round(res.wall_s, 1),
        "requests": len(oc),
        "errors": sum(errors.values()),
        "errors_by_message": dict(errors.most_common(20)),
        "requests_per_s": round(len(oc) / res.wall_s, 3) if res.wall_s else None,
        "routes": dict(Counter(o.route for o in oc if o.ok)),
        "by_kind": kinds,
        "models": list(res.spec.models),
        "server": _procs_summary(res),
    }


def render(s: dict) -> str:
    lines = [
        f"stress: {s['clients']} clients, {s['wall_s']} s: {s['requests']} requests, {s['errors']} errors, "
        f"{s['requests_per_s']} req/s; routes {s['routes']}"
    ]
    for k, v in s["by_kind"].items():
        lat, tt = v["latency_s"], v["ttft_s"]
        lines.append(
            f"  {k:12s} {v['requests']:6d} req {v['errors']:4d} err {v['disconnected']:4d} hung up  "
            f"latency p50/p90/p99 {lat['p50']}/{lat['p90']}/{lat['p99']} s"
            + (f"  ttft p50/p90/p99 {tt['p50']}/{tt['p90']}/{tt['p99']} s" if tt["p50"] is not None else "")
        )
    for msg, n in s["errors_by_message"].items():
        lines.append(f"  error x{n}: {msg}")
    srv = s.get("server") or {}
    if srv:
        lines.append(
            f"  server RSS (all processes) start {srv['total_rss_mib_start']} MiB, after warm-up "
            f"{srv['total_rss_mib_after_warmup']} MiB, end {srv['total_rss_mib_end']} MiB"
        )
        for name, p in srv["processes"].items():
            lines.append(
                f"    {name:34s} RSS {p['rss_mib_start']} -> {p['rss_mib_after_warmup']} -> {p['rss_mib_end']} MiB, "
                f"threads {p['threads_start']} -> {p['threads_end']}"
            )
        lines.append(f"  stubs died: {srv['died'] or 'none'}; started during the run: {srv['started'] or 'none'}")
    return "\n".join(lines)


def source_contexts(n: int, chars: tuple[int, int] = (1500, 3000), seed: int = 0) -> tuple[str, ...]:
    """Shared contexts cut from this package's own source: text on disk everywhere kvrelay runs."""
    rng = random.Random(seed)
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(Path(__file__).parent.parent.rglob("*.py")))
    out = []
    for _ in range(n):
        size = rng.randint(*chars)
        start = rng.randrange(0, max(1, len(text) - size))
        out.append(text[start : start + size])
    return tuple(out)


def token_contexts(n: int, tokens: tuple[int, int] = (300, 600), vocab: int = 1000, seed: int = 0) -> tuple[str, ...]:
    """For tokenizer-less (synthetic) families: token ids written as text."""
    rng = random.Random(seed)
    return tuple(" ".join(str(rng.randrange(vocab)) for _ in range(rng.randint(*tokens))) for _ in range(n))


def contexts(family: str, n: int) -> tuple[str, ...]:
    """n shared contexts for a family's requests: token ids as text for a synthetic (tokenizer-less)
    family, else text cut from this package's source."""
    return token_contexts(n) if is_synthetic(family) else source_contexts(n)
