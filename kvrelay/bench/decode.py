"""The decode benchmark (`kvrelay bench decode`, kvrelay/bench/decode_cmd.py): batched decode of the
engine against HF transformers' `generate`, side by side in one run, on a LoRA family's merged
variant and on the same variant served unmerged.

Per batch size, tokens/s of decode only (the prefill and first token excluded on both sides):
  hf            transformers generate on the variant's merged checkpoint (its own DynamicCache)
  merged        this engine on the same merged checkpoint
  single        this engine: the base + the variant's adapter unmerged, every request on it
  mixed         the same engine, requests spread round-robin over --adapters distinct adapters
Ratios: vs_hf = single / hf, mixed_over_single = mixed / single. Repeats interleave the four so
drift on a shared machine hits each alike; medians are reported.

Adapters: the family's own LoRA variants first, then random ones at the same rank and targets
(kvrelay.bench.adapters) when --adapters asks for more.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time

import torch

from kvrelay.backends.torch_engine.engine import TorchEngine
from kvrelay.bench.adapters import random_adapters
from kvrelay.errors import KvRelayError
from kvrelay.families import family_spec
from kvrelay.model import tokenizer
from kvrelay.model.checkpoint import adapter_dir
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams


def bench(
    family: str,
    batches: list[int],
    n_adapters: int = 8,
    prompt: int = 128,
    tokens: int = 32,
    repeats: int = 3,
    variant: str | None = None,
    progress: bool = False,
) -> dict:
    fam = family_spec(family)
    if fam.synthetic:
        raise KvRelayError(f"family {family!r} has random weights and no adapters; use a built LoRA family")
    base = fam.model(fam.base)
    loras = [m for m in fam.models[1:] if adapter_dir(fam.model(m).model_dir) is not None]
    if not loras:
        raise KvRelayError(f"family {family!r} has no LoRA variant (every variant is a full checkpoint)")
    variant = variant or loras[0]
    if variant not in loras:
        raise KvRelayError(f"--variant {variant!r} is not a LoRA variant of {family!r}; those are {loras}")
    blocks = max(batches) * (-(-(prompt + tokens) // 16) + 1) + 8
    cfg = EngineConfig(
        kv_cache_bytes=blocks * base.page_format(16, "float32").page_bytes,
        max_num_seqs=max(batches),
        max_loras=n_adapters,
        max_prefill_tokens=max(batches) * (prompt + tokens),
        prefix_caching=False,
    )
    engine = TorchEngine.with_adapters(base, [fam.model(variant)], cfg)
    others = [m for m in loras if m != variant][: n_adapters - 1]
    for m in others:
        engine.add_adapter(m, adapter_dir(fam.model(m).model_dir), fam.model(m).model_id)
    names = [variant, *others]
    rank = max(
        int(json.loads((adapter_dir(fam.model(variant).model_dir) / "adapter_config.json").read_text()).get("r", 16)), 1
    )
    for i, d in enumerate(random_adapters(base.model_dir, n_adapters - len(names), rank, key=family)):
        engine.add_adapter(f"random-{i}", d)
        names.append(f"random-{i}")
    merged = TorchEngine.from_spec(fam.model(variant), dataclasses.replace(cfg, max_loras=1))
    hf = _hf_model(fam.model(variant).model_dir)

    g = torch.Generator().manual_seed(0)
    vocab = base.vocab_size
    start = tokenizer.start_ids(tokenizer.load(fam.tokenizer_dir()))
    runs: dict[int, dict[str, list[float]]] = {b: {k: [] for k in ("hf", "merged", "single", "mixed")} for b in batches}
    for rep in range(repeats + 1):  # repeat 0 warms up every path
        for b in batches:
            prompts = [
                start + torch.randint(100, vocab - 1, (prompt - len(start),), generator=g).tolist() for _ in range(b)
            ]
            timed = {
                "hf": _hf_decode(hf, prompts, tokens),
                "merged": _engine_decode(merged, prompts, [""] * b, tokens),
                "single": _engine_decode(engine, prompts, [variant] * b, tokens),
                "mixed": _engine_decode(engine, prompts, [names[i % len(names)] for i in range(b)], tokens),
            }
            if rep:
                for k, v in timed.items():
                    runs[b][k].append(v)
            if progress:
                print(
                    f"bench decode: repeat {rep}{' (warm-up)' if not rep else ''} batch {b}: "
                    + ", ".join(f"{k} {v:.1f} tok/s" for k, v in timed.items()),
                    file=sys.stderr,
                    flush=True,
                )
    per = {}
    for b in batches:
        med = {k: statistics.median(v) for k, v in runs[b].items()}
        per[str(b)] = {
            **{f"{k}_tokens_per_s": round(v, 2) for k, v in med.items()},
            "vs_hf": round(med["single"] / med["hf"], 3),
            "merged_vs_hf": round(med["merged"] / med["hf"], 3),
            "mixed_over_single": round(med["mixed"] / med["single"], 3),
            "distinct_adapters_mixed": min(b, len(names)),
        }
    return {
        "family": family,
        "variant": variant,
        "adapters": names,
        "rank": rank,
        "prompt_tokens": prompt,
        "new_tokens": tokens,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "batches": per,
        "vs_hf": {b: v["vs_hf"] for b, v in per.items()},
        "mixed_over_single": {b: v["mixed_over_single"] for b, v in per.items() if int(b) > 1},
    }


def _hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def _hf_decode(model, prompts, tokens: int) -> float:
    """transformers' greedy generate, batch of equal-length prompts: decode tokens/s, timed from the
    first generated token to the last (a stopping criterion sees each step end; it never stops)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores, **kw):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids, clock = torch.tensor(prompts), Clock()
    with torch.inference_mode():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            pad_token_id=0,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            stopping_criteria=StoppingCriteriaList([clock]),
        )
    if len(clock.times) != tokens:
        raise RuntimeError(f"generate ran {len(clock.times)} steps, not {tokens}")
    return len(prompts) * (tokens - 1) / (clock.times[-1] - clock.times[0])


def _engine_decode(engine, prompts, adapters, tokens: int) -> float:
    """Admit every request in one step (prefill + first token), then time the decode steps."""

    sp = SamplingParams(max_tokens=tokens, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, adapters)):
        engine.add_request(Request(f"d{time.monotonic_ns()}-{i}", p, sp, adapter=a))
    engine.step()
    if len(engine.running) != len(prompts):
        raise RuntimeError(f"only {len(engine.running)} of {len(prompts)} requests admitted in one step")
    t0 = time.perf_counter()
    while engine.has_unfinished():
        engine.step()
    return len(prompts) * (tokens - 1) / (time.perf_counter() - t0)
