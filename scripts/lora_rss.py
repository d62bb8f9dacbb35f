#!/usr/bin/env python
"""Server memory with many LoRA adapters served unmerged (issue 25: 32 adapters within 1.5x of 1).

For N in (1, 32): a family of the SmolLM2 base (smol-lora's, `kvrelay models build smol-lora`) and
N random rank-16 all-linear PEFT adapters (kvrelay.bench.adapters) is registered, served by
`kvrelay serve` with lora = "unmerged" (max_loras 8), and every adapter is asked once over HTTP
(the ensemble, `variant_name` = the adapter, as tensorrtllm_backend's lora_task_id picks one); then
the RSS of tritonserver and every stub is read from /proc. Then (unless --no-check) each adapter's
answer from the server is compared with its PEFT merge (merge_and_unload) run by transformers'
greedy generate on the same prompt: the issue's "each adapter's greedy output equals its merged
model's output". Prints one JSON object.

    .venv/bin/python scripts/lora_rss.py [--adapters 32] [--base DIR] [--http-port 8600] [--entry-points] [--no-check]

--entry-points keeps variant_entry_points on: each adapter then also has a Triton model of its own
name, whose preprocessing stub holds a tokenizer (~353 MiB each, measured), which is why a fleet of
adapters is served with it off.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvrelay import paths
from kvrelay.bench.adapters import random_adapters
from kvrelay.families import family_spec, user
from kvrelay.model import tokenizer as tk
from kvrelay.server import client, launch, procstats
from kvrelay.serving import deployment as dp


CONTEXT = "kvrelay serves many fine-tuned variants of one model. " * 20
QUESTION = "Summarise the text above."


def measure(n: int, adapters: list[Path], base: Path, port: int, max_tokens: int, entry_points: bool) -> dict:
    name = f"lora-rss-{n}"
    user.ensure_registered(name, str(base), {f"a{i:02d}": str(d) for i, d in enumerate(adapters[:n])})
    toml = paths.home() / f"{name}.toml"
    toml.write_text(
        f'family = "{name}"\nlora = "unmerged"\nmax_loras = 8\nvariant_entry_points = {str(entry_points).lower()}\n'
    )
    t0 = time.time()
    server = launch.start(
        dp.load(toml), paths.home() / "serve" / name, http_port=port, grpc_port=port + 1, metrics_port=port + 2
    )
    url = server.http_url
    try:
        started = time.time() - t0
        t1 = time.time()
        answers = {}
        for i in range(n):
            r = client.infer(url, QUESTION, max_tokens, model=f"a{i:02d}", context=CONTEXT)
            answers[f"a{i:02d}"] = r
        asked = time.time() - t1
        tree = procstats.server_tree(server.proc.pid)
        return {
            "adapters": n,
            "start_s": round(started, 1),
            "ask_all_s": round(asked, 1),
            "rss_mib": round(sum(p.rss_mib for p in tree), 1),
            "processes": {p.name: round(p.rss_mib, 1) for p in tree},
            "answered": sum(1 for r in answers.values() if r.info["output_tokens"] == max_tokens),
            "texts": {a: r.text for a, r in answers.items()},
        }
    finally:
        server.stop()


def merged_outputs(base: Path, adapters: list[Path], max_tokens: int) -> list[str]:
    """Each adapter merged into the base by PEFT (merge_and_unload), greedy generate on the prompt
    the server builds (kvrelay.model.tokenizer.prompt_ids), decoded as the server decodes."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = tk.load(base)
    ids = torch.tensor([sum(tk.prompt_ids(tok, CONTEXT, QUESTION), [])])
    out = []
    for d in adapters:
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(d)).merge_and_unload().eval()
        with torch.inference_mode():
            g = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, pad_token_id=0
            )
        out.append(tk.decode(tok, g[0, ids.shape[1] :].tolist()))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--http-port", type=int, default=8600)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--base", type=Path, help="the base model directory (default: smol-lora's, built)")
    p.add_argument("--no-check", action="store_true", help="skip comparing each adapter with its PEFT merge")
    p.add_argument(
        "--entry-points",
        action="store_true",
        help="also serve each adapter under its own Triton model name (a preprocessing stub each)",
    )
    a = p.parse_args()
    base = a.base or family_spec("smol-lora").dirs["base"]
    # B at 0.015 (not the decode bench's 0.002): adapters that move the greedy output apart, so that
    # each equalling its own merge says something
    adapters = random_adapters(base, a.adapters, 16, key="smol-lora", scale=0.015)
    one = measure(1, adapters, base, a.http_port, a.max_tokens, a.entry_points)
    many = measure(a.adapters, adapters, base, a.http_port + 10, a.max_tokens, a.entry_points)
    result = {"one": one, "many": many, "rss_ratio": round(many["rss_mib"] / one["rss_mib"], 3)}
    ok = True
    if not a.no_check:
        want = merged_outputs(base, adapters, a.max_tokens)
        served = [many["texts"][f"a{i:02d}"] for i in range(a.adapters)]
        same = [i for i, (w, g) in enumerate(zip(want, served)) if w == g]
        result["equal_to_merge"] = f"{len(same)}/{a.adapters}"
        result["distinct_outputs"] = len(set(served))  # adapters that answer alike would prove little
        result["differ"] = {
            f"a{i:02d}": {"served": served[i], "merged": want[i]} for i in range(a.adapters) if i not in same
        }
        ok = len(same) == a.adapters
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
