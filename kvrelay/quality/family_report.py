"""A family's per-pair table: profiles, the per-layer picture and held-out `kvrelay eval` results.

    python -m kvrelay.quality.family_report --family smol-lora [--eval-dir profiles/smol-lora/eval]

Reads profiles/<family>/<s>__<r>.json (the selected plan, full reuse's profiled agreement),
profiles/<family>/layers/*.layers.json (critical layers) and <eval-dir>/<s>__<r>.json (`kvrelay eval
--json` output) and prints one markdown row per ordered pair, plus the summary docs/quality.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvrelay.paths import profiles_dir
from kvrelay.model import profile_file
from kvrelay.profiler import layers

AGREE_MIN = 97.0  # the bar: the selected plan agrees on >= 97% of the receiver's tokens
TASK_POINTS = 1.0  # ... and is within 1 task point of the receiver's own full prefill


def rows(family: str, eval_dir: Path) -> list[dict]:
    root = profiles_dir() / family
    out = []
    for s, r, path in profile_file.pairs_in(profiles_dir(), family):
        prof = profile_file.load(path)
        if prof.teacher_forced:  # another schema: python -m kvrelay.quality.tf_report
            continue
        d = prof.data
        configs = d["configs"]
        reuse = next(c for c in configs if not c["plan"])
        best = max((c for c in configs if c["plan"]), key=profile_file.selection_quality)
        row = {
            "pair": f"{s}->{r}",
            "samples": d["dataset"]["samples"],
            "max_group": d["max_group_layers"],
            "full_reuse": (reuse["quality"], profile_file.selection_quality(reuse)),
            "best": (best["plan"], best["layers_recomputed"], best["quality"], profile_file.selection_quality(best)),
        }
        lay = root / "layers" / f"{s}__{r}{layers.SUFFIX}"
        if lay.is_file():
            row["critical"] = json.loads(lay.read_text())["critical"]
        ev = eval_dir / f"{s}__{r}.json"
        if ev.is_file():
            row["eval"] = json.loads(ev.read_text())
        out.append(row)
    return out


def profile_markdown(rs: list[dict]) -> str:
    """What each profile found: full reuse and the best group, observed agreement / the flip model's bound."""
    lines = [
        "| pair | samples x 16 tokens | groups up to | full reuse: observed / predicted | best group: observed / "
        "predicted |",
        "|---|---|---|---|---|",
    ]
    for r in rs:
        plan, layers, obs, bound = r["best"]
        grp = ",".join(f"{a}-{b}" for a, b in plan)
        lines.append(
            f"| {r['pair']} | {r['samples']} | {r['max_group']} layers | {r['full_reuse'][0]:.1f} / "
            f"{r['full_reuse'][1]:.1f} | {grp} ({layers} layers): {obs:.1f} / {bound:.1f} |"
        )
    return "\n".join(lines)


def _cell(m: dict | None, full_task: float | None) -> str:
    if not m:
        return "-"
    return (
        f"{m['agreement']:.1f} / {m['task_quality']:.1f} ({m['task_quality'] - full_task:+.1f}) / "
        f"{m['speedup_vs_full']:.1f}x"
    )


def markdown(rs: list[dict]) -> str:
    head = (
        "| pair | critical layers (one-layer reuse) | selected plan | full prefill task | selected: agree / task "
        "(Δ) / speed-up | full reuse | CacheBlend, same compute | holds |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rs:
        ev = r.get("eval")
        crit = ",".join(map(str, r.get("critical", []))) or "-"
        if not ev:
            lines.append(f"| {r['pair']} | {crit} | (not evaluated) | | | | | |")
            continue
        m, sel = ev["methods"], ev["selector"]
        full = m["full_prefill"]["task_quality"]
        plan = f"{sel['plan']} ({sel['layers_recomputed']} layers)" if sel["plan"] else "full prefill"
        selected = m.get("selected") if sel["plan"] else None
        lines.append(
            f"| {r['pair']} | {crit} | {plan} | {full:.1f} | {_cell(selected, full)} | "
            f"{_cell(m.get('full_reuse'), full)} | {_cell(m.get('cacheblend'), full)} | {holds(ev)} |"
        )
    return "\n".join(lines)


def holds(ev: dict) -> str:
    """'yes' / 'NO' for a pair the selector reuses on; '-' when it falls back to full prefill."""
    if not ev["selector"]["plan"]:
        return "-"
    m = ev["methods"]["selected"]
    ok = m["agreement"] >= AGREE_MIN and ev["task_delta_vs_full"]["selected"] >= -TASK_POINTS
    return "yes" if ok else "NO"


def summary(rs: list[dict]) -> dict:
    ev = [r["eval"] for r in rs if r.get("eval")]
    reuse = [e for e in ev if e["selector"]["plan"]]
    layers = sorted(e["selector"]["layers_recomputed"] for e in reuse)
    return {
        "pairs": len(rs),
        "evaluated": len(ev),
        "reuse": len(reuse),
        "layers_recomputed": layers,
        "holds": sum(holds(e) == "yes" for e in reuse),
        "critical_counts": sorted(len(r["critical"]) for r in rs if "critical" in r),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvrelay.quality.family_report", description=__doc__.splitlines()[0])
    p.add_argument("--family", required=True)
    p.add_argument("--eval-dir", default=None, help="default: profiles/<family>/eval")
    a = p.parse_args(argv)
    eval_dir = Path(a.eval_dir) if a.eval_dir else profiles_dir() / a.family / "eval"
    rs = rows(a.family, eval_dir)
    if not rs:
        print(f"no profiles for family {a.family!r} under {profiles_dir()}", file=sys.stderr)
        return 2
    print(profile_markdown(rs))
    print()
    print(markdown(rs))
    print()
    print(json.dumps(summary(rs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
