"""`kvrelay query`: one request to a running kvrelay server; prints the text and where its KV came from."""

from __future__ import annotations

import json
import sys

from kvrelay.errors import KvRelayError


def add_arguments(p):
    p.add_argument("question", help="the request's own text (question)")
    p.add_argument("--model", help="variant to answer (default: the deployment's first model)")
    p.add_argument("--context-file", help="file whose text is the shared context")
    p.add_argument("--url", help="server address (default 127.0.0.1:8000 for http, :8001 for grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--stream", action="store_true", help="stream tokens (gRPC, ensemble_stream)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float)
    p.add_argument("--tenant")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument(
        "--lora-path",
        help="a PEFT adapter directory on the server: serve it as --model from now on "
        '(a deployment with lora = "unmerged")',
    )


def run(args) -> int:
    from kvrelay.server import client  # lazy: numpy, kept out of kvrelay --help

    context = None
    if args.context_file:
        try:
            context = open(args.context_file, encoding="utf-8").read()
        except OSError as e:
            raise KvRelayError(f"cannot read --context-file: {e}") from None
    if args.lora_path and not args.model:
        raise KvRelayError("--lora-path needs --model: the name the adapter is served under")
    kw = dict(
        model=args.model, context=context, temperature=args.temperature, tenant=args.tenant, lora_path=args.lora_path
    )
    if args.stream:
        url = args.url or "127.0.0.1:8001"
        r = client.stream(
            url,
            args.question,
            args.max_tokens,
            on_text=None if args.json else (lambda t: print(t, end="", flush=True)),
            **kw,
        )
        if not args.json:
            print()
    else:
        url = args.url or ("127.0.0.1:8000" if args.protocol == "http" else "127.0.0.1:8001")
        r = client.infer(url, args.question, args.max_tokens, protocol=args.protocol, **kw)
    if args.json:
        print(json.dumps({"text": r.text, **r.info, "latency_s": r.latency_s, "ttft_s": r.ttft_s}))
        return 0
    if not args.stream:
        print(r.text)
    i = r.info
    print(
        f"[{i.get('kv_route', '?')}] donor={i.get('kv_donor_model') or '-'} reused_layers={i.get('kv_reused_layers')} "
        f"recomputed_layers={i.get('kv_recomputed_layers')} reused_tokens={i.get('kv_reused_tokens')} "
        f"output_tokens={i.get('output_tokens')} latency={r.latency_s * 1000:.0f}ms",
        file=sys.stderr,
    )
    return 0
