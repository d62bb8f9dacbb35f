"""`kvrelay eval`: quality and prefill time of the plans the selector serves, on held-out contexts.

--metric teacher-forced (default): kvrelay.quality.tf_eval; --metric generation: the older table of
generated answers per method, kvrelay.quality.gen_eval."""

from __future__ import annotations

import json
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import load_family
from kvrelay.paths import profiles_dir
from kvrelay.profiler.evaldata import DATASET_KINDS, SPLITS
from kvrelay.profiler.options import TF_CONTEXT, parse_context_tokens
from kvrelay.serving.selector import LatencyModel


def add_arguments(p):
    p.add_argument("--family", required=True, help="model family")
    p.add_argument("--sender", default=None, help="donor model (teacher-forced: default every ordered pair)")
    p.add_argument("--receiver", default=None, help="receiving model (teacher-forced: default every ordered pair)")
    p.add_argument(
        "--metric",
        default="teacher-forced",
        choices=("teacher-forced", "generation"),
        help="teacher-forced (default; kvrelay.quality.tf_eval): the served plan against the quality "
        "target on held-out contexts; generation: the older table of generated answers per method",
    )
    p.add_argument(
        "--data",
        default=None,
        help="teacher-forced: a JSONL file of your contexts (context, question, optional answer); its "
        "held-out part (seeded split) is used. Default: held-out text of the receiver's domain",
    )
    p.add_argument(
        "--ref-tokens", type=int, default=64, help="teacher-forced: reference tokens per context (default 64)"
    )
    p.add_argument(
        "--quality-mode",
        default="target",
        choices=("target", "strict"),
        help="teacher-forced: the selector's quality mode (default target)",
    )
    p.add_argument("--split", default="heldout", help="profile | heldout (default heldout)")
    p.add_argument("--samples", type=int, default=None, help="samples (default 16; teacher-forced 8)")
    p.add_argument("--kind", default="mixed", help="mixed | qa | summary | code (default mixed)")
    p.add_argument(
        "--domains",
        default=None,
        help="task domains, comma-separated (legal, docs, code, changelog; `all`). Default: the receiver's "
        "fine-tuning domain when the family records one (a variant is judged on what it was "
        "tuned for), else all",
    )
    p.add_argument(
        "--context-tokens",
        default=None,
        help="N or LO-HI tokens (default: the profile's context lengths, else 1024-4096)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profiles", default=None, help="profiles directory (default: the checkout's profiles/)")
    p.add_argument("--quality-target", type=float, default=0.01, help="selector's relative quality tolerance")
    p.add_argument("--queued", type=int, default=1, help="requests queued, as the selector sees it (default 1)")
    p.add_argument("--slo", type=float, default=None, help="prefill SLO in seconds (selector's idle rule)")
    p.add_argument("--bench", default=None, help="`kvrelay bench prefill --json` output: the selector's latency model")
    p.add_argument(
        "--agree-tokens",
        type=int,
        default=8,
        help="first generated tokens compared with the receiver's full prefill for `agreement` (default 8)",
    )
    p.add_argument("--no-cacheblend", action="store_true", help="skip the CacheBlend-style baseline")
    p.add_argument(
        "--repeats", type=int, default=2, help="prefill timings per method and sample, the fastest kept (default 2)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true")


def _run_tf(args) -> int:
    # lazy: torch, kept out of kvrelay --help
    from kvrelay.profiler.tf_run import TFSettings
    from kvrelay.quality import tf_eval

    if bool(args.sender) != bool(args.receiver):
        raise KvRelayError("give both --sender and --receiver, or neither (every ordered pair)")
    if args.sender and args.sender == args.receiver:
        raise KvRelayError("--sender and --receiver must differ")
    if args.data and not Path(args.data).is_file():
        raise KvRelayError(f"--data {args.data}: no such file")
    if args.repeats < 1:
        raise KvRelayError("--repeats must be >= 1")
    fam = load_family(args.family)
    for m in (args.sender, args.receiver):
        if m:
            fam.model_dir(m)
    pairs = (
        [(args.sender, args.receiver)] if args.sender else [(s, r) for s in fam.models for r in fam.models if s != r]
    )
    ctx = parse_context_tokens(args.context_tokens or TF_CONTEXT)
    domains = None if args.domains in (None, "all") else tuple(d.strip() for d in args.domains.split(",") if d.strip())

    def settings(s, r):
        return TFSettings(
            family=args.family,
            sender=s,
            receiver=r,
            samples=8 if args.samples is None else args.samples,
            context_tokens=ctx,
            ref_tokens=args.ref_tokens,
            seed=args.seed,
            data=args.data,
            domains=domains,
        ).validate()

    for s, r in pairs:
        settings(s, r)
    res = tf_eval.evaluate(
        args.family,
        pairs,
        settings,
        Path(args.profiles) if args.profiles else Path(profiles_dir()),
        quality_mode=args.quality_mode,
        repeats=args.repeats,
        progress=not (args.no_progress or args.json),
    )
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        tf_eval.print_table(res)
    return 0


def run(args) -> int:
    if args.metric == "teacher-forced":
        return _run_tf(args)
    from kvrelay.quality import gen_eval  # lazy: torch, kept out of kvrelay --help

    if not (args.sender and args.receiver):
        raise KvRelayError("--metric generation needs --sender and --receiver")
    if args.data:
        raise KvRelayError("--data is read by the teacher-forced eval (the default --metric)")
    args.samples = 16 if args.samples is None else args.samples

    if args.split not in SPLITS:
        raise KvRelayError(f"--split must be one of {', '.join(SPLITS)}, got {args.split!r}")
    if args.kind not in DATASET_KINDS:
        raise KvRelayError(f"--kind must be one of {', '.join(DATASET_KINDS)}, got {args.kind!r}")
    if args.samples < 1 or args.agree_tokens < 1 or args.repeats < 1 or args.queued < 0:
        raise KvRelayError("--samples, --agree-tokens and --repeats must be >= 1, --queued >= 0")
    if args.sender == args.receiver:
        raise KvRelayError("--sender and --receiver must differ")
    ctx = parse_context_tokens(args.context_tokens) if args.context_tokens else None
    latency = None
    if args.bench:
        try:
            latency = LatencyModel.from_bench(json.loads(Path(args.bench).read_text()))
        except (OSError, ValueError) as e:
            raise KvRelayError(f"cannot read --bench {args.bench}: {e}") from None
    res = gen_eval.evaluate(
        args.family,
        args.sender,
        args.receiver,
        split=args.split,
        samples=args.samples,
        kind=args.kind,
        context_tokens=ctx,
        seed=args.seed,
        profiles_dir=args.profiles,
        quality_target=args.quality_target,
        queued=args.queued,
        slo_s=args.slo,
        latency=latency,
        agree_tokens=args.agree_tokens,
        cacheblend=not args.no_cacheblend,
        repeats=args.repeats,
        domains=None if args.domains is None else tuple(d.strip() for d in args.domains.split(",") if d.strip()),
        progress=not (args.no_progress or args.json),
    )
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        gen_eval.print_table(res)
    return 0
