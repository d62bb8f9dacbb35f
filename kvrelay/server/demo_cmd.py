"""`kvrelay demo`: the main job on the embedded default.

Starts a real tritonserver for the family (smol-quick by default: the real SmolLM2-135M-Instruct and
two quick fine-tunes, built on first use in a few minutes; in-memory page store), lets the base model
answer a question over a shared context, then has every other variant answer its own question over
the same context — reusing the base's KV through the orchestrator — and prints the answers, where
each one's KV came from and the server's kvrelay metrics. `--in-process` skips Triton and compares
one receiver's full prefill with its re-prefill directly in the engine.
"""

from __future__ import annotations

import inspect
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import ensure_built
from kvrelay.model import tokenizer as tk
from kvrelay.model.plan import RecomputePlan

DEFAULT_FAMILY = "smol-quick"
DEFAULT_QUESTION = "What does this text describe, in one sentence?"


def add_arguments(p):
    p.add_argument(
        "--family",
        default=DEFAULT_FAMILY,
        help=f"model family (default: {DEFAULT_FAMILY}, real SmolLM2 models, built on first use; "
        "tiny: random test models that cannot speak)",
    )
    p.add_argument("--sender", help="donor model (default: the family's base)")
    p.add_argument("--receiver", help="receiving model (default: the family's second model)")
    p.add_argument("--context-file", help="text file to use as the shared context (default: a stdlib module)")
    p.add_argument("--context-tokens", type=int, default=1024, help="truncate the context to this many tokens")
    p.add_argument("--question", default=DEFAULT_QUESTION)
    p.add_argument("--plan", help="layer groups to recompute, e.g. 2-4 (default: 25%% of layers, mid-model)")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument(
        "--in-process", action="store_true", help="no server: compare full prefill and re-prefill in-process"
    )


def default_context() -> str:
    return inspect.getsource(textwrap)


def run(args) -> int:
    if args.max_tokens < 1 or args.context_tokens < 16:
        raise KvRelayError("--max-tokens must be >= 1 and --context-tokens >= 16")
    return run_in_process(args) if args.in_process else run_server(args)


def _context(args) -> str:
    if not args.context_file:
        return default_context()
    try:
        context = open(args.context_file, encoding="utf-8").read()
    except OSError as e:
        raise KvRelayError(f"cannot read --context-file: {e}") from None
    if not context.strip():
        raise KvRelayError(f"--context-file {args.context_file} is empty")
    return context


def run_server(args) -> int:
    # lazy: torch, kept out of kvrelay --help
    from kvrelay.server import client
    from kvrelay.server.launch import start
    from kvrelay.serving import deployment as dp

    fam = ensure_built(args.family)
    names = list(fam.models)
    donor = args.sender or names[0]
    receivers = [args.receiver] if args.receiver else [n for n in names if n != donor]
    tok = tk.load(fam.model_dir(donor))
    context = tk.decode(tok, tk.encode(tok, _context(args))[: args.context_tokens])
    dep = dp.for_family(args.family)
    print(
        f"kvrelay demo: starting tritonserver for family {fam.name} ({', '.join(names)}), store {dep.store}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="kvrelay-demo-") as work:
        server = start(dep, Path(work))
        try:
            print(f"kvrelay demo: ready (HTTP {server.http_url}, gRPC {server.grpc_url})\n", file=sys.stderr)
            ask = lambda model, q: client.infer(
                server.http_url, q, args.max_tokens, model=model, context=context, tenant="demo"
            )
            rows = [(donor, args.question, ask(donor, args.question))]
            time.sleep(0.5)  # the donor's pages are published off the request path
            rows += [(r, args.question, ask(r, args.question)) for r in receivers]
            for model, q, res in rows:
                i = res.info
                print(
                    f"[{model}] {q}\n  -> {res.text.strip()!r}\n"
                    f"  KV: {i['kv_route']}; donor={i['kv_donor_model'] or '-'} "
                    f"reused_layers={i['kv_reused_layers']} recomputed_layers={i['kv_recomputed_layers']} "
                    f"reused_tokens={i['kv_reused_tokens']}; {res.latency_s * 1000:.0f} ms\n"
                )
            metrics = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
            print("metrics (kvrelay_*):")
            print("\n".join(l for l in metrics.splitlines() if l.startswith("kvrelay_")))
        finally:
            server.stop()
    return 0


def run_in_process(args) -> int:
    # lazy: torch, kept out of kvrelay --help
    from kvrelay.engines import make_engine
    from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams

    fam = ensure_built(args.family)
    names = list(fam.models)
    sender, receiver = args.sender or names[0], args.receiver or names[1]
    context = _context(args)
    tok = tk.load(fam.model_dir(receiver))
    ctx, q_recv = tk.prompt_ids(tok, context, args.question)
    ctx = ctx[: args.context_tokens]
    q_send = tk.encode(tok, tk.prompt("", "Summarise the text above.")[1])

    cfg = EngineConfig()
    S = make_engine(args.family, sender, cfg)
    R = make_engine(args.family, receiver, EngineConfig(prefix_caching=False))
    plan = (
        RecomputePlan.parse(args.plan).validate(R.num_layers)
        if args.plan
        else RecomputePlan.mid_model(0.25, R.num_layers)
    )
    sp = SamplingParams(max_tokens=args.max_tokens)
    print(
        f"family {fam.name} ({fam.fingerprint}); context {len(ctx)} tokens; donor {sender!r} -> receiver {receiver!r}",
        file=sys.stderr,
    )
    donor = S.generate([Request("donor", ctx + q_send, sp, export_pages=True)])["donor"]
    full = R.generate([Request("full", ctx + q_recv, sp)])["full"]
    reuse = R.generate([Request("reuse", ctx + q_recv, sp, donor=donor.pages, plan=plan)])["reuse"]
    same = sum(a == b for a, b in zip(full.output_tokens, reuse.output_tokens))
    n = max(len(full.output_tokens), len(reuse.output_tokens))
    print(f"\nquestion: {args.question}")
    print(f"[{receiver} full prefill]   {full.prefill.seconds * 1000:7.1f} ms  {tk.decode(tok, full.output_tokens)!r}")
    p = reuse.prefill
    print(f"[{receiver} re-prefill]     {p.seconds * 1000:7.1f} ms  {tk.decode(tok, reuse.output_tokens)!r}")
    print(
        f"  reused {p.reused_tokens} tokens of KV from {p.donor!r}: {p.reused_layers} layers reused, "
        f"{p.recomputed_layers} recomputed (plan {p.plan})"
    )
    print(f"  prefill speedup {full.prefill.seconds / p.seconds:.2f}x; output tokens identical: {same}/{n}")
    return 0
