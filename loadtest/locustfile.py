"""Locust file for a running kvrelay server (the users and workload live in kvrelay.loadtest).

    kvrelay serve --family tiny &                       # HTTP :8000, gRPC :8001
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 4 -r 4 \
        --kvrelay-family tiny --kvrelay-requests 100 --kvrelay-out /tmp/lt.json

All four user kinds share the load unless named on the command line, e.g.
`locust -f loadtest/locustfile.py GrpcStreamUser ...` (gRPC streaming, client-side TTFT).
The run ends by itself once the request sequence (--kvrelay-requests, --kvrelay-duration) is done.
For sharing off vs. on side by side on fresh servers, use `kvrelay loadtest` instead.
"""

from __future__ import annotations

import json
import sys
from urllib.parse import urlparse

from locust import events

from kvrelay.loadtest import report
from kvrelay.loadtest import users as lu
from kvrelay.loadtest import workload as wl


class GrpcStreamUser(lu.TritonGrpcStreamUser):
    """gRPC streaming to ensemble_stream: TTFT + latency."""


class GrpcUser(lu.TritonGrpcUser):
    """gRPC unary to ensemble."""


class HttpGenerateUser(lu.TritonHttpUser):
    """HTTP POST /v2/models/ensemble/generate."""


class HttpStreamUser(lu.TritonHttpStreamUser):
    """HTTP POST /v2/models/ensemble_stream/generate_stream (SSE): TTFT + latency."""


@events.init_command_line_parser.add_listener
def _arguments(parser):
    g = parser.add_argument_group("kvrelay")
    g.add_argument("--kvrelay-family", default="tiny", help="family the server runs (its models and tokenizer)")
    g.add_argument("--kvrelay-deployment", default="", help="deployment TOML the server runs (instead of the family)")
    g.add_argument("--kvrelay-grpc", default="", help="gRPC HOST:PORT (default: --host's host, port + 1)")
    g.add_argument("--kvrelay-requests", type=int, default=100, help="requests in the sequence")
    g.add_argument("--kvrelay-duration", type=float, default=300.0, help="time bound, seconds")
    g.add_argument("--kvrelay-contexts", type=int, default=24, help="shared contexts in the pool")
    g.add_argument("--kvrelay-context-tokens", default="1024-4000", help="context length LO-HI tokens")
    g.add_argument("--kvrelay-max-tokens", default="8-32", help="output length LO-HI tokens")
    g.add_argument("--kvrelay-zipf", type=float, default=1.0, help="Zipf exponent of context popularity")
    g.add_argument("--kvrelay-rate", type=float, default=0.0, help="Poisson arrivals/s (0: closed loop)")
    g.add_argument("--kvrelay-seed", type=int, default=0)
    g.add_argument("--kvrelay-warmup", type=int, default=1, help="warm-up rounds before the users start")
    g.add_argument("--kvrelay-timeout", type=float, default=120.0, help="per-request timeout, seconds")
    g.add_argument("--kvrelay-out", default="", help="write the run's summary JSON (and records) here")


def _range(text: str) -> tuple[int, int]:
    a, _, b = str(text).partition("-")
    return int(a), int(b or a)


_workload: wl.Workload | None = None


@events.init.add_listener
def _init(environment, **_):
    global _workload
    o = environment.parsed_options
    if o is None:  # imported by something other than the locust command
        return
    host = urlparse(environment.host or "http://127.0.0.1:8000")
    if host.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"kvrelay locustfile: --host {environment.host}: load tests only target this machine")
    from kvrelay.serving import deployment as dp
    from kvrelay.families import family_models

    if o.kvrelay_deployment:
        dep = dp.load(o.kvrelay_deployment)
        family, models = dep.family, dep.model_names
    else:
        family, models = o.kvrelay_family, family_models(o.kvrelay_family)
    spec = wl.WorkloadSpec(
        family=family,
        models=tuple(models),
        requests=o.kvrelay_requests,
        contexts=o.kvrelay_contexts,
        context_tokens=_range(o.kvrelay_context_tokens),
        max_tokens=_range(o.kvrelay_max_tokens),
        zipf_s=o.kvrelay_zipf,
        rate=o.kvrelay_rate or None,
        seed=o.kvrelay_seed,
        warmup=o.kvrelay_warmup,
    )
    _workload = wl.build(spec)


@events.test_start.add_listener
def _start(environment, **_):
    o = environment.parsed_options
    host = urlparse(environment.host or "http://127.0.0.1:8000")
    http_url = f"{host.hostname}:{host.port or 80}"
    grpc_url = o.kvrelay_grpc or f"{host.hostname}:{(host.port or 8000) + 1}"
    state = lu.LoadState(
        _workload,
        wl.Schedule(_workload.requests, o.kvrelay_duration),
        grpc_url=grpc_url,
        http_url=http_url,
        timeout_s=o.kvrelay_timeout,
    )
    protocol = (
        "grpc-stream" if any(issubclass(c, lu.TritonGrpcStreamUser) for c in environment.user_classes) else "http"
    )
    for r in _workload.warmup_requests:  # excluded from Locust's stats: sent directly
        rec = lu.send_direct(state, r, protocol)
        if not rec["ok"]:
            print(f"kvrelay: warm-up request failed: {rec['error']}", file=sys.stderr)
    environment.kvrelay = state
    lu.quit_when_done(environment, grace_s=o.kvrelay_timeout)


@events.test_stop.add_listener
def _stop(environment, **_):
    state = getattr(environment, "kvrelay", None)
    if state is None:
        return
    s = report.summarize(state.records, state.schedule.window_s)
    print("kvrelay: " + json.dumps({k: s[k] for k in report.SUMMARY_KEYS}), file=sys.stderr)
    out = environment.parsed_options.kvrelay_out
    if out:
        report.write_json({"summary": s, "workload": _workload.describe(), "records": state.records}, out)
