"""What the engine alone allows a (sender, receiver) pair: the goodput scenario's bound.

Measured in a process of its own (the load test's process runs gevent and Locust; the server is not
running meanwhile), on the scenario's own prompts, with every core and no prefix cache:

    F   the receiver's full prefill of the prompt
    r   the receiver's re-prefill from the sender's pages with the pair's plan
    r0  the same with no layer recomputed (full reuse: the reference line)
    d   decoding the rest of the output (max_tokens - 1 tokens), one sequence

A server that only prefills and decodes one request at a time serves at most 1 / (F + d) requests per
second without sharing and 1 / (r + d) with it, so (F + d) / (r + d) is what sharing can gain when
prefill and decode do not overlap; `bound_fraction` in the goodput summary is the measured ratio
over this.

    python -m kvrelay.loadtest.goodput_bound < spec.json     # {"family", "sender", "receiver", "plan",
                                                              #  "prompts": [[ids...], ...], "max_tokens"}
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.plan import RecomputePlan
from kvrelay.serving import deployment as dp


def measure(
    family: str,
    sender: str,
    receiver: str,
    plan: str,
    prompts: list[list[int]],
    max_tokens: int,
    repeats: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    torch.set_num_threads(os.cpu_count() or 1)
    longest = max(len(p) for p in prompts) + max_tokens + 16
    chosen = RecomputePlan.parse(plan)
    dep = dp.for_family(family, e_layers="all" if chosen.correct_kv else "even")  # corrected plans read E everywhere
    fmt = dp.identities(dep)[receiver].page_format
    kv_bytes = fmt.page_bytes * (2 * (longest // fmt.block_size + 2))
    cfg = lambda: EngineConfig(
        device=device, dtype=dtype, prefix_caching=False, kv_cache_bytes=kv_bytes, e_layers=fmt.e_layers
    )
    S = make_engine(family, sender, cfg())
    R = make_engine(family, receiver, cfg())
    chosen.validate(R.num_layers)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    many = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    F, r, r0, d = [], [], [], []
    for i, prompt in enumerate(prompts):
        pages = S.generate([Request(f"s{i}", prompt, one, export_pages=True)])[f"s{i}"].pages
        if i == 0:  # first calls at this length allocate: keep them out of the figures
            R.generate([Request("warm", prompt, one, donor=pages, plan=chosen)])
            R.generate([Request("warm-full", prompt, one)])
        for k in range(repeats):
            F.append(R.generate([Request(f"f{i}.{k}", prompt, one)])[f"f{i}.{k}"].prefill.seconds)
            r.append(
                R.generate([Request(f"r{i}.{k}", prompt, one, donor=pages, plan=chosen)])[f"r{i}.{k}"].prefill.seconds
            )
            r0.append(
                R.generate([Request(f"z{i}.{k}", prompt, one, donor=pages, plan=RecomputePlan.none())])[
                    f"z{i}.{k}"
                ].prefill.seconds
            )
        # decode: a whole request minus its prefill, on the cheapest prefill (full reuse)
        t0 = time.perf_counter()
        out = R.generate([Request(f"d{i}", prompt, many, donor=pages, plan=RecomputePlan.none())])[f"d{i}"]
        d.append(time.perf_counter() - t0 - out.prefill.seconds)
    med = lambda xs: round(statistics.median(xs), 4)
    F_, r_, r0_, d_ = med(F), med(r), med(r0), med(d)
    return {
        "full_prefill_s": F_,
        "reprefill_s": r_,
        "full_reuse_s": r0_,
        "decode_s": d_,
        "plan": str(chosen),
        "layers_recomputed": chosen.num_recomputed,
        "prompt_tokens": [min(len(p) for p in prompts), max(len(p) for p in prompts)],
        "max_tokens": max_tokens,
        "threads": torch.get_num_threads(),
        "samples": len(F),
        "bound": round((F_ + d_) / (r_ + d_), 3),
        "full_reuse_bound": round((F_ + d_) / (r0_ + d_), 3),
    }


def run_subprocess(spec: dict, timeout_s: float = 3600) -> dict:
    """measure() in a fresh Python process (torch threads of its own, memory returned at exit)."""
    p = subprocess.run(
        [sys.executable, "-m", "kvrelay.loadtest.goodput_bound"],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if p.returncode != 0:
        raise KvRelayError(f"measuring the in-process bound failed: {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


if __name__ == "__main__":
    s = json.load(sys.stdin)
    print(
        json.dumps(
            measure(
                s["family"], s["sender"], s["receiver"], s["plan"], s["prompts"], s["max_tokens"], s.get("repeats", 1)
            )
        )
    )
