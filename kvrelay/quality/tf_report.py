"""A family's per-pair table from its teacher-forced profiles (what docs/quality.md quotes).

    python -m kvrelay.quality.tf_report --family smol-lora [--profiles DIR]

One markdown row per ordered pair: the plan the selector serves (or full prefill) and, where none
meets the target, the closest plan (the highest lower bound of the weaker criterion) with how far
each criterion's lower bound is from it; full reuse beside it, plain and K/V-corrected, and how much
correction cut full reuse's KL. Then a one-line JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys

from kvrelay.paths import profiles_dir
from kvrelay.model import profile_file
from kvrelay.profiler import target as tg


def _slack(c: dict) -> float:
    return min(c["retained_gain_ci"][0] - tg.TARGET.retained_gain, c["top1_agreement_ci"][0] - tg.TARGET.top1)


def rows(family: str, root=None) -> list[dict]:
    out = []
    for s, r, path in profile_file.pairs_in(profiles_dir(root), family):
        prof = profile_file.load(path)
        if not prof.teacher_forced:
            continue
        d = prof.data
        by = {str(profile_file.plan_of(c)): c for c in d["configs"]}
        sel = d.get("selected")
        shown = by[str(profile_file.plan_of(sel))] if sel else max(d["configs"], key=_slack)
        plain, corr = by["none"], by["none+kv"]
        out.append(
            {
                "pair": f"{s}->{r}",
                "L": d["num_layers"],
                "samples": d["dataset"]["samples"],
                "selected": sel is not None,
                "plan": str(profile_file.plan_of(shown)),
                "layers": shown["layers_recomputed"],
                "gain": (shown["retained_gain"], *shown["retained_gain_ci"]),
                "basis": shown["retained_gain_basis"],
                "top1": (shown["top1_agreement"], *shown["top1_agreement_ci"]),
                "speedup": shown.get("prefill_speedup"),
                "reuse": (plain["retained_gain"], plain["top1_agreement"], plain.get("prefill_speedup")),
                "kl": (plain["kl"], corr["kl"]),
                "sender_top1": d["baselines"]["sender_full_prefill"]["top1_agreement"],
            }
        )
    return out


def markdown(rs: list[dict]) -> str:
    lines = [
        "| pair | served | plan shown (layers) | retained gain [90% CI] | top-1 [90% CI] | speed-up | "
        "full reuse: gain / top-1 / speed-up | sender alone: top-1 | full-reuse KL: plain -> K/V-corrected (cut) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rs:
        g, t, (kl0, kl1) = x["gain"], x["top1"], x["kl"]
        sp = f"{x['speedup']:.2f}x" if x["speedup"] else "-"
        rsp = f"{x['reuse'][2]:.1f}x" if x["reuse"][2] else "-"
        lines.append(
            f"| {x['pair']} | {'plan' if x['selected'] else 'full prefill'} | "
            f"{x['plan']} ({x['layers']}){'' if x['selected'] else ' closest'} | "
            f"{g[0]:.3f} [{g[1]:.3f}, {g[2]:.3f}] {x['basis']} | {t[0]:.3f} [{t[1]:.3f}, {t[2]:.3f}] | {sp} | "
            f"{x['reuse'][0]:.3f} / {x['reuse'][1]:.3f} / {rsp} | {x['sender_top1']:.3f} | "
            f"{kl0:.4f} -> {kl1:.4f} ({1 - kl1 / kl0:.0%}) |"
        )
    return "\n".join(lines)


def summary(rs: list[dict]) -> dict:
    cuts = [1 - x["kl"][1] / x["kl"][0] for x in rs if x["kl"][0] > 0]
    return {
        "pairs": len(rs),
        "reusing": sum(x["selected"] for x in rs),
        "reusing_at_1_7x": sum(1 for x in rs if x["selected"] and (x["speedup"] or 0) >= 1.7),
        "kv_correction_cut_full_reuse_kl": [round(min(cuts), 3), round(max(cuts), 3)] if cuts else None,
        "kv_correction_halves_kl": sum(1 for c in cuts if c >= 0.5),
        "best_gain_lower_bound": round(max(x["gain"][1] for x in rs), 3) if rs else None,
        "best_top1_lower_bound": round(max(x["top1"][1] for x in rs), 3) if rs else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", required=True)
    ap.add_argument("--profiles", default=None)
    a = ap.parse_args(argv)
    rs = rows(a.family, a.profiles)
    if not rs:
        print(f"no teacher-forced profiles of {a.family} under {profiles_dir(a.profiles)}", file=sys.stderr)
        return 2
    print(markdown(rs))
    print()
    print(json.dumps(summary(rs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
