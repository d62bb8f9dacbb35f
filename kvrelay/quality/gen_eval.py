"""The generation eval (`kvrelay eval --metric generation`, kvrelay/quality/eval_cmd.py): quality and
prefill time of cross-model reuse on held-out long-context tasks, from generated answers.

Methods, all on the receiver R over the same prompts (context + R's question), the sender S having
prefilled the context (+ its own question) once per sample:
  full_prefill   R's own full prefill (the reference)
  full_reuse     S's KV in every layer (plan none)
  selected       the plan the Selector picks from the committed profile (queueing rule by default)
  cacheblend     CacheBlend-style token recompute at the selected plan's compute (see
                 kvrelay.profiler.cacheblend); omitted when the selector falls back to full prefill
Quality, 0-100: `task_quality` = the task metric against the reference answer (token F1 for qa,
Rouge-L for summary, edit similarity for code); `agreement` = the profile metric against R's full
prefill over the first --agree-tokens tokens (metrics.profile_quality), plus token F1 / Rouge-L of the
whole generated texts, and top-1 agreement and KL over the positions with identical prefixes.
Prefill seconds come from the engine (prefix caching off; the fastest of --repeats runs); the donor
pages are already in memory (no transfer time).
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kvrelay import paths
from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.families import load_family
from kvrelay.model import profile_file
from kvrelay.model import tokenizer as tk
from kvrelay.model.plan import RecomputePlan
from kvrelay.profiler import cacheblend as cb
from kvrelay.profiler import evaldata, scoring
from kvrelay.serving.selector import Selector

METHODS = ("full_prefill", "full_reuse", "selected", "cacheblend")


def _mean(xs):
    xs = list(xs)
    return round(sum(xs) / len(xs), 3) if xs else None


def evaluate(
    family,
    sender,
    receiver,
    *,
    split="heldout",
    samples=16,
    kind="mixed",
    context_tokens=None,
    seed=0,
    profiles_dir=None,
    quality_target=0.01,
    queued=1,
    slo_s=None,
    latency=None,
    agree_tokens=8,
    cacheblend=True,
    repeats=2,
    progress=False,
    domains=None,
) -> dict:
    """setup (data, engines, the selector's plan) -> measure every method per sample -> summarize."""
    st = _setup(
        family,
        sender,
        receiver,
        split=split,
        samples=samples,
        kind=kind,
        context_tokens=context_tokens,
        seed=seed,
        profiles_dir=profiles_dir,
        quality_target=quality_target,
        queued=queued,
        slo_s=slo_s,
        latency=latency,
        cacheblend=cacheblend,
        domains=domains,
    )
    rows = {m: [] for m in METHODS}
    from tqdm import tqdm

    bar = tqdm(total=len(st.preps), file=sys.stderr, disable=not progress, desc=f"eval {sender}->{receiver}")
    _warm_up(st)
    for prep in st.preps:
        for m, sc in _measure(st, prep, agree_tokens, repeats).items():
            rows[m].append(sc)
        bar.update(1)
    bar.close()
    return _summarize(
        st, rows, split=split, kind=kind, seed=seed, quality_target=quality_target, queued=queued, slo_s=slo_s
    )


@dataclass
class _Setup:
    family: str
    sender: str
    receiver: str
    tok: object
    preps: list
    S: object  # sender engine
    R: object  # receiver engine
    choice: object  # the selector's Choice
    ppath: Path  # the pair's profile
    context_tokens: tuple
    blend: bool  # run the CacheBlend baseline
    notes: list = field(default_factory=list)

    @property
    def plan(self):
        return self.choice.plan

    @property
    def budget(self) -> int:
        """Layers the selected plan recomputes (the CacheBlend baseline gets the same compute)."""
        return self.plan.num_recomputed if self.plan is not None else 0


def _setup(
    family,
    sender,
    receiver,
    *,
    split,
    samples,
    kind,
    context_tokens,
    seed,
    profiles_dir,
    quality_target,
    queued,
    slo_s,
    latency,
    cacheblend,
    domains,
) -> _Setup:
    fam = load_family(family)
    for m in (sender, receiver):
        fam.model_dir(m)
    profiles_dir = paths.profiles_dir(profiles_dir)
    notes = []
    ppath = profile_file.path_for(profiles_dir, family, sender, receiver)
    if context_tokens is None:
        try:
            context_tokens = tuple(profile_file.load(ppath).data["dataset"]["context_tokens"])
            notes.append(f"context lengths {list(context_tokens)} taken from the profile")
        except KvRelayError:
            context_tokens = evaldata.DEFAULT_CONTEXT_TOKENS
    if domains is None:
        tuned = (fam.manifest().get("build", {}).get(receiver) or {}).get("corpus")
        domains = tuple(tuned.split("+")) if tuned else ("all",)  # a mixed corpus reads "code+docs+legal"
        notes.append(f"tasks over the receiver's fine-tuning domain, {tuned}" if tuned else "tasks over every domain")
    if "all" in domains:
        domains = ()
    tok = tk.load(fam.model_dir(receiver))
    data = evaldata.build(tok, kind, split, samples, context_tokens=context_tokens, seed=seed, domains=domains or None)
    preps = [scoring.prepare(tok, s) for s in data]
    longest = max(len(p.prompt) for p in preps)
    max_tokens = max(s.max_tokens for s in data)
    S = make_engine(family, sender, scoring.engine_config(fam.model_dir(sender), longest, 1, 1))
    R = make_engine(family, receiver, scoring.engine_config(fam.model_dir(receiver), longest, max_tokens, 1))
    sel = Selector(profiles_dir, family, latency=latency, quality_target=quality_target)
    choice = sel.choose(
        sender,
        receiver,
        S.fingerprint,
        R.fingerprint,
        context_tokens=statistics.median(len(p.ctx) for p in preps),
        queued=queued,
        slo_s=slo_s,
    )
    if cacheblend and choice.plan is None:
        notes.append(f"cacheblend omitted: the selector chose full prefill ({choice.reason})")
    if choice.plan is None:
        notes.append(f"selected = full prefill: {choice.reason}")
    return _Setup(
        family,
        sender,
        receiver,
        tok,
        preps,
        S,
        R,
        choice,
        ppath,
        tuple(context_tokens),
        cacheblend and choice.plan is not None,
        notes,
    )


def _warm_up(st: _Setup) -> None:
    """First calls pay allocation and kernel selection costs: not in any method's timings."""

    warm = st.preps[0]
    w_pages = scoring.sender_pages(st.S, warm, "warm-s")
    scoring.run_full(st.R, st.tok, warm, 1, 0, "warm-r")
    scoring.run_plans(st.R, st.tok, warm, w_pages, [RecomputePlan.none()], 1, 0)


def _measure(st: _Setup, prep, agree_tokens: int, repeats: int) -> dict:
    """One sample through every method: {method: scores}."""

    R, tok, s, plan = st.R, st.tok, prep.sample, st.plan
    methods = {"full_prefill": None, "full_reuse": RecomputePlan.none(), "selected": plan}
    pages = scoring.sender_pages(st.S, prep)
    ref = scoring.run_full(R, tok, prep, s.max_tokens, agree_tokens)
    outs = {"full_prefill": ref}
    outs["full_reuse"] = scoring.run_plans(R, tok, prep, pages, [RecomputePlan.none()], s.max_tokens, agree_tokens)[0]
    outs["selected"] = (
        ref if plan is None else scoring.run_plans(R, tok, prep, pages, [plan], s.max_tokens, agree_tokens)[0]
    )
    if st.blend:
        n_ctx = cb.shared_blocks(pages, prep.prompt) * pages.format.block_size
        k = cb.tokens_for_budget(n_ctx, R.num_layers, st.budget)
        blended, blend_s, _ = cb.blend(R, pages, prep.prompt, k)
        o = scoring.run_plans(R, tok, prep, blended, [RecomputePlan.none()], s.max_tokens, agree_tokens)[0]
        o.prefill_s += blend_s
        o.layers_recomputed = st.budget
        outs["cacheblend"] = o
    for _ in range(repeats - 1):  # more prefill timings (one token each), the fastest kept
        ref.prefill_s = min(ref.prefill_s, scoring.run_full(R, tok, prep, 1, 0, "again").prefill_s)
        for m in ("full_reuse", "selected"):
            if outs[m] is not ref:
                again = scoring.run_plans(R, tok, prep, pages, [methods[m]], 1, 0)[0]
                outs[m].prefill_s = min(outs[m].prefill_s, again.prefill_s)
        if st.blend:
            blended, blend_s, _ = cb.blend(R, pages, prep.prompt, k)
            again = scoring.run_plans(R, tok, prep, blended, [RecomputePlan.none()], 1, 0)[0]
            outs["cacheblend"].prefill_s = min(outs["cacheblend"].prefill_s, again.prefill_s + blend_s)
    scores = {}
    for m, o in outs.items():
        sc = scoring.score(s, ref, o, agree_tokens)
        sc["kind"] = s.kind
        if m == "cacheblend":
            sc["tokens_frac"] = k / max(1, n_ctx)
        scores[m] = sc
    return scores


def _summarize(st: _Setup, rows: dict, *, split, kind, seed, quality_target, queued, slo_s) -> dict:
    L, plan, budget, preps, choice = st.R.num_layers, st.plan, st.budget, st.preps, st.choice
    full_s = _mean(r["prefill_s"] for r in rows["full_prefill"])
    out_methods = {}
    for m, rs in rows.items():
        if not rs:
            continue
        layers = (
            L if m == "full_prefill" or (m == "selected" and plan is None) else (0 if m == "full_reuse" else budget)
        )
        d = {
            "task_quality": _mean(r["task"] for r in rs),
            "task_by_kind": {
                k: _mean(r["task"] for r in rs if r["kind"] == k) for k in sorted({r["kind"] for r in rs})
            },
            "agreement": _mean(r["quality"] for r in rs),
            "f1_vs_full": _mean(r["f1"] for r in rs),
            "rouge_l_vs_full": _mean(r["rouge_l"] for r in rs),
            "top1_vs_full": _mean(r["top1"] for r in rs),
            "kl_vs_full": _mean(r["kl"] for r in rs),
            "prefill_s": _mean(r["prefill_s"] for r in rs),
            "layers_recomputed": layers,
            "layers_frac": round(layers / L, 3),
        }
        d["speedup_vs_full"] = round(full_s / d["prefill_s"], 2) if d["prefill_s"] else None
        if m == "cacheblend":
            d["tokens_recomputed_frac"] = _mean(r["tokens_frac"] for r in rs)
            d["note"] = (
                f"layers 0-{cb.FULL_LAYERS - 1} for every context token, then the "
                f"highest-KV-deviation tokens through the other layers, at the compute of "
                f"{budget} full layers"
            )
        out_methods[m] = d
    full_q = out_methods["full_prefill"]["task_quality"]
    seen = [len(p.ctx) for p in preps]
    notes = st.notes + ["prefill_s on a shared 2-core CPU (fp32): indicative; speedups are what to compare"]
    return {
        "family": st.family,
        "sender": st.sender,
        "receiver": st.receiver,
        "split": split,
        "kind": kind,
        "samples": len(preps),
        "seed": seed,
        "num_layers": L,
        "domains": sorted({p.sample.domain for p in preps}),
        "context_tokens": list(st.context_tokens),
        "context_tokens_seen": [min(seen), max(seen)],
        "samples_by_kind": {k: sum(p.sample.kind == k for p in preps) for k in sorted({p.sample.kind for p in preps})},
        "selector": {
            "plan": None if plan is None else str(plan),
            "layers_recomputed": None if plan is None else budget,
            "reason": choice.reason,
            "expected_quality": choice.expected_quality,
            "expected_prefill_s": choice.expected_prefill_s,
            "profile": str(st.ppath),
            "quality_target": quality_target,
            "queued": queued,
            "slo_s": slo_s,
        },
        "methods": out_methods,
        "task_delta_vs_full": {m: round(d["task_quality"] - full_q, 3) for m, d in out_methods.items()},
        "notes": notes,
    }


def print_table(r: dict) -> None:
    sel = r["selector"]
    print(
        f"{r['family']}: {r['sender']} -> {r['receiver']}, {r['samples']} {r['split']} samples {r['samples_by_kind']}, "
        f"context {r['context_tokens_seen'][0]}-{r['context_tokens_seen'][1]} tokens"
    )
    print(f"selector: plan {sel['plan'] or 'full prefill'} ({sel['reason']})")
    print(
        f"{'method':<13}{'layers':>7}{'task':>8}{'Δtask':>8}{'agree':>8}{'top1':>7}{'KL':>8}{'prefill_s':>11}{'speedup':>9}"
    )
    for m, d in r["methods"].items():
        print(
            f"{m:<13}{d['layers_recomputed']:>7}{d['task_quality']:>8.2f}{r['task_delta_vs_full'][m]:>+8.2f}"
            f"{d['agreement']:>8.2f}{d['top1_vs_full']:>7.1f}{d['kl_vs_full']:>8.4f}{d['prefill_s']:>11.3f}"
            f"{(d['speedup_vs_full'] or 0):>8.2f}x"
        )
    for n in r["notes"]:
        print(f"note: {n}")
