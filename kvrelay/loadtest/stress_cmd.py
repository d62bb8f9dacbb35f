"""`kvrelay stress`: many concurrent mixed clients against a server; errors, latency, server RSS/threads.

    kvrelay stress --family tiny --clients 64 --duration 600               # starts its own server
    kvrelay stress --family tiny --store redis --clients 64 --duration 600 # ... with a throwaway redis-server
    kvrelay stress --url 127.0.0.1:8000 --grpc-url 127.0.0.1:8001          # a server already running

Exit code 1 when any request failed or any stub died, so a script can gate on it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.loadtest.options import check_url, int_range
from kvrelay.server import procstats


def add_arguments(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--family", help="start a server for this family with defaults (default: tiny)")
    g.add_argument("--deployment", help="start a server for this deployment TOML (deploy/*.toml)")
    g.add_argument("--url", help="HTTP address HOST:PORT of a running kvrelay server (loopback only)")
    p.add_argument("--grpc-url", help="with --url: its gRPC address (default: the HTTP port + 1)")
    p.add_argument(
        "--store",
        help="page store of the server it starts: memory[:SIZE], redis (a throwaway "
        "redis-server for the run) or redis://HOST:PORT/DB",
    )
    p.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    p.add_argument("--duration", type=float, default=600.0, help="seconds of load (default 600)")
    p.add_argument("--contexts", type=int, default=10, help="shared contexts in the pool (default 10)")
    p.add_argument("--max-tokens", type=int_range, default=(4, 16), help="output length LO-HI tokens (default 4-16)")
    p.add_argument(
        "--disconnect",
        type=float,
        default=0.1,
        help="fraction of streaming requests that hang up after the first token (default 0.1)",
    )
    p.add_argument(
        "--kinds",
        default=",".join(("http", "grpc", "grpc-stream", "http-stream")),
        help="client kinds, comma-separated (default: all four)",
    )
    p.add_argument("--tenants", type=int, default=2, help="tenants the requests are spread over (default 2)")
    p.add_argument("--timeout", type=float, default=180.0, help="per-request timeout, seconds (default 180)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write summary.json here (a directory)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")


def _target(url: str, grpc_url: str | None) -> tuple[str, str]:
    http = check_url(url)
    host, port = http.rsplit(":", 1)
    grpc = check_url(grpc_url) if grpc_url else f"{host}:{int(port) + 1}"
    if not port.isdigit():
        raise KvRelayError(f"--url must be HOST:PORT, got {url!r}")
    return http, grpc


def _served(http_url: str) -> tuple[str, list[str]]:
    """(family, models) of a running server, from the deployment its orchestrator reads."""
    from kvrelay.serving import deployment as dp  # lazy: torch, kept out of kvrelay --help

    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/orchestrator_stream/config", timeout=10) as r:
            cfg = json.load(r)
        dep = dp.Deployment.from_json(Path(cfg["parameters"]["deployment"]["string_value"]).read_text(encoding="utf-8"))
    except OSError as e:
        raise KvRelayError(
            f"no kvrelay server answers at http://{http_url} ({e}); start one with `kvrelay serve`"
        ) from None
    except (KeyError, ValueError) as e:
        raise KvRelayError(f"the server at {http_url} is not a kvrelay deployment ({e})") from None
    return dep.family, dep.model_names


def run(args) -> int:
    from kvrelay.loadtest import stress  # lazy: numpy, kept out of kvrelay --help

    if args.grpc_url and not args.url:
        raise KvRelayError("--grpc-url only goes with --url")
    if args.url and args.store:
        raise KvRelayError("--store applies to the server kvrelay stress starts, not to --url")
    if args.contexts < 1 or args.tenants < 1:
        raise KvRelayError("--contexts and --tenants must be >= 1")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    # every argument checked before a server starts (placeholders for what the server supplies)
    stress.StressSpec(
        "-",
        "-",
        ("-",),
        ("-",),
        clients=args.clients,
        duration_s=args.duration,
        disconnect=args.disconnect,
        kinds=kinds,
    ).validate()
    redis = server = None
    try:
        if args.url:
            http, grpc = _target(args.url, args.grpc_url)
            family, models = _served(http)
            pid = procstats.server_pid_for_port(int(http.rsplit(":", 1)[1]))
        else:
            # lazy: torch, kept out of kvrelay --help
            from kvrelay.server.launch import resolve, start

            if args.store == "redis":
                from kvrelay.store.redis_server import RedisServer

                redis = RedisServer()
                args.store = redis.url
            dep, _ = resolve(family=args.family, deployment=args.deployment, store=args.store)
            workdir = Path(tempfile.mkdtemp(prefix="kvrelay-stress-"))
            print(
                f"kvrelay: starting a server for {dep.family} ({', '.join(dep.model_names)}), store {dep.store}; "
                f"log {workdir / 'tritonserver.log'}",
                file=sys.stderr,
            )
            server = start(dep, workdir)
            http, grpc, family, models, pid = (
                server.http_url,
                server.grpc_url,
                dep.family,
                dep.model_names,
                server.proc.pid,
            )
        spec = stress.StressSpec(
            http,
            grpc,
            tuple(models),
            stress.contexts(family, args.contexts),
            clients=args.clients,
            duration_s=args.duration,
            max_tokens=args.max_tokens,
            disconnect=args.disconnect,
            kinds=kinds,
            timeout_s=args.timeout,
            seed=args.seed,
            tenants=tuple(f"stress-{i}" for i in range(args.tenants)),
            server_pid=pid,
        ).validate()
        print(f"kvrelay: {spec.clients} clients for {spec.duration_s:.0f} s against {http} / {grpc}", file=sys.stderr)
        res = stress.run(
            spec,
            progress=lambda r: print(
                f"\rkvrelay: {len(r.outcomes)} requests, {sum(not o.ok for o in r.outcomes)} errors",
                end="",
                file=sys.stderr,
                flush=True,
            ),
        )
        print(file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
        if redis is not None:
            redis.stop()
    s = stress.summary(res)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps(s, indent=1) if args.json else stress.render(s))
    return 1 if s["errors"] or s["server"].get("died") else 0
