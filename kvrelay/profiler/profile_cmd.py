"""`kvrelay profile`: offline profile of a (sender, receiver) pair, and its `plot` / `check` actions.

kvrelay profile --family smol-lora --sender base --receiver code      # teacher-forced (default)
kvrelay profile --family smol-lora --all-pairs [--data FILE.jsonl]     # every ordered pair
kvrelay profile --metric exact --family smol --sender base --receiver code --out profiles/smol/base__code.json
kvrelay profile plot profiles/smol/base__code.json [--out base__code.png]
kvrelay profile check profiles/smol/base__code.json [--samples N] [--threshold 0.05]
kvrelay profile layers --family smol-lora [--sender S --receiver R] [--samples 3] [--out DIR]
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import load_family
from kvrelay.model import profile_file
from kvrelay.model.profile_file import plan_of
from kvrelay.paths import profiles_dir
from kvrelay.profiler import layers
from kvrelay.profiler.evaldata import DATASET_KINDS
from kvrelay.profiler.options import LAYERS_CONTEXT, PROFILE_CONTEXT, TF_CONTEXT, parse_context_tokens

ACTIONS = ("plot", "check", "layers")
METRICS = ("teacher-forced", "exact")


def add_arguments(p):
    p.add_argument(
        "action",
        nargs="*",
        metavar="[plot|check] PROFILE.json | layers",
        help="no action: run the profiler; `plot PROFILE.json`: draw it; `check PROFILE.json`: drift check; "
        "`layers`: the per-layer picture (reuse one layer, compute the rest) of a family's pairs",
    )
    p.add_argument(
        "--metric",
        default="teacher-forced",
        choices=METRICS,
        help="teacher-forced (default): plans scored on every position of a reference continuation, "
        "judged by the quality target (kvrelay.profiler.target); exact: the strict mode's older "
        "profiler (greedy tokens generated and compared with the receiver's own)",
    )
    p.add_argument("--family", help="model family (profile)")
    p.add_argument(
        "--all-pairs",
        action="store_true",
        help="teacher-forced: profile every ordered pair of the family (pairs already profiled with the "
        "same settings are kept unless --fresh), with progress and time left",
    )
    p.add_argument(
        "--data",
        default=None,
        help="teacher-forced: a JSONL file of your own contexts (one object per line: context, question, "
        "optional answer); its profile part (a seeded split) is used. Default: held-out-free "
        "built-in text of the receiver's fine-tuning domain",
    )
    p.add_argument(
        "--profiles",
        default=None,
        help="teacher-forced: where profiles/<family>/<sender>__<receiver>.json go when --out is not given "
        "(default: the checkout's profiles/)",
    )
    p.add_argument(
        "--ref-tokens", type=int, default=64, help="teacher-forced: reference tokens scored per context (default 64)"
    )
    p.add_argument("--max-groups", type=int, default=2, help="teacher-forced: groups per plan, 1 or 2 (default 2)")
    p.add_argument("--sender", help="donor model (profile)")
    p.add_argument("--receiver", help="receiving model (profile)")
    p.add_argument("--stride", type=int, default=2, help="group boundaries on multiples of this (default 2)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="profiling samples (profile: default 8; check: default the profile's count)",
    )
    p.add_argument(
        "--context-tokens",
        default=None,
        help="context length in tokens, N or LO-HI drawn per sample (default 1024-4096; layers: 256-384)",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=8,
        help="greedy tokens generated per config, all compared with the receiver's own (default 8)",
    )
    p.add_argument(
        "--max-group",
        type=float,
        default=None,
        help="most layers a plan recomputes, as a fraction of layers (default 0.6; exact: 0.5)",
    )
    p.add_argument("--kind", default="mixed", help="task kind: mixed | qa | summary | code (default mixed)")
    p.add_argument("--seed", type=int, default=None, help="sample seed (profile: default 0; check: profile's + 1)")
    p.add_argument("--batch", type=int, default=16, help="configs decoded together (default 16)")
    p.add_argument("--fresh", action="store_true", help="ignore partial results of an earlier run")
    p.add_argument(
        "--threshold", type=float, default=0.05, help="check: relative quality drop that fails (default 0.05)"
    )
    p.add_argument(
        "--quality-target",
        type=float,
        default=0.01,
        help="check: relative tolerance that makes a plan selectable (default 0.01)",
    )
    p.add_argument("--json", action="store_true", help="check: print the report as JSON")
    p.add_argument(
        "--record",
        action="store_true",
        help="check: when it passes, record in the profile that it holds on the weights at hand",
    )
    p.add_argument("--out", help="profile: the profile JSON to write; plot: the PNG (default: next to the JSON)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _command(args) -> str:
    parts = [
        "kvrelay",
        "profile",
        "--metric",
        "exact",
        "--family",
        args.family,
        "--sender",
        args.sender,
        "--receiver",
        args.receiver,
        "--stride",
        str(args.stride),
        "--samples",
        str(args.samples or 8),
        "--context-tokens",
        str(args.context_tokens or PROFILE_CONTEXT),
        "--max-tokens",
        str(args.max_tokens),
        "--max-group",
        str(0.5 if args.max_group is None else args.max_group),
        "--kind",
        args.kind,
        "--seed",
        str(args.seed or 0),
        "--out",
        args.out,
    ]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    action, rest = (args.action[0], args.action[1:]) if args.action else (None, [])
    if action is not None and action not in ACTIONS:
        raise KvRelayError(
            f"unknown profile action {action!r}; use `kvrelay profile --family F --sender S "
            f"--receiver R --out FILE`, `kvrelay profile plot FILE` or `kvrelay profile check FILE`"
        )
    if action is None:
        return _profile(args)
    if action == "layers":
        return _layers(args, rest)
    if len(rest) != 1:
        raise KvRelayError(f"`kvrelay profile {action}` takes exactly one PROFILE.json, got {len(rest)}")
    if action == "plot":
        from kvrelay.profiler.plot import plot  # lazy: numpy, kept out of kvrelay --help

        print(plot(rest[0], args.out))
        return 0
    from kvrelay.profiler.check import check  # lazy: torch, kept out of kvrelay --help

    rep = check(
        rest[0],
        samples=args.samples,
        threshold=args.threshold,
        seed=args.seed,
        quality_target=args.quality_target,
        batch=args.batch,
        progress=not args.no_progress,
        record=args.record,
    )
    if args.json:
        print(json.dumps(rep, indent=1))
    else:
        print(f"{rep['sender']}->{rep['receiver']}: {rep['samples']} fresh samples (seed {rep['seed']})")
        for p in rep["plans"]:
            mark = "DRIFT" if p["flagged"] else ("ok" if p["selectable"] else "-")
            print(
                f"  {p['plan']:>8} {p['layers_recomputed']:3d}L  profiled {p['profiled']:6.2f}  fresh {p['fresh']:6.2f}"
                f"  {-100 * p['drop']:+6.1f}%  {mark}"
            )
    if not rep["ok"]:
        for m in rep["problems"]:
            print(f"kvrelay: profile drift: {m}", file=sys.stderr)
        return 1
    print(
        "profile ok: no selectable plan fell beyond the threshold"
        + (
            f"; recorded as verified on weights {'/'.join(rep['weights'])}"
            if rep.get("recorded")
            else f" (weights {'/'.join(rep['weights'])}: {rep['weights_status']}; --record records them)"
        ),
        file=sys.stderr,
    )
    return 0


def _layers(args, rest) -> int:
    """The per-layer picture (DroidSpeak Fig. 7) of one pair or every ordered pair of a family."""
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
    res = layers.measure(
        args.family,
        samples=samples,
        context_tokens=ctx,
        seed=args.seed or 0,
        pairs=pairs,
        progress=not args.no_progress,
    )
    layers.write(res, out_dir)
    png = layers.plot(layers.load_dir(out_dir), out_dir.parent / "layers.png")
    for (s, r), d in res.items():
        print(f"{s}->{r}: critical layers {d['critical']} ({len(d['critical'])} of {d['num_layers']})")
    print(f"wrote {len(res)} pairs under {out_dir}; picture {png}")
    return 0


def _profile(args) -> int:
    if args.metric == "teacher-forced":
        return _profile_tf(args)
    from kvrelay.profiler.run import Settings, profile  # lazy: torch, kept out of kvrelay --help

    missing = [f"--{k}" for k in ("family", "sender", "receiver", "out") if not getattr(args, k)]
    if missing:
        raise KvRelayError(
            f"kvrelay profile needs {', '.join(missing)} "
            "(e.g. --family smol --sender base --receiver code --out profiles/smol/base__code.json)"
        )
    if not args.out.endswith(".json"):
        raise KvRelayError(f"--out must be a .json file, got {args.out!r}")
    if args.kind not in DATASET_KINDS:
        raise KvRelayError(f"--kind must be one of {', '.join(DATASET_KINDS)}, got {args.kind!r}")
    st = Settings(
        family=args.family,
        sender=args.sender,
        receiver=args.receiver,
        stride=args.stride,
        samples=args.samples or 8,
        context_tokens=parse_context_tokens(args.context_tokens or PROFILE_CONTEXT),
        max_tokens=args.max_tokens,
        max_group_frac=0.5 if args.max_group is None else args.max_group,
        kind=args.kind,
        seed=args.seed or 0,
        batch=args.batch,
    )
    st.validate()
    data = profile(st, args.out, progress=not args.no_progress, fresh=args.fresh, command=_command(args))
    fr = ", ".join(f"{f['layers_recomputed']}L:{f['quality']:.1f}" for f in data["frontier"])
    print(
        f"wrote {args.out}: {len(data['configs'])} configs, {data['seconds']:.0f}s; "
        f"full reuse {data['baselines']['full_reuse']['quality']:.1f}; frontier {fr}"
    )
    return 0


def _tf_settings(args, sender: str, receiver: str):
    from kvrelay.profiler.tf_run import TFSettings  # lazy: torch, kept out of kvrelay --help

    return TFSettings(
        family=args.family,
        sender=sender,
        receiver=receiver,
        samples=6 if args.samples is None else args.samples,
        context_tokens=parse_context_tokens(args.context_tokens or TF_CONTEXT),
        ref_tokens=args.ref_tokens,
        stride=args.stride,
        max_frac=0.6 if args.max_group is None else args.max_group,
        max_groups=args.max_groups,
        seed=args.seed or 0,
        data=args.data,
        batch=min(args.batch, 8),
    ).validate()


def _tf_command(args, sender: str, receiver: str, out: str) -> str:
    parts = (
        [
            "kvrelay",
            "profile",
            "--family",
            args.family,
            "--sender",
            sender,
            "--receiver",
            receiver,
            "--samples",
            str(args.samples or 6),
            "--context-tokens",
            str(args.context_tokens or TF_CONTEXT),
            "--ref-tokens",
            str(args.ref_tokens),
            "--stride",
            str(args.stride),
            "--max-group",
            str(0.6 if args.max_group is None else args.max_group),
            "--max-groups",
            str(args.max_groups),
            "--seed",
            str(args.seed or 0),
        ]
        + (["--data", args.data] if args.data else [])
        + ["--out", out]
    )
    return " ".join(shlex.quote(p) for p in parts)


def _tf_line(data: dict) -> str:
    sel = data["selected"]
    if sel is None:
        best = max(data["configs"], key=lambda c: c["quality"])
        why = (
            f"no plan meets the target; closest {_plan_text(best)}: retained gain >= "
            f"{best['retained_gain_ci'][0]:.3f}, top-1 >= {best['top1_agreement_ci'][0]:.3f}"
        )
        return f"{data['sender']}->{data['receiver']}: full prefill ({why})"
    c = next(c for c in data["configs"] if c["plan"] == sel["plan"] and c["kv_correction"] == sel["kv_correction"])
    return (
        f"{data['sender']}->{data['receiver']}: {_plan_text(c)} ({c['layers_recomputed']} of {data['num_layers']} "
        f"layers), retained gain {c['retained_gain']:.3f} [{c['retained_gain_ci'][0]:.3f}, "
        f"{c['retained_gain_ci'][1]:.3f}], top-1 {c['top1_agreement']:.3f} [{c['top1_agreement_ci'][0]:.3f}, "
        f"{c['top1_agreement_ci'][1]:.3f}], prefill {c.get('prefill_speedup', float('nan')):.2f}x"
    )


def _plan_text(c: dict) -> str:
    return str(plan_of(c))


def _profile_tf(args) -> int:
    # lazy: torch, kept out of kvrelay --help
    from kvrelay.profiler import tf_run
    from kvrelay.profiler.plot import plot

    if not args.family:
        raise KvRelayError("kvrelay profile needs --family (e.g. --family smol-lora --sender base --receiver code)")
    if args.all_pairs and (args.sender or args.receiver or args.out):
        raise KvRelayError(
            "--all-pairs profiles every ordered pair into profiles/<family>/: give no --sender, "
            "--receiver or --out with it"
        )
    if not args.all_pairs:
        missing = [f"--{k}" for k in ("sender", "receiver") if not getattr(args, k)]
        if missing:
            raise KvRelayError(f"kvrelay profile needs {', '.join(missing)}, or --all-pairs")
    if args.out and not args.out.endswith(".json"):
        raise KvRelayError(f"--out must be a .json file, got {args.out!r}")
    if args.data and not Path(args.data).is_file():
        raise KvRelayError(f"--data {args.data}: no such file")
    fam = load_family(args.family)
    pairs = (
        [(s, r) for s in fam.models for r in fam.models if s != r] if args.all_pairs else [(args.sender, args.receiver)]
    )
    for s, r in pairs:
        _tf_settings(args, s, r)  # every pair's settings checked before any slow work
    root = Path(profiles_dir(args.profiles))
    t0, done = time.monotonic(), 0
    for i, (s, r) in enumerate(pairs):
        out = args.out or str(profile_file.path_for(root, args.family, s, r))
        cmd = _tf_command(args, s, r, out)
        if args.all_pairs and not args.fresh and Path(out).exists():
            try:
                if profile_file.load(out).data.get("command") == cmd:
                    print(
                        f"[{i + 1}/{len(pairs)}] {s}->{r}: kept (profiled with these settings: {out})", file=sys.stderr
                    )
                    continue
            except KvRelayError:
                pass
        data = tf_run.profile(_tf_settings(args, s, r), out, progress=not args.no_progress, command=cmd)
        done += 1
        left = len(pairs) - i - 1
        eta = (time.monotonic() - t0) / done * left
        print(_tf_line(data) + f"  -> {out}", flush=True)
        if args.all_pairs:
            print(f"[{i + 1}/{len(pairs)}] pairs done; about {eta / 60:.0f} min left", file=sys.stderr, flush=True)
        plot(out, None)
    return 0
