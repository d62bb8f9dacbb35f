"""`kvrelay loadtest --scenario goodput`: DroidSpeak's throughput measurement on the real serving path.

The paper (arXiv 2411.02820 section 5.1, Fig 15) measures receiver requests only: the sender's KV and
E caches are precomputed and stored; requests arrive as a Poisson process at a sweep of rates over
long contexts; throughput is the highest rate that meets an SLO set at the knee of full prefill's
latency curve. Here, for each (sender, receiver) pair:

1. the in-process bound (goodput_bound: F, r, r0, d on the engine alone, nothing else running);
2. full prefill (no sharing): one tritonserver with every receiver, sharing off, prefix caching off
   (every request computes its context, as a receiver that never saw it would) and nothing
   published; a sequential pass over the pool gives the idle point and each context's reference
   text; then the Poisson sweep;
3. the selected plan: one tritonserver with every model of the pairs, sharing on, prefix caching off;
   each sender first stores its pages for the whole pool (untimed, through the server, one request
   per context, under a tenant of its own so that a receiver finds exactly its pair's donor); a
   sequential pass (idle point, route check), then the sweep;
4. full reuse (reference line): the same with a fixed "recompute nothing" profile.

Every request goes through Locust users streaming over gRPC; each point is bounded by a request
count and a time limit. Rates are fractions of each mode's in-process capacity 1 / (T + d).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import family_spec
from kvrelay.loadtest import goodput_stats as gs
from kvrelay.loadtest import report
from kvrelay.loadtest import workload as wl
from kvrelay.loadtest.goodput_bound import run_subprocess
from kvrelay.loadtest.workload import GENERIC_QUESTIONS, Request, Schedule
from kvrelay.model import profile_file
from kvrelay.model import tokenizer as tk
from kvrelay.model.plan import RecomputePlan
from kvrelay.paths import profiles_dir
from kvrelay.server.launch import resolve, start
from kvrelay.serving import deployment as dp
from kvrelay.serving.selector import Selector

MODES = ("full", "plan", "reuse")
FULL_FRACTIONS = (0.35, 0.65, 0.95, 1.25)
SHARE_FRACTIONS = (0.35, 0.65, 0.95, 1.25, 1.6)
QUICK = {
    "contexts": 2,
    "full_fractions": (0.5, 1.0, 1.5),
    "share_fractions": (0.5, 1.0, 1.5, 2.0),
    "point_requests": 4,
    "point_seconds": 90.0,
    "bound_prompts": 1,
}
CONCURRENT_SEQUENCES = 4  # KV cache room per receiver engine, in longest prompts


@dataclass
class Pair:
    sender: str
    receiver: str
    plan: str = ""
    layers_recomputed: int = 0
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.sender}->{self.receiver}"

    @property
    def tenant(self) -> str:  # the sender's pages live under a tenant of their own
        return f"goodput-{self.sender}"


def parse_pairs(text: str, models: list[str]) -> list[tuple[str, str]]:
    out = []
    for part in text.split(","):
        s, sep, r = part.strip().partition(":")
        if not sep or s not in models or r not in models or s == r:
            raise KvRelayError(f"--pairs: {part.strip()!r} is not SENDER:RECEIVER of two different models of {models}")
        out.append((s, r))
    return out


def choose_pairs(dep, ids: dict, requested: str | None, context_tokens: int, log) -> list[Pair]:
    """The pairs to measure, each with the plan the serving selector picks for it. Default: every
    ordered pair whose profile the selector would reuse and that was scored with the flip model
    (its plan's exact agreement predicted, kvrelay.profiler.flips); when no profile of the family
    is, every pair the selector would reuse."""
    sel = Selector(
        profiles_dir(dep.profiles_dir), dep.family, quality_target=dep.quality_target, quality_mode=dep.quality_mode
    )
    wanted = (
        parse_pairs(requested, dep.model_names)
        if requested
        else [(s, r) for s in dep.model_names for r in dep.model_names if s != r]
    )
    out = []
    for s, r in wanted:
        c = sel.choose(s, r, ids[s].fingerprint, ids[r].fingerprint, context_tokens=context_tokens)
        if c.plan is None:
            if requested:
                raise KvRelayError(f"--pairs {s}:{r}: the selector would not reuse {s}'s KV for {r} ({c.reason})")
            continue
        out.append(Pair(s, r, str(c.plan), c.plan.num_recomputed, c.reason))
    if not requested:
        predicted = [p for p in out if sel.profile(p.sender, p.receiver).data.get("flip_model")]
        if predicted and len(predicted) < len(out):
            left = [p.name for p in out if p not in predicted]
            log(
                f"pairs left out: {', '.join(left)} (profiles scored before the flip model: how often their "
                "plans keep full prefill's text is not predicted; --pairs measures them anyway)"
            )
            out = predicted
    if not out:
        raise KvRelayError(f"no pair of {dep.family} has a profile the selector would reuse (see `kvrelay profile`)")
    log("pairs: " + ", ".join(f"{p.name} (plan {p.plan}, {p.layers_recomputed} layers)" for p in out))
    return out


# --- servers -------------------------------------------------------------------------------------


def _per_token_bytes(identity) -> int:
    fmt = identity.page_format
    return fmt.page_bytes // fmt.block_size


def serving_deployment(
    dep,
    ids: dict,
    models: list[str],
    sharing: bool,
    longest: int,
    store_bytes: int = 0,
    profiles_dir: str | None = None,
):
    """The pair servers: only the models measured, each engine on every core (one request computes
    at a time in this scenario), room for a few longest prompts, no prefix cache."""
    cpus = os.cpu_count() or 1
    ms = [
        dp.ModelDeployment(
            m,
            device=dep.model(m).device,
            dtype=dep.model(m).dtype,
            threads=cpus,
            kv_cache_bytes=_per_token_bytes(ids[m]) * (longest + 64) * CONCURRENT_SEQUENCES,
        )
        for m in models
    ]
    return dataclasses.replace(
        dep,
        models=ms,
        sharing=sharing,
        publish=sharing,
        prefix_caching=False,
        coalesce=False,
        store=f"memory:{max(store_bytes, 64 << 20) >> 20}MiB",
        profiles_dir=profiles_dir or dep.profiles_dir,
        shared_prefix_cache=False,
    )


# --- requests ------------------------------------------------------------------------------------


def _workload(dep, pool, source, merge, model, requests):
    spec = wl.WorkloadSpec(
        family=dep.family,
        models=(model,),
        requests=max(1, len(requests)),
        contexts=len(pool),
        context_tokens=(32, 32),
        max_tokens=(1, 1),
        warmup=0,
    )
    return wl.Workload(spec, pool, requests, merge_context=merge, context_source=source)


def poisson(pool, model: str, rate: float, n: int, max_tokens: int, tenant: str, seed: str):
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        c = pool[rng.randrange(len(pool))]
        out.append(Request(i, c.id, model, c.questions[0], max_tokens, round(t, 4), tenant))
    return out


def sequential(state, requests, log, what: str) -> list[dict]:
    """One request at a time (idle points, reference texts, the senders' store phase)."""
    from kvrelay.loadtest import users as lu  # lazy: Locust monkey-patches the process on import

    recs = []
    for r in requests:
        rec = lu.send_grpc(state, r, streaming=True)
        if not rec["ok"]:
            raise KvRelayError(f"{what}: request on context {r.context_id} to {r.model} failed: {rec['error']}")
        recs.append(rec)
    log(f"{what}: {len(recs)} requests, routes {sorted({x['route'] + ': ' + x['route_reason'] for x in recs})}")
    return recs


# --- the scenario --------------------------------------------------------------------------------


@dataclass
class Settings:
    pairs: str | None
    modes: tuple[str, ...]
    contexts: int
    context_tokens: tuple[int, int]
    max_tokens: int
    full_fractions: tuple[float, ...]
    share_fractions: tuple[float, ...]
    point_requests: int
    point_seconds: float
    bound_prompts: int
    slo_ttft: float | None
    seed: int
    timeout_s: float


def settings_from(args, max_len: int) -> Settings:
    quick = args.quick
    max_tokens = args.max_tokens[1] if args.max_tokens else 12
    room = max_len - max_tokens - 64
    # the paper's long contexts: 4k-8k tokens where the window allows (smol: 8192), else its upper half
    lo, hi = args.context_tokens or (
        (min(2048, room // 2), min(3072, room)) if quick else (min(4096, room // 2), min(8000, room))
    )
    if lo > room:
        raise KvRelayError(f"contexts of {lo}+ tokens do not fit the models' {max_len}-token window")
    modes = tuple(m.strip() for m in (args.modes or ",".join(MODES)).split(","))
    if "full" not in modes or not set(modes) <= set(MODES):
        raise KvRelayError(f"--modes must include full and be drawn from {','.join(MODES)}, got {args.modes!r}")
    q = QUICK if quick else {}
    return Settings(
        pairs=args.pairs,
        modes=modes,
        contexts=args.contexts or q.get("contexts", 6),
        context_tokens=(lo, min(hi, room)),
        max_tokens=max_tokens,
        full_fractions=q.get("full_fractions", FULL_FRACTIONS),
        share_fractions=q.get("share_fractions", SHARE_FRACTIONS),
        point_requests=args.point_requests or q.get("point_requests", 10),
        point_seconds=args.point_seconds or q.get("point_seconds", 300.0),
        bound_prompts=q.get("bound_prompts", 3),
        slo_ttft=args.slo_ttft,
        seed=args.seed,
        timeout_s=args.timeout,
    )


class Scenario:
    def __init__(self, dep, st: Settings, out_dir: Path, log, progress: bool = True):
        self.dep, self.st, self.out, self.log, self.progress = dep, st, out_dir, log, progress
        self.records: list[dict] = []
        self.files: list[str] = []

    # pool of contexts and the prompts the bound is measured on
    def build_pool(self):
        lo, hi = self.st.context_tokens
        fam = family_spec(self.dep.family)
        if fam.synthetic:
            pool = wl.random_contexts(self.st.contexts, (lo, hi), fam.model(fam.base).vocab_size, self.st.seed)
            self.source, self.merge = "random token ids", True
            self.prompts = [[int(x) for x in f"{c.text} {c.questions[0]}".split()] for c in pool]
        else:
            tok = wl.tokenizer(self.dep.family)
            pool, self.source = wl.text_contexts(tok, self.st.contexts, (lo, hi), self.st.seed, self.log)
            self.merge = False
            self.prompts = [sum(tk.prompt_ids(tok, c.text, c.questions[0]), []) for c in pool]
        self.pool = pool
        self.longest = max(len(p) for p in self.prompts) + self.st.max_tokens
        toks = [c.tokens for c in pool]
        self.log(f"pool: {len(pool)} contexts of {min(toks)}-{max(toks)} tokens ({self.source})")

    def bound(self, pair: Pair) -> dict:
        order = sorted(range(len(self.prompts)), key=lambda i: len(self.prompts[i]))
        k = self.st.bound_prompts
        pick = [order[len(order) // 2]] if k == 1 else sorted({order[0], order[len(order) // 2], order[-1]})[:k]
        t0 = time.monotonic()
        b = run_subprocess(
            {
                "family": self.dep.family,
                "sender": pair.sender,
                "receiver": pair.receiver,
                "plan": pair.plan,
                "prompts": [self.prompts[i] for i in pick],
                "max_tokens": self.st.max_tokens,
            }
        )
        self.log(
            f"{pair.name}: in-process F {b['full_prefill_s']:.2f}s, r {b['reprefill_s']:.2f}s "
            f"(plan {b['plan']}), r0 {b['full_reuse_s']:.2f}s, d {b['decode_s']:.2f}s: bound "
            f"{b['bound']:.2f} ({time.monotonic() - t0:.0f}s)"
        )
        return b

    def _state(self, server, model, requests):
        from kvrelay.loadtest import users as lu  # lazy: Locust monkey-patches the process on import

        wl = _workload(self.dep, self.pool, self.source, self.merge, model, requests)
        return lu.LoadState(
            wl,
            Schedule(requests, self.st.point_seconds),
            grpc_url=server.grpc_url,
            http_url=server.http_url,
            timeout_s=self.st.timeout_s,
        )

    def _keep(self, recs, **tags):
        for r in recs:
            self.records.append({**tags, **r})

    def idle(self, server, pair: Pair, mode: str, tenant: str, reference: dict | None = None) -> tuple[dict, dict]:
        """Each context once, one at a time: the idle point (rate 0, with its agreement when given
        full prefill's texts) and the texts per context."""
        reqs = [
            Request(-1 - i, c.id, pair.receiver, c.questions[0], self.st.max_tokens, None, tenant)
            for i, c in enumerate(self.pool)
        ]
        recs = sequential(self._state(server, pair.receiver, reqs), reqs, self.log, f"{mode} {pair.receiver} idle pass")
        self._keep(recs, mode=mode, pair=pair.name, point="idle")
        window = sum(r["latency_s"] for r in recs)
        return gs.point_stats(recs, 0.0, window, reference), {r["context_id"]: r["text"] for r in recs}

    def store_phase(self, server, senders: list[str]):
        for s in senders:
            reqs = [
                Request(-1 - i, c.id, s, GENERIC_QUESTIONS[0], 1, None, f"goodput-{s}") for i, c in enumerate(self.pool)
            ]
            sequential(self._state(server, s, reqs), reqs, self.log, f"store phase: {s}'s pages")

    def sweep(self, server, pair: Pair, mode: str, capacity: float, fractions, reference) -> list[dict]:
        from kvrelay.loadtest import runner as lr  # lazy: Locust monkey-patches the process on import

        tenant = pair.tenant if mode != "full" else "goodput-full"
        points = []
        for i, f in enumerate(fractions):
            rate = capacity * f
            n = self.st.point_requests
            reqs = poisson(
                self.pool,
                pair.receiver,
                rate,
                n,
                self.st.max_tokens,
                tenant,
                f"goodput:{self.st.seed}:{pair.name}:{mode}:{i}",
            )
            state = self._state(server, pair.receiver, reqs)
            opts = lr.RunOptions(
                protocol="grpc-stream",
                users=n,
                duration_s=self.st.point_seconds,
                timeout_s=self.st.timeout_s,
                progress=self.progress,
                grace_s=self.st.timeout_s,
            )
            label = f"{pair.sender}__{pair.receiver}_{mode}_{rate:.4f}rps"
            run = lr.run_mode(label, state, opts, self.out / "locust", self.log)
            self.files.append(run.files["html"])
            p = gs.point_stats(run.records, rate, run.window_s, reference if mode != "full" else None)
            self._keep(run.records, mode=mode, pair=pair.name, point=i, offered_rps=round(rate, 5))
            self.log(
                f"{pair.name} {mode} @ {rate:.4f} req/s: achieved {p['achieved_rps']:.4f}, TTFT p90 "
                f"{p['ttft_s']['p90']}s, E2E p90 {p['e2e_s']['p90']}s, errors {p['errors']}, "
                f"routes {p['routes']}"
            )
            points.append(p)
        return points


def run(args) -> int:
    """setup (deployment, settings, pool, pairs) -> each pair's in-process bound -> full prefill per
    receiver -> the sharing modes -> the summary, written and printed."""
    if args.resummarize:
        summary = resummarize(Path(args.resummarize), args.slo_ttft)
        print(json.dumps(summary, indent=1) if args.json else text_report(summary))
        return 1 if summary["errors"] else 0
    t_start = time.monotonic()
    dep, ids, sc, pairs = _setup(args, report.log)
    bounds = {p.name: sc.bound(p) for p in pairs}
    results = {
        p.name: {
            "sender": p.sender,
            "receiver": p.receiver,
            "plan": p.plan,
            "layers_recomputed": p.layers_recomputed,
            "selector": p.reason,
            "bound": bounds[p.name],
            "modes": {},
        }
        for p in pairs
    }
    full_modes, references = _measure_full(sc, dep, ids, pairs, bounds)
    _measure_sharing(sc, dep, ids, pairs, bounds, references, results)
    return _report(args, dep, sc, results, full_modes, t_start)


def _setup(args, log):
    """The deployment and its identities, the settings, the results directory, the context pool and
    the pairs with their plans: (dep, ids, scenario, pairs); the settings are scenario.st."""
    dep, _ = resolve(family=args.family, deployment=args.deployment)
    ids = dp.identities(dep)
    st = settings_from(args, min(i.max_model_len for i in ids.values()))
    out_dir = Path(args.out or Path("loadtest-results") / time.strftime("goodput-%Y%m%d-%H%M%S")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.profiles:
        dep.profiles_dir = str(Path(args.profiles).resolve())
    if args.plan:  # families without measured profiles (llama8b-random on a GPU host): one imposed plan
        profile_file.write_fixed(
            out_dir / "profiles-fixed", dep.family, ids, args.plan, f"kvrelay loadtest --plan {args.plan}"
        )
        dep.profiles_dir = str(out_dir / "profiles-fixed")
        log(f"recompute plan fixed by --plan {args.plan} for every pair (not a measured profile)")
    sc = Scenario(dep, st, out_dir, log, progress=not args.no_progress)
    sc.build_pool()
    pairs = choose_pairs(dep, ids, st.pairs, sum(st.context_tokens) // 2, log)
    if dep.e_layers != "all" and any(RecomputePlan.parse(p.plan).correct_kv for p in pairs):
        dep = dataclasses.replace(dep, e_layers="all")  # K/V-corrected plans read the donor's E at every layer
        ids = dp.identities(dep)
        log("K/V-corrected plans: engines keep E at every layer (e_layers = all)")
    return dep, ids, sc, pairs


def _serve(sc: Scenario, d, what: str):
    t0 = time.monotonic()
    s = start(d, sc.out / "servers" / what)
    sc.log(f"{what} server ready in {time.monotonic() - t0:.0f}s ({', '.join(d.model_names)}; store {d.store})")
    return s


def _measure_full(sc: Scenario, dep, ids: dict, pairs: list[Pair], bounds: dict) -> tuple[dict, dict]:
    """Full prefill, per receiver (the same curve serves every pair with that receiver), on one server
    with sharing off: ({receiver: its idle point, capacity and sweep}, {receiver: its texts per context})."""
    receivers = list(dict.fromkeys(p.receiver for p in pairs))
    full_modes, references = {}, {}
    server = _serve(sc, serving_deployment(dep, ids, receivers, False, sc.longest), "full")
    try:
        for r in receivers:
            pair = next(p for p in pairs if p.receiver == r)
            b = bounds[pair.name]
            idle, references[r] = sc.idle(server, pair, "full", "goodput-full")
            cap = 1.0 / (b["full_prefill_s"] + b["decode_s"])
            full_modes[r] = {
                "idle": idle,
                "capacity_rps": round(cap, 5),
                "points": sc.sweep(server, pair, "full", cap, sc.st.full_fractions, None),
            }
    finally:
        server.stop()
    return full_modes, references


def _measure_sharing(sc: Scenario, dep, ids: dict, pairs: list[Pair], bounds: dict, references: dict, results: dict):
    """The sharing modes (plan, reuse), one server each with every model of the pairs: the senders
    store their pages, then each pair's idle pass and sweep, into results[pair]["modes"][mode]."""
    receivers = list(dict.fromkeys(p.receiver for p in pairs))
    senders = list(dict.fromkeys(p.sender for p in pairs))
    involved = list(dict.fromkeys(senders + receivers))
    pages = sum(_per_token_bytes(ids[s]) * sum(c.tokens + 64 for c in sc.pool) for s in senders)
    for mode in [m for m in sc.st.modes if m != "full"]:
        profiles = None
        if mode == "reuse":
            profile_file.write_fixed(
                sc.out / "profiles-full-reuse",
                dep.family,
                {m: ids[m] for m in involved},
                "none",
                "kvrelay loadtest --plan none",
            )
            profiles = str(sc.out / "profiles-full-reuse")
        server = _serve(sc, serving_deployment(dep, ids, involved, True, sc.longest, int(pages * 1.2), profiles), mode)
        try:
            sc.store_phase(server, senders)
            for p in pairs:
                b = bounds[p.name]
                idle, _ = sc.idle(server, p, mode, p.tenant, references[p.receiver])
                cap = 1.0 / ((b["reprefill_s"] if mode == "plan" else b["full_reuse_s"]) + b["decode_s"])
                results[p.name]["modes"][mode] = {
                    "idle": idle,
                    "capacity_rps": round(cap, 5),
                    "points": sc.sweep(server, p, mode, cap, sc.st.share_fractions, references[p.receiver]),
                }
        finally:
            server.stop()


def _report(args, dep, sc: Scenario, results: dict, full_modes: dict, t_start: float) -> int:
    """The summary (SLO, goodputs, ratios, plots; the run's pool, settings and files), requests.jsonl
    and summary.json written, the summary printed; exit status 1 when any request failed."""
    out_dir, st = sc.out, sc.st
    summary = summarize(results, full_modes, st, out_dir)
    summary.update(
        {
            "family": dep.family,
            "scenario": "goodput",
            "pool": {
                "contexts": len(sc.pool),
                "context_tokens": [min(c.tokens for c in sc.pool), max(c.tokens for c in sc.pool)],
                "source": sc.source,
                "max_tokens": st.max_tokens,
            },
            "settings": {**dataclasses.asdict(st), "quick": bool(args.quick)},
            "run": {
                "cpus": os.cpu_count(),
                "wall_s": round(time.monotonic() - t_start, 1),
                "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
            },
            "out_dir": str(out_dir),
            "files": {"requests": str(out_dir / "requests.jsonl"), "locust_html": sc.files},
            "command": "kvrelay " + " ".join(sys.argv[1:]),
        }
    )
    with open(out_dir / "requests.jsonl", "w", encoding="utf-8") as f:
        for rec in sc.records:
            f.write(json.dumps(rec) + "\n")
    report.write_json(summary, out_dir / "summary.json")
    print(json.dumps(summary, indent=1) if args.json else text_report(summary))
    return 1 if summary["errors"] else 0


def resummarize(out_dir: Path, slo_ttft: float | None = None) -> dict:
    """The summary of an earlier run recomputed from its measured points (the SLO, goodputs, ratios
    and plots), e.g. with --slo-ttft, without measuring again."""
    path = Path(out_dir) / "summary.json"
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
        results, full_modes = old["pairs"], {}
        for r in results.values():
            full_modes[r["receiver"]] = r["modes"].pop("full")
        _fill_event_rates(Path(out_dir), results, full_modes)
        names = {f.name for f in dataclasses.fields(Settings)}
        st = Settings(**{k: v for k, v in old["settings"].items() if k in names})
        st.slo_ttft = slo_ttft
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise KvRelayError(f"{path}: not a goodput summary ({e})") from None
    new = summarize(results, full_modes, st, Path(out_dir))
    old.update(new)
    report.write_json(old, path)
    return old


def _fill_event_rates(out_dir: Path, results: dict, full_modes: dict) -> None:
    """Points of runs from before the measured event rates get them from requests.jsonl."""
    path = out_dir / "requests.jsonl"
    if not path.exists():
        return
    recs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    modes = [(name, "full", full_modes[r["receiver"]], r["receiver"]) for name, r in results.items()]
    modes += [(name, m, md, r["receiver"]) for name, r in results.items() for m, md in r["modes"].items()]
    for name, mode, md, receiver in modes:
        for i, p in enumerate(md["points"]):
            if "arrival_rps" not in p:
                own = [
                    x
                    for x in recs
                    if x.get("mode") == mode
                    and x.get("point") == i
                    and x.get("model") == receiver
                    and (mode == "full" or x.get("pair") == name)
                ]
                p.update(gs.event_rates(own))


def summarize(results: dict, full_modes: dict, st: Settings, out_dir: Path) -> dict:
    errors = 0
    for name, res in results.items():
        full = full_modes[res["receiver"]]
        res["modes"] = {"full": full, **res["modes"]}
        slo = {"ttft_s": st.slo_ttft, "how": "given (--slo-ttft)"} if st.slo_ttft else gs.slo_from_full(full)
        res["slo"] = slo
        res["goodput"] = {
            m: gs.goodput(gs.envelope(gs.curve(d)), slo["ttft_s"], gs.kept_up(d)) if slo["ttft_s"] else {"rps": None}
            for m, d in res["modes"].items()
        }
        res["goodput_rps"] = {m: g["rps"] for m, g in res["goodput"].items()}
        f = res["goodput_rps"]["full"]
        res["goodput_ratio"] = round(res["goodput_rps"]["plan"] / f, 3) if f and "plan" in res["goodput_rps"] else None
        res["reuse_goodput_ratio"] = (
            round(res["goodput_rps"]["reuse"] / f, 3) if f and "reuse" in res["goodput_rps"] else None
        )
        res["bound_fraction"] = (
            round(res["goodput_ratio"] / res["bound"]["bound"], 3) if res["goodput_ratio"] is not None else None
        )
        plan_points = res["modes"].get("plan", {}).get("points", [])
        compared = sum(p["agreement"]["compared"] for p in plan_points)
        exact = sum(p["agreement"]["exact"] for p in plan_points)
        res["agreement"] = {
            "compared": compared,
            "exact": exact,
            "rate": round(exact / compared, 4) if compared else None,
        }
        res["errors"] = sum(p["errors"] for d in res["modes"].values() for p in d["points"])
        errors += res["errors"]
        res["plot"] = gs.plot_pair(
            f"{name}: plan {res['plan']} ({res['layers_recomputed']} layers recomputed), "
            f"goodput ratio {res['goodput_ratio']}",
            res["modes"],
            slo["ttft_s"],
            out_dir / f"goodput_{res['sender']}__{res['receiver']}.png",
        )
    ratios = {n: r["goodput_ratio"] for n, r in results.items() if r["goodput_ratio"] is not None}
    best = max(ratios, key=ratios.get) if ratios else None
    return {"best_goodput_ratio": ratios[best] if best else None, "best_pair": best, "errors": errors, "pairs": results}


def text_report(s: dict) -> str:
    lines = [
        f"goodput ({s['family']}, {s['pool']['contexts']} contexts of {s['pool']['context_tokens'][0]}-"
        f"{s['pool']['context_tokens'][1]} tokens, {s['pool']['max_tokens']} output tokens, "
        f"{s['run']['wall_s'] / 60:.1f} min)",
        f"{'pair':<16} {'plan':<8} {'SLO TTFT':>9} {'full':>8} {'plan':>8} {'reuse':>8} {'ratio':>6} "
        f"{'bound':>6} {'frac':>5} {'agree':>6} {'errors':>6}",
    ]
    for name, r in s["pairs"].items():
        g = r["goodput_rps"]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"
        lb = lambda m: "+" if r["goodput"].get(m, {}).get("lower_bound") else " "
        agree = r["agreement"]["rate"]
        lines.append(
            f"{name:<16} {r['plan']:<8} {r['slo']['ttft_s'] or 0:>8.2f}s {fmt(g.get('full')):>7}{lb('full')}"
            f"{fmt(g.get('plan')):>8}{lb('plan')}{fmt(g.get('reuse')):>8}{lb('reuse')}"
            f"{r['goodput_ratio'] or 0:>6.2f} {r['bound']['bound']:>6.2f} {r['bound_fraction'] or 0:>5.2f} "
            f"{'-' if agree is None else f'{agree * 100:.0f}%':>6} {r['errors']:>6}"
        )
    lines.append(
        "goodput in req/s at the SLO (+: the sweep never missed it, a lower bound); ratio = plan / full; "
        "bound = (F + d) / (r + d) in-process"
    )
    lines.append(
        f"best goodput ratio {s['best_goodput_ratio']} ({s['best_pair']}); errors {s['errors']}; "
        f"results in {s['out_dir']}"
    )
    return "\n".join(lines)
