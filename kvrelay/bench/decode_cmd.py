"""`kvrelay bench decode`: batched decode of the engine against HF transformers' `generate` on a LoRA
family's variant, merged and unmerged, one adapter vs. mixed; a table or one JSON object. The
measurement is kvrelay.bench.decode."""

from __future__ import annotations

import json

from kvrelay.errors import KvRelayError
from kvrelay.units import parse_int_list

BATCHES = "1,8,32"


def add_arguments(p):
    p.add_argument(
        "--family",
        default="smol-lora",
        help="a built LoRA family (smol-lora, gemma-lora, or one registered with `models add`)",
    )
    p.add_argument("--variant", help="the variant measured alone (default: the family's first LoRA variant)")
    p.add_argument("--batches", default=BATCHES, help=f"batch sizes, comma-separated (default {BATCHES})")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters in the mixed batch (default 8)")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request (default 128)")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args) -> int:
    from kvrelay.bench.decode import bench  # lazy: torch, kept out of kvrelay --help

    batches = parse_int_list(args.batches, "--batches")
    if min(batches) < 1:
        raise KvRelayError(f"--batches must be >= 1, got {args.batches!r}")
    if args.adapters < 1 or args.prompt < 1 or args.tokens < 2 or args.repeats < 1:
        raise KvRelayError("--adapters, --prompt and --repeats must be >= 1, --tokens >= 2")
    result = bench(
        args.family, batches, args.adapters, args.prompt, args.tokens, args.repeats, args.variant, progress=True
    )  # progress on stderr, the result on stdout
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        _table(result)
    return 0


def _table(r: dict) -> None:
    print(
        f"decode, {r['family']}/{r['variant']} (rank {r['rank']}), prompt {r['prompt_tokens']} + "
        f"{r['new_tokens']} tokens, {r['threads']} threads, median of {r['repeats']}; tokens/s"
    )
    print(
        f"{'batch':>5} {'HF generate':>12} {'engine merged':>14} {'unmerged':>9} {'mixed':>7} "
        f"{'vs_hf':>6} {'mixed/single':>13}"
    )
    for b, v in r["batches"].items():
        print(
            f"{b:>5} {v['hf_tokens_per_s']:>12.1f} {v['merged_tokens_per_s']:>14.1f} {v['single_tokens_per_s']:>9.1f} "
            f"{v['mixed_tokens_per_s']:>7.1f} {v['vs_hf']:>6.2f} {v['mixed_over_single']:>13.2f}"
            f"  ({v['distinct_adapters_mixed']} adapters)"
        )
