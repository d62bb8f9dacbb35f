"""The mixed scenario of `kvrelay loadtest`: the same seeded workload (kvrelay.loadtest.workload)
against sharing off, then sharing on, on servers it starts (or one at --url); one report
(kvrelay.loadtest.report). The command's dispatcher is kvrelay/loadtest/loadtest_cmd.py."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.loadtest.options import check_url, interrupts_stop_cleanly
from kvrelay.loadtest import report
from kvrelay.loadtest import workload as wl
from kvrelay.model import profile_file
from kvrelay.paths import profiles_dir
from kvrelay.server.launch import resolve
from kvrelay.serving import deployment as dp
from kvrelay.units import parse_bytes


def _pages_needed(dep, workload) -> int:
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
    url = check_url(args.url) if args.url else None
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

    dep: dp.Deployment
    spec: wl.WorkloadSpec
    workload: wl.Workload
    out_dir: Path
    pairs: list[str]
    warnings: list[str]
    t0: float  # monotonic, before the workload was built
    load0: tuple = ()  # load average when the measured runs started


def _plan_mixed(args, url: str | None) -> MixedPlan:
    dep, _ = resolve(family=args.family, deployment=args.deployment, store=args.store)
    warnings: list[str] = []
    out_dir = Path(args.out or Path("loadtest-results") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.plan:
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
        variant_zipf_s=args.variant_zipf,
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
    from kvrelay.loadtest import runner as lr  # lazy: Locust monkey-patches the process on import

    interrupts_stop_cleanly()
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
    on = modes.get("on")
    if (
        on
        and on["ok"]
        and not on["shared_lower_layers_rate"]
        and not any(on["routes"].get(k) for k in ("reuse", "restore"))
    ):
        warnings.append("sharing on reused no KV (no store route, no shared lower layers): check profiles and routes")
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


def run(args) -> int:
    """validate -> spec -> run -> report."""
    url = _validate_mixed(args)
    plan = _plan_mixed(args, url)
    runs = _run_mixed(args, url, plan)
    return _report_mixed(args, url, plan, runs)
