"""`kvrelay repo`: write the Triton model repository for a deployment (what the Dockerfile runs)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p):
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--family", help="every model of this family with defaults")
    g.add_argument("--deployment", help="deployment TOML file (see deploy/)")
    p.add_argument("--store", help="page store override: memory[:SIZE] or redis://HOST:PORT/DB")
    p.add_argument("--out", required=True, help="directory to write (replaced)")


def run(args) -> int:
    # lazy: torch, kept out of kvrelay --help
    from kvrelay.server.launch import resolve
    from kvrelay.server.triton_repo import generate

    dep, _ = resolve(family=args.family, deployment=args.deployment, store=args.store)
    generate(dep, Path(args.out))
    print(f"wrote {args.out} ({', '.join(dep.model_names)})")
    return 0
