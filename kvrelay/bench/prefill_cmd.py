"""`kvrelay bench prefill`: receiver full prefill vs. DroidSpeak re-prefill, side by side, one run;
a table or one JSON object. The measurement is kvrelay.bench.prefill."""

from __future__ import annotations

import json

from kvrelay.errors import KvRelayError
from kvrelay.units import parse_int_list


def add_arguments(p):
    p.add_argument("--family", required=True, help="tiny | smol | llama8b-random")
    p.add_argument("--sender", help="donor model (default: the family's base)")
    p.add_argument("--receiver", help="receiving model (default: the family's second model)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--lengths", default="512,1024,2048,4096", help="context lengths in tokens, comma-separated")
    p.add_argument("--suffix", type=int, default=32, help="question tokens after the shared context")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per point (median reported)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--store",
        default=None,
        help="also time re-prefill from a page store, with and without pipelining: redis (a temporary "
        "local redis-server), redis://host:port/db, or memory[:SIZE]",
    )


def run(args) -> int:
    from kvrelay.bench.prefill import bench  # lazy: torch, kept out of kvrelay --help

    lengths = parse_int_list(args.lengths, "--lengths")
    if any(n < 16 for n in lengths) or args.repeats < 1 or args.suffix < 1:
        raise KvRelayError("--lengths must be >= 16, --repeats and --suffix >= 1")
    result = bench(
        args.family,
        lengths,
        args.repeats,
        args.suffix,
        args.device,
        args.dtype,
        args.sender,
        args.receiver,
        progress=not args.json,
        store=args.store,
    )
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print_table(result)
    return 0


def print_table(r: dict) -> None:
    fr = list(r["plans"])
    print(
        f"{r['family']}: {r['sender']} -> {r['receiver']} on {r['device']} ({r['dtype']}), "
        f"{r['num_layers']} layers, +{r['suffix_tokens']} question tokens, median of {r['repeats']}"
    )
    print("context  full_s   " + "  ".join(f"re@{float(f):.0%}({r['layers_recomputed'][f]}L)  x".ljust(22) for f in fr))
    for n, full in r["full_s"].items():
        cells = "  ".join(f"{r['reprefill_s'][f][n]:8.4f}  {r['speedup'][f][n]:5.2f}x".ljust(22) for f in fr)
        print(f"{n:>7}  {full:7.4f}  {cells}")
    print(f"speedup at 25% of layers recomputed, {r['speedup_25_at']} tokens: {r['speedup_25']:.2f}x")
    if "reprefill_store_s" in r:
        print(
            f"re-prefill from the page store ({r['store']}), end to end incl. lookup + load: "
            "fetch-then-compute / pipelined (fetch alone)"
        )
        print("context  " + "  ".join(f"re@{float(f):.0%}".ljust(28) for f in fr))
        for n in r["full_s"]:
            cells = "  ".join(
                f"{r['reprefill_store_s'][f][n]:7.4f} / {r['reprefill_pipelined_s'][f][n]:7.4f} "
                f"({r['store_fetch_s'][f][n]:.4f})".ljust(28)
                for f in fr
            )
            print(f"{n:>7}  {cells}")
