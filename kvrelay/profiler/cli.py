"""`kvrelay profile`: offline profile of a (sender, receiver) pair, and its `plot` / `check` actions.

    kvrelay profile --family smol --sender base --receiver code --out profiles/smol/base__code.json
    kvrelay profile plot profiles/smol/base__code.json [--out base__code.png]
    kvrelay profile check profiles/smol/base__code.json [--samples N] [--threshold 0.05]
    kvrelay profile layers --family smol-lora [--sender S --receiver R] [--samples 3] [--out DIR]
"""
from __future__ import annotations

import json
import shlex
import sys

ACTIONS = ("plot", "check", "layers")
PROFILE_CONTEXT = "1024-4096"   # default --context-tokens of the profiler
LAYERS_CONTEXT = "256-384"      # ... of `layers`: ~1000 positions in 3 samples, 30 forwards a pair each


def add_arguments(p):
    p.add_argument("action", nargs="*", metavar="[plot|check] PROFILE.json | layers",
                   help="no action: run the profiler; `plot PROFILE.json`: draw it; `check PROFILE.json`: drift check; "
                        "`layers`: the per-layer picture (reuse one layer, compute the rest) of a family's pairs")
    p.add_argument("--family", help="model family (profile)")
    p.add_argument("--sender", help="donor model (profile)")
    p.add_argument("--receiver", help="receiving model (profile)")
    p.add_argument("--stride", type=int, default=2, help="group boundaries on multiples of this (default 2)")
    p.add_argument("--samples", type=int, default=None,
                   help="profiling samples (profile: default 8; check: default the profile's count)")
    p.add_argument("--context-tokens", default=None,
                   help="context length in tokens, N or LO-HI drawn per sample (default 1024-4096; layers: 256-384)")
    p.add_argument("--max-tokens", type=int, default=8,
                   help="greedy tokens generated per config, all compared with the receiver's own (default 8)")
    p.add_argument("--max-group", type=float, default=0.5,
                   help="longest group scored, as a fraction of layers (default 0.5)")
    p.add_argument("--kind", default="mixed", help="task kind: mixed | qa | summary | code (default mixed)")
    p.add_argument("--seed", type=int, default=None, help="sample seed (profile: default 0; check: profile's + 1)")
    p.add_argument("--batch", type=int, default=16, help="configs decoded together (default 16)")
    p.add_argument("--fresh", action="store_true", help="ignore partial results of an earlier run")
    p.add_argument("--threshold", type=float, default=0.05, help="check: relative quality drop that fails (default 0.05)")
    p.add_argument("--quality-target", type=float, default=0.01,
                   help="check: relative tolerance that makes a plan selectable (default 0.01)")
    p.add_argument("--json", action="store_true", help="check: print the report as JSON")
    p.add_argument("--record", action="store_true",
                   help="check: when it passes, record in the profile that it holds on the weights at hand")
    p.add_argument("--out", help="profile: the profile JSON to write; plot: the PNG (default: next to the JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_context_tokens(text: str) -> tuple[int, int]:
    from kvrelay.errors import KvRelayError
    from kvrelay.units import parse_range
    try:
        return parse_range(text, minimum=32)
    except KvRelayError:
        raise KvRelayError(f"--context-tokens must be N or LO-HI with 32 <= LO <= HI, got {text!r}") from None


def _command(args) -> str:
    parts = ["kvrelay", "profile", "--family", args.family, "--sender", args.sender, "--receiver", args.receiver,
             "--stride", str(args.stride), "--samples", str(args.samples or 8), "--context-tokens",
             str(args.context_tokens or PROFILE_CONTEXT), "--max-tokens", str(args.max_tokens),
             "--max-group", str(args.max_group), "--kind", args.kind, "--seed", str(args.seed or 0),
             "--out", args.out]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    from kvrelay.errors import KvRelayError

    action, rest = (args.action[0], args.action[1:]) if args.action else (None, [])
    if action is not None and action not in ACTIONS:
        raise KvRelayError(f"unknown profile action {action!r}; use `kvrelay profile --family F --sender S "
                           f"--receiver R --out FILE`, `kvrelay profile plot FILE` or `kvrelay profile check FILE`")
    if action is None:
        return _profile(args)
    if action == "layers":
        return _layers(args, rest)
    if len(rest) != 1:
        raise KvRelayError(f"`kvrelay profile {action}` takes exactly one PROFILE.json, got {len(rest)}")
    if action == "plot":
        from kvrelay.profiler.plot import plot
        print(plot(rest[0], args.out))
        return 0
    from kvrelay.profiler.check import check
    rep = check(rest[0], samples=args.samples, threshold=args.threshold, seed=args.seed,
                quality_target=args.quality_target, batch=args.batch, progress=not args.no_progress,
                record=args.record)
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{rep['sender']}->{rep['receiver']}: {rep['samples']} fresh samples (seed {rep['seed']})")
        for p in rep["plans"]:
            mark = "DRIFT" if p["flagged"] else ("ok" if p["selectable"] else "-")
            print(f"  {p['plan']:>8} {p['layers_recomputed']:3d}L  profiled {p['profiled']:6.2f}  fresh {p['fresh']:6.2f}"
                  f"  {-100 * p['drop']:+6.1f}%  {mark}")
    if not rep["ok"]:
        for m in rep["problems"]:
            print(f"kvrelay: profile drift: {m}", file=sys.stderr)
        return 1
    print("profile ok: no selectable plan fell beyond the threshold"
          + (f"; recorded as verified on weights {'/'.join(rep['weights'])}" if rep.get("recorded") else
             f" (weights {'/'.join(rep['weights'])}: {rep['weights_status']}; --record records them)"),
          file=sys.stderr)
    return 0


def _layers(args, rest) -> int:
    """The per-layer picture (DroidSpeak Fig. 7) of one pair or every ordered pair of a family."""
    from pathlib import Path

    from kvrelay.errors import KvRelayError
    from kvrelay.paths import profiles_dir
    from kvrelay.profiler import layers

    if rest:
        raise KvRelayError(f"`kvrelay profile layers` takes no file argument, got {' '.join(rest)}")
    if not args.family:
        raise KvRelayError("kvrelay profile layers needs --family (e.g. --family smol-lora)")
    if bool(args.sender) != bool(args.receiver):
        raise KvRelayError("give both --sender and --receiver, or neither (every ordered pair)")
    if args.sender and args.sender == args.receiver:
        raise KvRelayError("--sender and --receiver must differ")
    samples = 3 if args.samples is None else args.samples
    if samples < 1:
        raise KvRelayError(f"--samples must be >= 1, got {samples}")
    ctx = parse_context_tokens(args.context_tokens or LAYERS_CONTEXT)
    out_dir = Path(args.out) if args.out else Path(profiles_dir()) / args.family / "layers"
    pairs = [(args.sender, args.receiver)] if args.sender else None
    res = layers.measure(args.family, samples=samples, context_tokens=ctx, seed=args.seed or 0, pairs=pairs,
                         progress=not args.no_progress)
    layers.write(res, out_dir)
    png = layers.plot(layers.load_dir(out_dir), out_dir.parent / "layers.png")
    for (s, r), d in res.items():
        print(f"{s}->{r}: critical layers {d['critical']} ({len(d['critical'])} of {d['num_layers']})")
    print(f"wrote {len(res)} pairs under {out_dir}; picture {png}")
    return 0


def _profile(args) -> int:
    from kvrelay.errors import KvRelayError
    from kvrelay.profiler.run import Settings, profile

    missing = [f"--{k}" for k in ("family", "sender", "receiver", "out") if not getattr(args, k)]
    if missing:
        raise KvRelayError(f"kvrelay profile needs {', '.join(missing)} "
                           "(e.g. --family smol --sender base --receiver code --out profiles/smol/base__code.json)")
    if not args.out.endswith(".json"):
        raise KvRelayError(f"--out must be a .json file, got {args.out!r}")
    from kvrelay.quality.evaldata import DATASET_KINDS
    if args.kind not in DATASET_KINDS:
        raise KvRelayError(f"--kind must be one of {', '.join(DATASET_KINDS)}, got {args.kind!r}")
    st = Settings(family=args.family, sender=args.sender, receiver=args.receiver, stride=args.stride,
                  samples=args.samples or 8, context_tokens=parse_context_tokens(args.context_tokens or PROFILE_CONTEXT),
                  max_tokens=args.max_tokens, max_group_frac=args.max_group,
                  kind=args.kind, seed=args.seed or 0, batch=args.batch)
    st.validate()
    data = profile(st, args.out, progress=not args.no_progress, fresh=args.fresh, command=_command(args))
    fr = ", ".join(f"{f['layers_recomputed']}L:{f['quality']:.1f}" for f in data["frontier"])
    print(f"wrote {args.out}: {len(data['configs'])} configs, {data['seconds']:.0f}s; "
          f"full reuse {data['baselines']['full_reuse']['quality']:.1f}; frontier {fr}")
    return 0
