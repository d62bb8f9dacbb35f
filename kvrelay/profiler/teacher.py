"""Teacher-forced scoring of recompute plans: every reference position counts for every plan.

Per case (kvrelay.profiler.cases): the prompt is context + question + reference. The sender and the
receiver each prefill it once (their own full prefills: the two ends of the retained-gain scale,
and the sender's pages of the context); each plan then re-prefills the receiver's prompt from the
sender's context pages and returns logits at every reference position (SamplingParams.prompt_logits),
compared with the receiver's own (kvrelay.profiler.target.CaseSums). Prefill time is measured apart,
on the prompt a served request prefills (context + question, no reference).

The search (`candidate_plans`) is guided by per-layer criticality measured on the same runs: how far
the sender's K/V (plain reuse) or its E (K/V correction) lie from the receiver's own at each layer
over the context; for each budget of recomputed layers the best one- and two-group windows.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from kvrelay.model import tokenizer as tk
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.kv_format import PageFormat
from kvrelay.model.plan import RecomputePlan
from kvrelay.model.spec import kv_shape, read_hf_config
from kvrelay.profiler.cases import Case
from kvrelay.profiler.target import CaseSums

QUESTION_ALLOWANCE = 64


@dataclass
class Prepared:
    case: Case
    ctx: list[int]  # what the sender's pages cover
    question: list[int]  # the request's own part (question layout of kvrelay.model.tokenizer.prompt)
    ref: list[int]  # the reference continuation, scored position by position

    @property
    def prompt(self) -> list[int]:
        return self.ctx + self.question + self.ref

    @property
    def served_prompt(self) -> list[int]:
        return self.ctx + self.question


@dataclass
class Baseline:
    """One case's own full prefills: the sender's pages and logits, the receiver's logits."""

    pages: object  # the sender's KVPages of the context's full blocks
    logp_r: torch.Tensor  # receiver's log-probs at the reference positions [T, V]
    receiver: CaseSums
    sender: CaseSums  # kl here is KL(receiver || sender)
    crit_kv: list[float]  # per layer: |K/V_sender - K/V_receiver| / |K/V_receiver| over the context
    crit_e: list[float]  # per layer: the same for E (layer 0: the receiver's own embeddings, 0)


def engine_config(model_dir, longest: int, concurrent: int) -> EngineConfig:
    """No prefix caching (every run does its work), E kept at every layer (plain and corrected
    plans of any shape), a pool for `concurrent` sequences of `longest` tokens."""
    L, H, D, hidden = kv_shape(read_hf_config(model_dir))
    cfg = EngineConfig(prefix_caching=False, e_layers=tuple(range(1, L)))
    fmt = PageFormat.for_model(L, H, D, hidden, cfg.block_size, cfg.dtype, cfg.e_layers)
    per_seq = math.ceil((longest + QUESTION_ALLOWANCE) / cfg.block_size) + 1
    cfg.kv_cache_bytes = fmt.page_bytes * per_seq * (concurrent + 1)
    return cfg


def prepare(tok, case: Case, R=None, ref_tokens: int = 64) -> Prepared:
    """Token ids of a case; an empty reference becomes the receiver R's own greedy output."""
    ctx, q = tk.prompt_ids(tok, case.context, case.question)
    if case.reference:
        joiner = "\n" if case.domain != "user" else " "
        ref = tk.encode(tok, joiner + case.reference)[:ref_tokens]
    else:
        out = R.generate([Request("ref", ctx + q, SamplingParams(max_tokens=ref_tokens, temperature=0.0))])["ref"]
        ref = list(out.output_tokens)
    return Prepared(case, ctx, q, ref)


def _sums(logp_r: torch.Tensor, logits: torch.Tensor, ref: list[int]) -> CaseSums:
    lp = torch.log_softmax(logits.float(), -1)
    kl = (logp_r.exp() * (logp_r - lp)).sum(-1)
    nll = -lp[torch.arange(len(ref)), torch.tensor(ref)]
    top1 = (lp.argmax(-1) == logp_r.argmax(-1)).float()
    return CaseSums(len(ref), float(kl.sum()), float(nll.sum()), float(top1.sum()))


def _tail(prep: Prepared) -> int:
    return len(prep.ref) + 1  # rows predicting each reference token, and the one after it


def _ref_logits(out, prep: Prepared) -> torch.Tensor:
    return out.prompt_logits[: len(prep.ref)]


def _sp(prep: Prepared) -> SamplingParams:
    return SamplingParams(max_tokens=1, temperature=0.0, prompt_logits=_tail(prep))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def baseline(S, R, prep: Prepared) -> Baseline:
    B = S.page_format.block_size
    s = S.generate([Request("sender", prep.prompt, _sp(prep), export_pages=True)])["sender"]
    r = R.generate([Request("receiver", prep.prompt, _sp(prep), export_pages=True)])["receiver"]
    n = len(prep.ctx) // B
    pages, own = s.pages.prefix(n), r.pages.prefix(n)
    logp_r = torch.log_softmax(_ref_logits(r, prep).float(), -1)
    L = R.num_layers
    crit_kv = [_rel(pages.kv[:, l], own.kv[:, l]) for l in range(L)]
    crit_e = [0.0] + [_rel(pages.e_layer(l), own.e_layer(l)) for l in range(1, L)]
    return Baseline(
        pages,
        logp_r,
        _sums(logp_r, _ref_logits(r, prep), prep.ref),
        _sums(logp_r, _ref_logits(s, prep), prep.ref),
        crit_kv,
        crit_e,
    )


def score_plans(
    R, prep: Prepared, base: Baseline, plans: list[RecomputePlan], batch: int = 8, on_done=None
) -> list[CaseSums]:
    """Each plan's sums over the reference, re-prefilling from the sender's context pages."""
    out: list[CaseSums] = []
    for lo in range(0, len(plans), batch):
        chunk = plans[lo : lo + batch]
        reqs = [Request(f"p{lo + i}", prep.prompt, _sp(prep), donor=base.pages, plan=p) for i, p in enumerate(chunk)]
        done = R.generate(reqs)
        for i, q in enumerate(reqs):
            out.append(_sums(base.logp_r, _ref_logits(done[q.request_id], prep), prep.ref))
            if on_done:
                on_done(lo + i)
    return out


def time_prefill(R, prep: Prepared, base: Baseline, plan: RecomputePlan | None, repeats: int = 2) -> float:
    """Fastest of `repeats` prefills of the served prompt (context + question): full when plan is None."""
    best = float("inf")
    for i in range(repeats):
        req = Request(
            f"t{i}",
            prep.served_prompt,
            SamplingParams(max_tokens=1),
            donor=None if plan is None else base.pages,
            plan=plan,
        )
        t0 = time.perf_counter()
        o = R.generate([req])[req.request_id]
        best = min(best, o.prefill.seconds if o.prefill else time.perf_counter() - t0)
    return best


# --- the guided search -----------------------------------------------------------------------------


def _windows(L: int, k: int, stride: int) -> list[tuple[int, int]]:
    ends = sorted(set(range(stride, L + 1, stride)) | {L})
    return [(a, a + k) for a in range(0, L, stride) if a + k in ends]


def best_groups(crit: list[float], k: int, stride: int, groups: int) -> tuple[tuple[int, int], ...] | None:
    """The `groups` disjoint, non-adjacent windows on the stride grid with k layers in all that
    cover the most criticality (ties: the earliest)."""
    L = len(crit)
    gain = lambda w: sum(crit[w[0] : w[1]])
    if groups == 1:
        ws = _windows(L, k, stride)
        return (max(ws, key=gain),) if ws else None
    best, best_v = None, -1.0
    for k1 in range(stride, k - stride + 1, stride):
        for w1 in _windows(L, k1, stride):
            for w2 in _windows(L, k - k1, stride):
                if w2[0] > w1[1] and gain(w1) + gain(w2) > best_v:
                    best, best_v = (w1, w2), gain(w1) + gain(w2)
    return best


def candidate_plans(
    crit_kv: list[float], crit_e: list[float], stride: int = 2, max_frac: float = 0.6, max_groups: int = 2
) -> list[RecomputePlan]:
    """Full reuse (plain and corrected), then per budget of k layers (stride .. max_frac of L) the
    best one-group and two-group windows by criticality, plain (K/V criticality) and corrected (E
    criticality). Distinct plans, cheapest first."""
    L = len(crit_kv)
    plans = [RecomputePlan.none(), RecomputePlan((), True)]
    top = max(stride, int(L * max_frac) // stride * stride)
    for k in range(stride, top + 1, stride):
        for crit, correct in ((crit_kv, False), (crit_e, True)):
            for g in range(1, max_groups + 1):
                w = best_groups(crit, k, stride, g)
                if w is not None:
                    plans.append(RecomputePlan(w, correct))
    seen, out = set(), []
    for p in plans:
        if str(p) not in seen:
            seen.add(str(p))
            out.append(p)
    return out
