"""Running one evaluation sample through a sender and a receiver, and scoring the outputs.

Shared by the profiler, `profile check` and `kvrelay eval`. Every request uses the layout of
kvrelay.model.tokenizer.prompt: the shared context first (the sender's KV covers it), then the request's
own question. The sender answers a different, generic question over the same context, as a real
donor would; only whole blocks of pure context are reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvrelay.model import tokenizer as tk
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.kv_format import PageFormat
from kvrelay.model.spec import kv_shape, read_hf_config
from kvrelay.profiler import flips, scores
from kvrelay.profiler.evaldata import Sample

SENDER_QUESTION = "Summarise the text above."
SUFFIX_ALLOWANCE = 96  # tokens for the question part of a prompt (sizing the KV cache)


@dataclass
class Prepared:
    sample: Sample
    ctx: list[int]  # context tokens (shared)
    prompt: list[int]  # receiver's prompt: ctx + its question
    sender_prompt: list[int]  # sender's prompt: ctx + a generic question


@dataclass
class Output:
    tokens: list[int]
    text: str
    logits: list = field(default_factory=list)
    prefill_s: float = 0.0
    layers_recomputed: int = 0


def prepare(tok, sample: Sample) -> Prepared:
    ctx, q = tk.prompt_ids(tok, sample.context, sample.question)
    return Prepared(sample, ctx, ctx + q, ctx + tk.encode(tok, tk.prompt("", SENDER_QUESTION)[1]))


def engine_config(model_dir, max_context: int, max_tokens: int, concurrent: int):
    """An EngineConfig without prefix caching (every run does its work; repeats are not answered
    from cache), with a KV pool sized for `concurrent` sequences of this length."""
    cfg = EngineConfig(prefix_caching=False)
    fmt = PageFormat.for_model(*kv_shape(read_hf_config(model_dir)), cfg.block_size, cfg.dtype)
    per_seq = math.ceil((max_context + SUFFIX_ALLOWANCE + max_tokens) / cfg.block_size) + 1
    cfg.kv_cache_bytes = fmt.page_bytes * per_seq * (concurrent + 1)
    return cfg


def _sp(max_tokens: int, n_logits: int):
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, return_logits=min(n_logits, max_tokens))


def _output(tok, o) -> Output:
    return Output(
        list(o.output_tokens),
        tk.decode(tok, o.output_tokens),
        list(o.logits),
        o.prefill.seconds if o.prefill else 0.0,
        o.prefill.recomputed_layers if o.prefill else 0,
    )


def sender_pages(S, prep: Prepared, rid: str = "donor"):
    """The sender prefills the context (plus its own question) once; its pages serve every plan."""
    return S.generate([Request(rid, prep.sender_prompt, SamplingParams(max_tokens=1), export_pages=True)])[rid].pages


def run_full(R, tok, prep: Prepared, max_tokens: int, n_logits: int, rid: str = "full") -> Output:
    o = _output(tok, R.generate([Request(rid, prep.prompt, _sp(max_tokens, n_logits))])[rid])
    o.layers_recomputed = R.num_layers
    return o


def run_plans(
    R, tok, prep: Prepared, pages, plans, max_tokens: int, n_logits: int, batch: int = 1, on_done=None
) -> list[Output]:
    """Re-prefill the receiver's prompt from `pages` under each plan; `batch` requests at a time
    decode together (prefill is timed per request either way). on_done(i, output) after each."""
    outs: list[Output] = []
    for lo in range(0, len(plans), max(1, batch)):
        chunk = plans[lo : lo + max(1, batch)]
        reqs = [
            Request(f"plan{lo + i}", prep.prompt, _sp(max_tokens, n_logits), donor=pages, plan=p)
            for i, p in enumerate(chunk)
        ]
        done = R.generate(reqs)
        for i, r in enumerate(reqs):
            o = _output(tok, done[r.request_id])
            outs.append(o)
            if on_done:
                on_done(lo + i, o)
    return outs


def score(sample: Sample, ref: Output, out: Output, n_agree: int) -> dict:
    """Scores of `out` against the receiver's full prefill `ref` (0-100 except kl):
    quality = scores.profile_quality over the first n_agree tokens (the profile metric); top1 and
    kl over the positions whose prefixes are identical in both runs (up to the first divergence,
    at most n_agree), and over the same `positions` the mean `gap_shift` (kvrelay.profiler.flips);
    f1 / rouge_l / edit_sim of the whole generated texts; task = the task metric
    of `out` against the sample's reference answer."""
    k = scores.comparable_positions(ref.tokens, out.tokens, n_agree)
    top1 = scores.top1_agreement(ref.logits[:k], out.logits[:k]) if k and ref.logits and out.logits else 0.0
    kl = scores.mean_kl(ref.logits[:k], out.logits[:k]) if k and ref.logits and out.logits else 0.0
    shifts = flips.gap_shifts(ref.logits, out.logits, k) if k and ref.logits and out.logits else []
    return {
        "quality": scores.profile_quality(ref.tokens, out.tokens, n_agree),
        "f1": 100 * scores.token_f1(out.text, ref.text),
        "rouge_l": 100 * scores.rouge_l(out.text, ref.text),
        "edit_sim": 100 * scores.edit_similarity(out.text, ref.text),
        "top1": 100 * top1,
        "kl": kl,
        "gap_shift": sum(shifts) / len(shifts) if shifts else 0.0,
        "positions": len(shifts),
        "task": task_score(sample, out),
        "prefill_s": out.prefill_s,
    }


def task_score(sample: Sample, out: Output) -> float:
    return 100 * scores.score(sample.metric, sample.postprocess(out.text), sample.answer)
