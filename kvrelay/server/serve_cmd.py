"""`kvrelay serve`: generate the model repository for a deployment and run tritonserver on it."""

from __future__ import annotations

import signal
import sys
import threading


def add_arguments(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--family", help="serve every model of this family with defaults (default: tiny)")
    g.add_argument("--deployment", help="deployment TOML file (see deploy/)")
    p.add_argument("--store", help="page store override: memory[:SIZE] or redis://HOST:PORT/DB")
    p.add_argument("--no-sharing", action="store_true", help="no cross-model reuse: every variant prefills itself")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    p.add_argument(
        "--workdir",
        help="where the generated repository and logs go (default: $KVRELAY_HOME/serve/"
        "<family>-<http port>, so two servers on one machine never share one)",
    )


def _interrupt(*_):
    raise KeyboardInterrupt


def run(args) -> int:
    # lazy: torch, kept out of kvrelay --help
    from kvrelay.server.launch import resolve
    from kvrelay.server.supervisor import Supervised

    # Ctrl-C / SIGTERM while models load stop cleanly (TritonServer.start cleans up on the interrupt),
    # also when the shell started us with SIGINT ignored (a background job of a script).
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    dep, workdir = resolve(
        family=args.family,
        deployment=args.deployment,
        store=args.store,
        no_sharing=args.no_sharing,
        http_port=args.http_port,
        workdir=args.workdir,
    )
    print(
        f"kvrelay: starting tritonserver for family {dep.family} ({', '.join(dep.model_names)}), "
        f"store {dep.store}, sharing {'on' if dep.sharing else 'off'}",
        file=sys.stderr,
    )
    sup = Supervised(
        dep, workdir, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port
    ).start()
    server = sup.server
    print(
        f"kvrelay: ready. HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {server.metrics_url}\n"
        f"kvrelay: log {server.log_path}; Ctrl-C to stop",
        file=sys.stderr,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            if not sup.check():  # restarts tritonserver when it or a stub died; False = crash loop
                return 1
    finally:
        print("kvrelay: stopping", file=sys.stderr)
        sup.stop()
    return 0
