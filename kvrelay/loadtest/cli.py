"""`kvrelay loadtest`: the same seeded workload against sharing off, then sharing on; one report.

    kvrelay loadtest --family tiny --requests 120 --users 4 --json
    kvrelay loadtest --deployment deploy/llama8b-gpu.toml --users 32 --requests 2000
    kvrelay loadtest --family smol --url 127.0.0.1:8001 --mode on      # a server already running

Writes into --out (default ./loadtest-results/<timestamp>/): summary.json, Locust CSV stats and HTML
report per mode, requests_<mode>.jsonl (one record per request), loadtest.png; the servers'
repositories and logs under servers/<mode>/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvrelay.errors import KvRelayError
from kvrelay.loadtest import report
from kvrelay.loadtest import workload as wl
from kvrelay.model import profile_file
from kvrelay.paths import profiles_dir
from kvrelay.units import parse_bytes, parse_range

if TYPE_CHECKING:
    from kvrelay.loadtest.workload import Workload, WorkloadSpec
    from kvrelay.serving.deployment import Deployment

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def _range(text: str) -> tuple[int, int]:
    try:
        return parse_range(text, minimum=1)
    except KvRelayError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


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
        type=_range,
        help="context length LO-HI tokens (default 2048-4000; goodput 4096-8000, --quick 2048-3072)",
    )
    p.add_argument(
        "--max-tokens", type=_range, help="output length LO-HI tokens (default 8-16; goodput: HI, default 12)"
    )
    p.add_argument(
        "--zipf", type=float, default=0.5, help="Zipf exponent of context popularity (0 = uniform; default 0.5)"
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


def _check_url(url: str) -> str:
    url = url.split("://", 1)[-1].rstrip("/")
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit():
        raise KvRelayError(f"--url must be HOST:PORT, got {url!r}")
    if host not in LOOPBACK:
        raise KvRelayError(f"--url {url}: load tests only target this machine (127.0.0.1, localhost, ::1)")
    return url


def _pages_needed(dep, workload) -> int:
    from kvrelay.serving import deployment as dp

    ids = dp.identities(dep)
    tokens = {c.id: c.tokens for c in workload.contexts}
    return sum(
        tokens[cid] * ids[m].page_format.page_bytes // ids[m].page_format.block_size
        for cid, m in {(r.context_id, r.model) for r in workload.requests}
    )


def _memory_store_bytes(dep) -> int | None:
    """The size of the deployment's in-memory store (0: the default size), None for another store."""
    kind, _, size = dep.store.partition(":")
    return None if kind != "memory" else parse_bytes(size) if size else 0


def size_store(dep, need: int) -> str:
    """Grow the run's fresh in-memory store to what the workload publishes (+10%), up to a third of
    this machine's memory (the engines and page copies in flight need the rest); says what it did
    ("" if nothing)."""
    have = _memory_store_bytes(dep)
    if have is None:
        return ""
    was = dep.store.partition(":")[2] or "default"
    want = min(int(need * 1.1), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 3)
    if want >> 20 <= have >> 20:
        return ""
    dep.store = f"memory:{want >> 20}MiB"
    return f"page store sized to the workload: {dep.store} (was {was}; --store overrides)"


def store_shortfall(dep, need: int) -> str:
    """A warning when an in-memory store cannot hold the pages this workload publishes (every
    context once per model that requests it, KV and E): evicted pages turn later hits into misses,
    in both modes, and the run then measures the store's size rather than sharing."""
    have = _memory_store_bytes(dep)
    if not have or need <= have:
        return ""
    return (
        f"the page store holds {have / 2**30:.1f} GiB but this workload publishes up to {need / 2**30:.1f} GiB of "
        f"pages: evictions will turn hits into misses in both modes (--store memory:SIZE)"
    )


def _profiles_present(dep) -> list[str]:
    names = set(dep.model_names)
    return [
        f"{s}__{r}"
        for s, r, _ in profile_file.pairs_in(profiles_dir(dep.profiles_dir), dep.family)
        if s in names and r in names
    ]


def _interrupts_stop_cleanly() -> None:
    """Ctrl-C and SIGTERM end a run cleanly (servers stopped, even when the shell started us with
    SIGINT ignored). Under gevent the handler runs in the hub, so the interrupt is thrown into the
    main greenlet, where the run's cleanup waits, never into a user's greenlet."""
    import gevent

    main = gevent.getcurrent()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, lambda: gevent.get_hub().loop.run_callback(main.throw, KeyboardInterrupt))


def run(args) -> int:
    """validate -> spec -> run -> report."""
    # Locust first: it monkey-patches the process with gevent on import.
    from kvrelay.loadtest import runner as lr  # noqa: F401,I001

    if args.scenario == "goodput":
        from kvrelay.loadtest import goodput

        _validate_goodput(args)
        _interrupts_stop_cleanly()
        return goodput.run(args)
    url = _validate_mixed(args)
    plan = _plan_mixed(args, url)
    runs = _run_mixed(args, url, plan)
    return _report_mixed(args, url, plan, runs)


def _validate_goodput(args) -> None:
    if args.url or args.mode:
        raise KvRelayError("the goodput scenario starts its own servers: no --url or --mode")
    if args.plan and args.profiles:
        raise KvRelayError("--plan writes its own profiles: give --plan or --profiles, not both")


def _validate_mixed(args) -> str | None:
    """Defaults filled in and the arguments checked against each other; the server URL, if any."""
    args.contexts = args.contexts or 12
    args.context_tokens = args.context_tokens or (2048, 4000)
    args.max_tokens = args.max_tokens or (8, 16)
    if args.mode and not args.url:
        raise KvRelayError("--mode only goes with --url (without --url both modes run on fresh servers)")
    if args.url and not args.mode:
        raise KvRelayError("--url needs --mode on|off: say whether that server shares KV across models")
    if args.users < 1:
        raise KvRelayError("--users must be >= 1")
    if args.duration <= 0:
        raise KvRelayError("--duration must be > 0")
    url = _check_url(args.url) if args.url else None
    if args.plan and url:
        raise KvRelayError("--plan only applies to servers kvrelay loadtest starts itself, not to --url")
    if args.plan and args.profiles:
        raise KvRelayError("--plan writes its own profiles: give --plan or --profiles, not both")
    if args.quality_target is not None:
        if url:
            raise KvRelayError("--quality-target applies to servers kvrelay loadtest starts itself, not to --url")
        if not 0 <= args.quality_target < 1:
            raise KvRelayError(f"--quality-target is a relative tolerance in [0, 1), got {args.quality_target}")
    if args.profiles and not Path(args.profiles).is_dir():
        raise KvRelayError(f"--profiles {args.profiles}: not a directory")
    return url


@dataclass
class MixedPlan:
    """What a mixed run will do: the deployment as run, the workload, where results go, what to say."""

    dep: Deployment
    spec: WorkloadSpec
    workload: Workload
    out_dir: Path
    pairs: list[str]
    warnings: list[str]
    t0: float  # monotonic, before the workload was built
    load0: tuple = ()  # load average when the measured runs started


def _plan_mixed(args, url: str | None) -> MixedPlan:
    from kvrelay.server.launch import resolve

    dep, _ = resolve(family=args.family, deployment=args.deployment, store=args.store)
    warnings: list[str] = []
    out_dir = Path(args.out or Path("loadtest-results") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.plan:
        from kvrelay.serving import deployment as dp

        profile_file.write_fixed(
            out_dir / "profiles", dep.family, dp.identities(dep), args.plan, f"kvrelay loadtest --plan {args.plan}"
        )
        dep.profiles_dir = str(out_dir / "profiles")
        warnings.append(f"recompute plan fixed by --plan {args.plan} for every pair (not a measured profile)")
    if args.profiles:
        dep.profiles_dir = str(Path(args.profiles).resolve())
    if args.quality_target is not None:
        dep.quality_target = args.quality_target
    if not url and not dep.store.startswith("memory"):
        warnings.append(f"store {dep.store} replaced by a fresh in-memory store so both modes start cold")
        dep.store = "memory:4GiB"
    pairs = _profiles_present(dep)
    if not pairs and (not url or args.mode == "on"):
        warnings.append(
            f"no profiles for family {dep.family} under {dep.profiles_dir or 'profiles/'}: with sharing on "
            "every cross-model hit falls back to full prefill (see `kvrelay profile`)"
        )

    spec = wl.WorkloadSpec(
        family=dep.family,
        models=tuple(dep.model_names),
        requests=args.requests,
        contexts=args.contexts,
        context_tokens=tuple(args.context_tokens),
        max_tokens=tuple(args.max_tokens),
        zipf_s=args.zipf,
        rate=args.rate,
        seed=args.seed,
        warmup=args.warmup,
        # a running server may hold an earlier run's pages: a tenant of its own keeps this run cold
        tenant=f"loadtest-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}" if url else "loadtest",
    ).validate()
    if spec.max_tokens[1] > dep.max_tokens_limit:
        raise KvRelayError(
            f"--max-tokens {spec.max_tokens[1]} exceeds the deployment's max_tokens_limit {dep.max_tokens_limit}"
        )
    t0 = time.monotonic()
    workload = wl.build(spec, log=report.log)
    report.log(
        f"workload: {len(workload.requests)} requests over {len(workload.contexts)} contexts "
        f"({workload.context_source}, {min(c.tokens for c in workload.contexts)}-"
        f"{max(c.tokens for c in workload.contexts)} tokens), {len(spec.models)} models, built in "
        f"{time.monotonic() - t0:.1f}s; results in {out_dir}"
    )
    if not url:
        need = _pages_needed(dep, workload)
        sized = "" if args.store else size_store(dep, need)
        if sized:
            report.log(sized)
        short = store_shortfall(dep, need)
        if short:
            warnings.append(short)
    for w in warnings:
        report.log(f"warning: {w}")
    return MixedPlan(dep, spec, workload, out_dir, pairs, warnings, t0)


def _run_mixed(args, url: str | None, plan: MixedPlan) -> dict:
    """Both modes on fresh servers, or the one mode of the server at --url: {mode: run}."""
    from kvrelay.loadtest import runner as lr

    _interrupts_stop_cleanly()
    opts = lr.RunOptions(
        protocol=args.protocol,
        users=args.users,
        duration_s=args.duration,
        timeout_s=args.timeout,
        progress=not args.no_progress,
    )
    plan.load0 = os.getloadavg()
    if url:
        grpc = url if args.protocol.startswith("grpc") else ""
        http = url if args.protocol.startswith("http") else ""
        return {
            args.mode: lr.run_mode(
                f"sharing {args.mode}", lr.make_state(plan.workload, opts, http, grpc), opts, plan.out_dir, report.log
            )
        }
    return lr.run_both(plan.dep, plan.workload, opts, plan.out_dir, log=report.log)


def _report_mixed(args, url: str | None, plan: MixedPlan, runs: dict) -> int:
    dep, out_dir, warnings = plan.dep, plan.out_dir, plan.warnings
    modes = {m: report.summarize(r.records, r.window_s) for m, r in runs.items()}
    comparison = report.compare(modes)
    both = {"off", "on"} <= set(runs)
    quality = report.quality(runs["off"].records, runs["on"].records, args.quality_samples, args.seed) if both else None
    cross = report.cross_model(runs["off"].records, runs["on"].records) if both else None
    if "on" in modes and modes["on"]["ok"] and not any(modes["on"]["routes"].get(k) for k in ("reuse", "restore")):
        warnings.append("sharing on served no request from the store: check profiles and the routes above")
    for m, r in runs.items():
        with open(out_dir / f"requests_{m}.jsonl", "w", encoding="utf-8") as f:
            for rec in sorted(r.records, key=lambda x: x["index"]):
                f.write(json.dumps(rec) + "\n")
    described = plan.workload.describe()
    summary = {
        "family": dep.family,
        "throughput_ratio": comparison.get("throughput_ratio"),
        "full_prefill_ceiling": described["full_prefill_ceiling"],
        "errors": sum(s["errors"] for s in modes.values()),
        "modes": modes,
        "comparison": comparison,
        "quality": quality,
        "cross_model": cross,
        "workload": described,
        "deployment": {
            "family": dep.family,
            "models": dep.model_names,
            "store": dep.store,
            "quality_target": dep.quality_target,
            "profiles_dir": dep.profiles_dir or "profiles/",
            "profiles": plan.pairs,
            "devices": sorted({m.device for m in dep.models}),
            "dtypes": sorted({m.dtype for m in dep.models}),
        },
        "run": {
            "protocol": args.protocol,
            "users": args.users,
            "duration_s": args.duration,
            "arrivals": f"poisson {args.rate}/s" if args.rate else "closed loop",
            "url": url,
            "warmup_requests": {m: len(r.warmup) for m, r in runs.items()},
            "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in plan.load0],
            "wall_s": round(time.monotonic() - plan.t0, 1),
        },
        "warnings": warnings,
        "out_dir": str(out_dir),
        "files": {m: r.files for m, r in runs.items()},
        "command": "kvrelay loadtest " + " ".join(sys.argv[2:])
        if len(sys.argv) > 1 and sys.argv[1] == "loadtest"
        else "",
    }
    png = report.plot(summary, {m: r.records for m, r in runs.items()}, out_dir / "loadtest.png")
    summary["files"]["plot"] = png
    report.write_json(summary, out_dir / "summary.json")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(report.text_report(summary))
    return 1 if summary["errors"] else 0
