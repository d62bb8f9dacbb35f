"""`kvrelay loadtest`: the same seeded workload against sharing off, then sharing on; one report.

    kvrelay loadtest --family tiny --requests 120 --users 4 --json
    kvrelay loadtest --deployment deploy/llama8b-gpu.toml --users 32 --requests 2000
    kvrelay loadtest --family smol --url 127.0.0.1:8001 --mode on      # a server already running

Writes into --out (default ./loadtest-results/<timestamp>/): summary.json, Locust CSV stats and HTML
report per mode, requests_<mode>.jsonl (one record per request), loadtest.png; the servers'
repositories and logs under servers/<mode>/.
"""

from __future__ import annotations

from kvrelay.errors import KvRelayError
from kvrelay.loadtest.options import int_range, interrupts_stop_cleanly


def add_arguments(p):
    p.add_argument(
        "--scenario",
        choices=["mixed", "goodput"],
        default="mixed",
        help="mixed (default): a closed-loop mix of senders and receivers, sharing off vs on; goodput: "
        "DroidSpeak's measurement, Poisson receiver requests over stored sender KV, SLO at the knee "
        "of full prefill (see the README's Goodput section)",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--family", help="family served with defaults (default: tiny)")
    g.add_argument("--deployment", help="deployment TOML (deploy/*.toml), e.g. deploy/llama8b-gpu.toml")
    p.add_argument(
        "--store",
        help="page store override (default: the deployment's, grown to what the workload "
        "publishes, up to a third of this machine's memory; always a fresh in-memory one)",
    )
    p.add_argument("--profiles", help="profiles directory (default: the deployment's, i.e. the checkout's profiles/)")
    p.add_argument(
        "--plan",
        help="recompute plan for every pair, e.g. 8-16 (layers [8,16)): written as fixed profiles "
        "under --out and used instead of measured ones; for throughput runs of families "
        "without profiles (llama8b-random). Quality figures are then not a profile's",
    )
    p.add_argument(
        "--quality-target",
        type=float,
        help="selector's relative quality tolerance (default: the deployment's, 0.01 = within 1%%)",
    )
    p.add_argument("--users", type=int, default=4, help="concurrent Locust users (default 4)")
    p.add_argument("--duration", type=float, default=900.0, help="time bound per mode, seconds (default 900)")
    p.add_argument("--requests", type=int, default=96, help="measured requests per mode (default 96)")
    p.add_argument("--contexts", type=int, help="shared contexts in the pool (default 12; goodput 6, --quick 2)")
    p.add_argument(
        "--context-tokens",
        type=int_range,
        help="context length LO-HI tokens (default 2048-4000; goodput 4096-8000, --quick 2048-3072)",
    )
    p.add_argument(
        "--max-tokens", type=int_range, help="output length LO-HI tokens (default 8-16; goodput: HI, default 12)"
    )
    p.add_argument(
        "--zipf", type=float, default=0.5, help="Zipf exponent of context popularity (0 = uniform; default 0.5)"
    )
    p.add_argument(
        "--variant-zipf",
        type=float,
        default=0.0,
        help="Zipf exponent of model popularity, in the deployment's order (0 = uniform, the default)",
    )
    p.add_argument(
        "--rate", type=float, help="Poisson arrivals per second (default: closed loop, each user back-to-back)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds per mode, every model once each (default 2)")
    p.add_argument(
        "--protocol",
        choices=["grpc-stream", "grpc", "http", "http-stream"],
        default="grpc-stream",
        help="Locust user: gRPC streaming (TTFT; default), gRPC unary, HTTP generate, HTTP SSE (TTFT)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds (default 600)")
    p.add_argument(
        "--quality-samples",
        type=int,
        default=64,
        help="reuse-served requests compared with sharing off for the quality check (default 64)",
    )
    p.add_argument(
        "--url",
        help="target a running server at HOST:PORT (loopback only) instead of starting two; "
        "the port of --protocol (gRPC or HTTP)",
    )
    p.add_argument("--mode", choices=["on", "off"], help="with --url: which mode that server runs (label only)")
    p.add_argument("--out", help="results directory (default ./loadtest-results/<timestamp>)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    g = p.add_argument_group("goodput scenario")
    g.add_argument(
        "--pairs",
        help="SENDER:RECEIVER,... (default: every ordered pair the selector would reuse whose "
        "profile predicts its plan's agreement (flip model); else every pair it would reuse)",
    )
    g.add_argument("--modes", help="full,plan,reuse (default all three; full is required: it sets the SLO)")
    g.add_argument("--slo-ttft", type=float, help="p90 TTFT SLO in seconds (default: the knee of full prefill's curve)")
    g.add_argument("--point-requests", type=int, help="requests per rate point (default 10; --quick 4)")
    g.add_argument("--point-seconds", type=float, help="arrival window per rate point, s (default 300; --quick 90)")
    g.add_argument("--quick", action="store_true", help="a short run: 2 shorter contexts, 3-4 rates, 4 requests each")
    g.add_argument(
        "--resummarize",
        metavar="DIR",
        help="recompute an earlier goodput run's summary, SLO and plots "
        "from its measured points (with --slo-ttft: at that SLO)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")


def run(args) -> int:
    """Dispatch to the scenario's module: goodput or mixed."""
    # Locust first: it monkey-patches the process with gevent on import.
    from kvrelay.loadtest import runner as lr  # noqa: F401,I001

    if args.scenario == "goodput":
        from kvrelay.loadtest import goodput  # lazy: torch, kept out of kvrelay --help

        _validate_goodput(args)
        interrupts_stop_cleanly()
        return goodput.run(args)
    from kvrelay.loadtest import mixed  # lazy: torch, kept out of kvrelay --help

    return mixed.run(args)


def _validate_goodput(args) -> None:
    if args.url or args.mode:
        raise KvRelayError("the goodput scenario starts its own servers: no --url or --mode")
    if args.variant_zipf:
        raise KvRelayError("--variant-zipf is for the mixed scenario: goodput asks each pair's receiver")
    if args.plan and args.profiles:
        raise KvRelayError("--plan writes its own profiles: give --plan or --profiles, not both")
