"""`kvrelay profile check`: re-score a profile's frontier plans on fresh samples and flag drift.

Fresh samples: the profile's dataset settings with another seed (default: the profile's seed + 1).
A plan is *selectable* when its profiled (selection) quality meets the selector's quality target; the
check fails (exit 1) when a selectable plan's fresh agreement fell more than `threshold` (relative)
below the agreement observed when profiling, or when the models' fingerprints no longer match the profile's.
With record=True a passing check appends the weights it ran on to the profile's `verified_on`: the
selector and `kvrelay models list` then count the profile as matching those weights (a profile from
before weights digests, or one scored on another build, re-scored here).
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.families import load_family
from kvrelay.model import profile_file
from kvrelay.model import tokenizer as tk
from kvrelay.model.spec import ModelSpec
from kvrelay.profiler import evaldata, scoring


def check(
    profile_path: str | Path,
    samples: int | None = None,
    threshold: float = 0.05,
    seed: int | None = None,
    quality_target: float = 0.01,
    batch: int = 16,
    progress: bool = True,
    record: bool = False,
) -> dict:
    """The profile and the settings checked -> the models' fingerprints compared -> the frontier plans
    re-scored on fresh samples -> each judged against the threshold -> recorded when asked and ok."""
    if not 0 < threshold < 1:
        raise KvRelayError(f"--threshold is a relative quality drop in (0, 1), got {threshold}")
    prof = profile_file.load(profile_path)
    if prof.teacher_forced:
        raise KvRelayError(
            f"{profile_path} is a teacher-forced profile: its held-out check is `kvrelay eval --family "
            f"{prof.family} --sender {prof.sender} --receiver {prof.receiver}` (profile check "
            "re-scores exact-agreement profiles)"
        )
    d = prof.data
    ds = d["dataset"]
    n = samples or ds["samples"]
    if n < 1:
        raise KvRelayError("--samples must be >= 1")
    seed = ds.get("seed", 0) + 1 if seed is None else seed
    fam = load_family(d["family"])
    tok = tk.load(fam.model_dir(d["receiver"]))
    report = {
        "profile": str(profile_path),
        "family": d["family"],
        "sender": d["sender"],
        "receiver": d["receiver"],
        "samples": n,
        "seed": seed,
        "threshold": threshold,
        "plans": [],
        "problems": [],
    }
    specs = [ModelSpec.from_dir(m, fam.model_dir(m), d["family"]) for m in (d["sender"], d["receiver"])]
    if tuple(s.fingerprint for s in specs) != (d["sender_fingerprint"], d["receiver_fingerprint"]):
        report["problems"].append("the models' fingerprints differ from the profile's: re-profile")
        report["ok"] = False
        return report
    max_tokens = ds.get("max_tokens") or d["metric"].get("tokens") or 8
    per_plan = _fresh_scores(prof, fam, tok, n, seed, max_tokens, batch, progress)
    _judge(prof, per_plan, quality_target, threshold, report)
    weights = tuple(s.weights for s in specs)
    report["weights"] = list(weights)
    report["weights_status"] = profile_file.weights_status(d, weights)
    if record and report["ok"]:
        _record(prof, profile_path, weights, n, seed, max_tokens, threshold, report)
    return report


def _fresh_scores(prof, fam, tok, n: int, seed: int, max_tokens: int, batch: int, progress: bool) -> list[list[float]]:
    """Each frontier plan's agreement on n fresh samples (the profile's dataset settings, this seed)."""
    d = prof.data
    ds = d["dataset"]
    data = evaldata.build(
        tok, ds["kind"], ds.get("split", "profile"), n, context_tokens=tuple(ds["context_tokens"]), seed=seed
    )
    preps = [scoring.prepare(tok, s) for s in data]
    longest = max(len(p.prompt) for p in preps)
    S = make_engine(d["family"], d["sender"], scoring.engine_config(fam.model_dir(d["sender"]), longest, 1, 1))
    R = make_engine(
        d["family"], d["receiver"], scoring.engine_config(fam.model_dir(d["receiver"]), longest, max_tokens, batch)
    )
    plans = [p.plan for p in prof.frontier]
    per_plan: list[list[float]] = [[] for _ in plans]
    bar = tqdm(
        total=len(preps) * len(plans),
        file=sys.stderr,
        disable=not progress,
        unit="cfg",
        desc=f"check {d['sender']}->{d['receiver']}",
    )
    for prep in preps:
        pages = scoring.sender_pages(S, prep)
        ref = scoring.run_full(R, tok, prep, max_tokens, max_tokens)

        def done(i, o, prep=prep, ref=ref):
            per_plan[i].append(scoring.score(prep.sample, ref, o, max_tokens)["quality"])
            bar.update(1)

        scoring.run_plans(R, tok, prep, pages, plans, max_tokens, max_tokens, batch, on_done=done)
    bar.close()
    return per_plan


def _judge(prof, per_plan: list[list[float]], quality_target: float, threshold: float, report: dict) -> None:
    """Each frontier plan, fresh against profiled: into report["plans"], a selectable plan that fell
    beyond the threshold into report["problems"]; report["ok"]."""
    floor = prof.full_prefill_quality * (1 - quality_target)
    for p, raw, qs in zip(prof.frontier, prof.data["frontier"], per_plan):
        fresh = sum(qs) / len(qs)
        observed = float(raw.get("observed_quality", p.quality))  # like with like: agreement observed
        drop = (observed - fresh) / observed if observed > 0 else 0.0
        selectable = p.quality >= floor
        flagged = selectable and drop > threshold
        report["plans"].append(
            {
                "plan": str(p.plan),
                "layers_recomputed": p.layers,
                "profiled": round(observed, 2),
                "fresh": round(fresh, 2),
                "drop": round(drop, 4),
                "selectable": selectable,
                "flagged": flagged,
            }
        )
        if flagged:
            report["problems"].append(
                f"plan {p.plan} ({p.layers} layers): quality {observed:.1f} -> {fresh:.1f} "
                f"({-100 * drop:+.1f}%), beyond the {threshold:.0%} threshold"
            )
    report["ok"] = not report["problems"]


def _record(prof, profile_path, weights: tuple, n: int, seed: int, max_tokens: int, threshold: float, report: dict):
    """Append the passing check to the profile's verified_on and save it."""
    d = prof.data
    d.setdefault("verified_on", []).append(
        {
            "sender_weights": weights[0],
            "receiver_weights": weights[1],
            "samples": n,
            "seed": seed,
            "max_tokens": max_tokens,
            "threshold": threshold,
            "created": profile_file.now_utc(),
            "plans": [{k: p[k] for k in ("plan", "profiled", "fresh")} for p in report["plans"]],
        }
    )
    profile_file.save(d, profile_path)
    report["recorded"] = True
