"""`kvrelay models remove NAME`: forget a registered family (its symlinks and family.json; your files stay)."""

from __future__ import annotations

from kvrelay.families.registry import remove_family


def add_arguments(p) -> None:
    p.add_argument("name", help="a family registered with `kvrelay models add`")


def run(args) -> int:
    root = remove_family(args.name)
    print(f"family {args.name} removed ({root}); the model directories it named are untouched")
    return 0
