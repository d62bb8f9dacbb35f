"""`kvrelay models build --family NAME`: build a model family's weights offline."""

from __future__ import annotations

import time

from kvrelay.families.registry import FAMILY_NAMES, build_family, is_built, load_family


def add_arguments(parser) -> None:
    parser.add_argument(
        "--family",
        required=True,
        choices=FAMILY_NAMES,
        help="family to build: tiny (test models, 53 s on 2 quiet cores), smol (SmolLM2-135M + fine-tunes, "
        "19 min), smol-quick (SmolLM2-135M + quick fine-tunes, the demo's, 156 s), smol-lora "
        "(SmolLM2-135M + four LoRA fine-tunes over every layer, about 18 min) or gemma-lora "
        "(Gemma-3-270m + three LoRA fine-tunes over every layer)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if the family is already built")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def summary_lines(family) -> list[str]:
    """A short per-model summary from family.json (used by build and list)."""
    manifest = family.manifest()
    build = manifest.get("build", {})
    weights = manifest.get("weights", {})
    base_loss = build.get(family.base, {}).get("heldout_loss", {})
    lines = []
    for m, d in family.dirs.items():
        b = build.get(m, {})
        parts = [f"  {m:<6} {d}"]
        if m == family.base and b.get("steps"):
            parts.append(
                f"({b.get('steps')} steps from random init on {b.get('corpus', '?')}, {b.get('seconds', '?')} s)"
            )
        elif m == family.base:
            parts.append(f"(pretrained, converted in {b.get('seconds', '?')} s)")
        else:
            layers = (
                f", layers {b['trained_layers'][0]}-{b['trained_layers'][1] - 1} trained"
                if b.get("trained_layers")
                else ""
            )
            if b.get("lora"):
                lora = b["lora"]
                layers = (
                    f", LoRA r={lora['r']} alpha={lora['lora_alpha']} on {'/'.join(lora['target_modules'])} "
                    f"of every layer, merged"
                )
            parts.append(f"({b.get('steps', '?')} steps on {b.get('corpus', '?')}{layers}, {b.get('seconds', '?')} s)")
        if weights.get(m):
            parts.append(f"weights {weights[m]}")
        lines.append(" ".join(parts))
        loss = b.get("heldout_loss")
        if loss and m != family.base:
            cells = ", ".join(f"{dom} {base_loss.get(dom, float('nan')):.3f} -> {v:.3f}" for dom, v in loss.items())
            lines.append(f"         held-out loss base -> {m}: {cells}")
        elif loss:
            lines.append("         held-out loss: " + ", ".join(f"{dom} {v:.3f}" for dom, v in loss.items()))
    return lines


def run(args) -> int:
    already = is_built(args.family) and not args.force
    before = load_family(args.family).manifest().get("weights", {}) if is_built(args.family) else {}
    t0 = time.monotonic()
    family = build_family(args.family, force=args.force, progress=not args.no_progress)
    took = time.monotonic() - t0
    status = "already built" if already else f"built in {took:.0f} s"
    print(f"family {family.name} {status}: {family.root}")
    print(f"  fingerprint {family.fingerprint}, base {family.base!r}, models: {', '.join(family.models)}")
    for line in summary_lines(family):
        print(line)
    if before and not already:
        print(rebuild_report(before, family.manifest().get("weights", {})))
    return 0


def rebuild_report(before: dict, after: dict) -> str:
    """A rebuild compared with the build it replaced: a build is defined by steps, seed and data, so
    the same command gives the same weights digests (on one machine; across machines fp noise may
    change the low bits of some weights, and `kvrelay profile check` re-scores profiles there)."""
    same = [m for m in after if before.get(m) == after[m]]
    other = [f"{m} {before.get(m, '-')} -> {after[m]}" for m in after if m not in same]
    if not other:
        return f"  rebuild reproduced the previous build: all {len(same)} weights digests equal"
    return (
        f"  rebuild differs from the previous build for {len(other)} of {len(after)} models: {'; '.join(other)} "
        "(profiles scored on the old weights are reported by `kvrelay models list` and the selector)"
    )


if __name__ == "__main__":
    # `python -m kvrelay.families.cli --family NAME`: the same command without importing the other
    # subcommands' modules (usable while those are missing or broken) nor kvrelay.cli, the layer above.
    import argparse
    import sys

    from kvrelay.errors import KvRelayError

    _p = argparse.ArgumentParser(prog="python -m kvrelay.families.cli", description=__doc__.splitlines()[0])
    add_arguments(_p)
    try:
        sys.exit(run(_p.parse_args()))
    except KvRelayError as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        sys.exit(2)
