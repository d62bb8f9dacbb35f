"""`kvrelay models build --family NAME`: build a model family's weights offline."""

from __future__ import annotations

import argparse
import sys
import time

from kvrelay.errors import KvRelayError
from kvrelay.families.registry import FAMILY_NAMES, build_family, is_built, load_family
from kvrelay.families.report import rebuild_report, summary_lines


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


if __name__ == "__main__":
    # `python -m kvrelay.families.build_cmd --family NAME`: the same command without importing the other
    # subcommands' modules (usable while those are missing or broken) nor kvrelay.cli, the layer above.
    _p = argparse.ArgumentParser(prog="python -m kvrelay.families.build_cmd", description=__doc__.splitlines()[0])
    add_arguments(_p)
    try:
        sys.exit(run(_p.parse_args()))
    except KvRelayError as e:
        print(f"kvrelay: error: {e}", file=sys.stderr)
        sys.exit(2)
