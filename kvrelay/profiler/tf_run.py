"""The teacher-forced profiler (the default `kvrelay profile`): plans scored on every reference
position, with intervals, judged by the quality target of kvrelay.profiler.target.

One pair: cases from the receiver's own domain (or the profile part of a user's --data file) ->
both models' full prefills (baselines, pages, per-layer criticality) -> the criticality-guided
candidate plans (plain and K/V-corrected, one or two groups, up to `max_frac` of the layers) scored
on every case -> summaries with bootstrap intervals -> prefill time measured for the frontier and
every plan meeting a target -> the profile file (profile_file schema, metric "teacher_forced").
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.families import corpora, load_family
from kvrelay.model import profile_file
from kvrelay.model import tokenizer as tk
from kvrelay.model.plan import RecomputePlan
from kvrelay.profiler import cases as cs
from kvrelay.profiler import target as tg
from kvrelay.profiler import teacher

METRIC_NAME = "teacher_forced"
METRIC_DESCRIPTION = (
    "Teacher-forced on a fixed reference continuation per context (the receiver's own domain "
    "text, a dataset's answer, or the receiver's own greedy output): per config, KL(receiver "
    "full prefill || plan), top-1 agreement with the receiver's argmax and NLL of the reference "
    "at every reference position; retained gain as in kvrelay.profiler.target; intervals by "
    "bootstrap over contexts (90%, so _ci[0] is a 95% lower bound). quality = 100 x the retained "
    "gain's lower bound (the frontier's axis); meets_target / meets_strict judge the lower bounds."
)
MAX_ABS_QUALITY = 1000.0


@dataclass
class TFSettings:
    family: str
    sender: str
    receiver: str
    samples: int = 6
    context_tokens: tuple[int, int] = (512, 768)
    ref_tokens: int = 64
    stride: int = 2
    max_frac: float = 0.6
    max_groups: int = 2
    seed: int = 0
    data: str | None = None
    domains: tuple[str, ...] | None = None  # None: the receiver's fine-tuning domain, else every domain
    time_cases: int = 2
    batch: int = 8
    notes: list = field(default_factory=list)

    def validate(self) -> "TFSettings":
        if self.sender == self.receiver:
            raise KvRelayError("--sender and --receiver must differ (a model reuses its own KV by prefix caching)")
        if self.samples < 2:
            raise KvRelayError(f"--samples must be >= 2 (intervals are over contexts), got {self.samples}")
        if not 8 <= self.ref_tokens <= 512:
            raise KvRelayError(f"--ref-tokens must be in 8..512, got {self.ref_tokens}")
        if self.stride < 1 or self.max_groups not in (1, 2) or not 0 < self.max_frac <= 1:
            raise KvRelayError("--stride must be >= 1, --max-groups 1 or 2, --max-group in (0, 1]")
        return self


def receiver_domains(fam, receiver: str) -> tuple[str, ...]:
    """The corpus domains a variant was tuned on (family.json build info), else every domain."""
    tuned = (fam.manifest().get("build", {}).get(receiver) or {}).get("corpus")
    return tuple(tuned.split("+")) if tuned else tuple(d for d in corpora.DOMAINS)


def load_cases(st: TFSettings, fam, tok, part: str) -> list[cs.Case]:
    """The cases of `part` (profile | heldout): the user's file's part, or built-in domain text."""
    if st.data:
        got = cs.split_cases(cs.read_jsonl(st.data), part, st.seed)
        if len(got) < 2:
            raise KvRelayError(
                f"--data {st.data}: its {part} part has {len(got)} case(s) (seed {st.seed}); "
                "intervals need at least 2 (give more lines)"
            )
        return got[: st.samples]
    domains = st.domains or receiver_domains(fam, st.receiver)
    return cs.domain_cases(tok, domains, part, st.samples, st.context_tokens, st.ref_tokens, st.seed)


def _finite(x: float) -> float:
    return max(-MAX_ABS_QUALITY, min(MAX_ABS_QUALITY, x)) if x == x else -MAX_ABS_QUALITY


def config_entry(plan: RecomputePlan, summary: dict) -> dict:
    c = {
        "plan": plan.to_list(),
        "kv_correction": plan.correct_kv,
        "layers_recomputed": plan.num_recomputed,
        "quality": round(_finite(100 * summary["retained_gain_ci"][0]), 4),
        **summary,
    }
    c["meets_target"] = tg.meets(summary, tg.TARGET)
    c["meets_strict"] = tg.meets(summary, tg.STRICT)
    return c


def frontier_by_time(configs: list[dict]) -> list[dict]:
    """Timed configs not beaten by a faster one of no lower quality, fastest first."""
    timed = sorted(
        (c for c in configs if c.get("prefill_s") is not None), key=lambda c: (c["prefill_s"], -c["quality"])
    )
    out, best = [], -float("inf")
    for c in timed:
        if c["quality"] > best:
            out.append(
                {
                    "plan": c["plan"],
                    "kv_correction": c["kv_correction"],
                    "prefill_s": c["prefill_s"],
                    "quality": c["quality"],
                    "meets_target": c["meets_target"],
                }
            )
            best = c["quality"]
    return out


def fit_cost(configs: list[dict], full_s: float, num_layers: int) -> None:
    """Prefill seconds ~ a + b x layers recomputed + c x [K/V corrected], least squares over the timed
    configs and full prefill, written to each config as `prefill_s_fit`: single timings on a shared
    CPU wobble by more than a layer's cost, the fit does not (selection goes by it)."""
    rows = [(1.0, num_layers, 0.0, full_s)] + [
        (1.0, c["layers_recomputed"], float(c["kv_correction"]), c["prefill_s"]) for c in configs if c.get("prefill_s")
    ]
    X = np.array([r[:3] for r in rows])
    y = np.array([r[3] for r in rows])
    if len(rows) < 4 or np.linalg.matrix_rank(X) < 3:
        X = X[:, :2]  # no corrected (or no plain) plan timed: no correction term
    coef = np.linalg.lstsq(X, y, rcond=None)[0]
    coef = list(coef) + [0.0] * (3 - len(coef))
    for c in configs:
        c["prefill_s_fit"] = round(float(coef[0] + coef[1] * c["layers_recomputed"] + coef[2] * c["kv_correction"]), 5)


def cheapest(configs: list[dict], key: str = "meets_target") -> dict | None:
    """The plan a selector serves under a target: the cheapest config meeting it by fitted prefill
    time (fewest layers where there is no fit), or None (full prefill)."""
    ok = [c for c in configs if c.get(key)]
    return min(ok, key=lambda c: (c.get("prefill_s_fit", c["layers_recomputed"]), c["layers_recomputed"]), default=None)


@dataclass
class _Run:
    """One profiling run's contexts and engines."""

    cases: list
    S: object  # the sender's engine
    R: object  # the receiver's engine
    preps: list  # teacher.prepare of each case

    @property
    def num_layers(self) -> int:
        return self.R.num_layers


def profile(st: TFSettings, out: str | Path | None, *, progress: bool = True, command: str = "") -> dict:
    """Profile st.sender -> st.receiver; write the profile to `out` (None: return it only).

    setup (cases, engines) -> both models' full prefills (baselines) -> the candidate plans scored on
    every case -> prefill time of the frontier and of what meets a target -> the profile data."""
    st.validate()
    t0 = time.time()
    run = _setup(st)
    bases = _baselines(st, run, progress)
    crit, plans, configs, sender_summary = _score_plans(st, run, bases, progress)
    full_mean, n_t = _time_plans(st, run, bases, plans, configs)
    data = _profile_data(st, run, bases, crit, configs, sender_summary, full_mean, n_t, command, t0)
    if out is not None:
        profile_file.save(data, out)
    return data


def _setup(st: TFSettings) -> _Run:
    fam = load_family(st.family)
    for m in (st.sender, st.receiver):
        fam.model_dir(m)
    tok = tk.load(fam.model_dir(st.receiver))
    cases = load_cases(st, fam, tok, "profile")
    longest = max(len(tk.encode(tok, c.context)) for c in cases) + st.ref_tokens + 8
    S = make_engine(st.family, st.sender, teacher.engine_config(fam.model_dir(st.sender), longest, 1))
    R = make_engine(st.family, st.receiver, teacher.engine_config(fam.model_dir(st.receiver), longest, st.batch))
    return _Run(cases, S, R, [teacher.prepare(tok, c, R, st.ref_tokens) for c in cases])


def _bar(st: TFSettings, total: int, unit: str, what: str, progress: bool):
    return tqdm(
        total=total,
        file=sys.stderr,
        disable=not progress,
        unit=unit,
        dynamic_ncols=True,
        desc=f"profile {st.family} {st.sender}->{st.receiver} {what}",
    )


def _baselines(st: TFSettings, run: _Run, progress: bool) -> list:
    """Each case's full prefills on both models (teacher.baseline)."""
    bar = _bar(st, len(run.preps), "ctx", "baselines", progress)
    bases = []
    for p in run.preps:
        bases.append(teacher.baseline(run.S, run.R, p))
        bar.update(1)
    bar.close()
    return bases


def _score_plans(st: TFSettings, run: _Run, bases: list, progress: bool):
    """Per-layer criticality -> the candidate plans -> each scored on every case and summarized:
    ((criticality of kv, of e), plans, configs, the sender's own summary)."""
    L = run.num_layers
    mean = lambda rows: [sum(r[l] for r in rows) / len(rows) for l in range(L)]
    crit_kv, crit_e = mean([b.crit_kv for b in bases]), mean([b.crit_e for b in bases])
    plans = teacher.candidate_plans(crit_kv, crit_e, st.stride, st.max_frac, st.max_groups)
    bar = _bar(st, len(plans) * len(run.preps), "cfg", "plans", progress)
    per_plan = {str(p): [] for p in plans}
    for prep, base in zip(run.preps, bases):
        sums = teacher.score_plans(run.R, prep, base, plans, st.batch, on_done=lambda i: bar.update(1))
        for p, s in zip(plans, sums):
            per_plan[str(p)].append(s)
    bar.close()
    receiver, sender = [b.receiver for b in bases], [b.sender for b in bases]
    configs = [config_entry(p, tg.summarize(per_plan[str(p)], receiver, sender, st.seed)) for p in plans]
    sender_summary = tg.summarize(sender, receiver, sender, st.seed)
    return (crit_kv, crit_e), plans, configs, sender_summary


def _time_plans(st: TFSettings, run: _Run, bases: list, plans: list, configs: list[dict]) -> tuple[float, int]:
    """Prefill time of the frontier and of whatever meets a target, on the first time_cases contexts,
    into configs (with the cost fit): (full prefill's mean seconds, the contexts timed)."""
    front = {
        tuple(map(tuple, f["plan"])) + (f.get("kv_correction", False),) for f in profile_file.pareto_frontier(configs)
    }
    timed = [
        i
        for i, c in enumerate(configs)
        if c["meets_target"] or c["meets_strict"] or tuple(map(tuple, c["plan"])) + (c["kv_correction"],) in front
    ]
    R, preps = run.R, run.preps
    n_t = min(st.time_cases, len(preps))
    full_s = [teacher.time_prefill(R, preps[j], bases[j], None) for j in range(n_t)]
    full_mean = sum(full_s) / n_t
    for i in timed:
        ts = [teacher.time_prefill(R, preps[j], bases[j], plans[i]) for j in range(n_t)]
        configs[i]["prefill_s"] = round(sum(ts) / n_t, 4)
        configs[i]["prefill_speedup"] = round(full_mean / configs[i]["prefill_s"], 3)
    fit_cost(configs, full_mean, run.num_layers)
    return full_mean, n_t


def _profile_data(st, run: _Run, bases, crit, configs, sender_summary, full_mean, n_t, command, t0) -> dict:
    """The profile file's content (profile_file schema, metric teacher_forced)."""
    L = run.num_layers
    chosen = cheapest(configs)
    return {
        "format": profile_file.FORMAT,
        "family": st.family,
        "sender": st.sender,
        "receiver": st.receiver,
        "sender_fingerprint": run.S.fingerprint,
        "receiver_fingerprint": run.R.fingerprint,
        "sender_weights": run.S.weights,
        "receiver_weights": run.R.weights,
        "num_layers": L,
        "stride": st.stride,
        "max_group_layers": max(st.stride, int(L * st.max_frac)),
        "max_groups": st.max_groups,
        "dataset": _dataset_entry(st, run),
        "metric": {
            "name": METRIC_NAME,
            "description": METRIC_DESCRIPTION,
            "target": tg.TARGET.describe(),
            "strict": tg.STRICT.describe(),
        },
        "criticality": {"kv": [round(x, 5) for x in crit[0]], "e": [round(x, 5) for x in crit[1]]},
        "configs": configs,
        "frontier": profile_file.pareto_frontier(configs),
        "frontier_time": frontier_by_time(configs),
        "selected": None
        if chosen is None
        else {
            "plan": chosen["plan"],
            "kv_correction": chosen["kv_correction"],
            "layers_recomputed": chosen["layers_recomputed"],
        },
        "baselines": _baselines_entry(L, configs[0], bases, sender_summary, full_mean),
        "notes": (
            f"criticality-guided search: per budget of 2..{max(st.stride, int(L * st.max_frac))} layers the best "
            f"1- and {st.max_groups}-group windows, plain and K/V-corrected; prefill_s on {n_t} contexts "
            f"(context + question), fastest of 2 runs each, on a shared CPU"
        ),
        "command": command,
        "kvrelay_version": profile_file.kvrelay_version(),
        "created": profile_file.now_utc(),
        "seconds": round(time.time() - t0, 1),
    }


def _dataset_entry(st: TFSettings, run: _Run) -> dict:
    seen = [len(p.ctx) for p in run.preps]
    return {
        "kind": "user" if st.data else "domain-text",
        "split": "profile",
        "samples": len(run.preps),
        "seed": st.seed,
        "context_tokens": list(st.context_tokens),
        "context_tokens_seen": [min(seen), max(seen)],
        "ref_tokens": st.ref_tokens,
        "domains": sorted({c.domain for c in run.cases}),
        "data": st.data or "",
        "sample_ids": [c.id for c in run.cases],
    }


def _baselines_entry(L: int, reuse: dict, bases: list, sender_summary: dict, full_mean: float) -> dict:
    """Full prefill, full reuse (configs[0], plan none) and both models' own full prefills."""
    receiver = [b.receiver for b in bases]
    return {
        "full_prefill": {"layers_recomputed": L, "quality": 100.0, "prefill_s": round(full_mean, 4)},
        "full_reuse": {
            "plan": [],
            "layers_recomputed": 0,
            "quality": reuse["quality"],
            "retained_gain": reuse["retained_gain"],
            "top1_agreement": reuse["top1_agreement"],
            "kl": reuse["kl"],
            "prefill_s": reuse.get("prefill_s"),
        },
        "sender_full_prefill": {
            "nll": sender_summary["nll"],
            "kl": sender_summary["kl"],
            "top1_agreement": sender_summary["top1_agreement"],
        },
        "receiver_full_prefill": {"nll": round(sum(r.nll for r in receiver) / sum(r.positions for r in receiver), 5)},
    }
