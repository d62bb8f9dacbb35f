#!/usr/bin/env python
"""The mixed-workload load test (sharing off, then on, one run) on a LoRA family served unmerged in
one engine (issue 25: ">= 2.5x on a LoRA family").

The family: the SmolLM2 base (smol-lora's, or --base) and --adapters random rank-16 PEFT adapters on
all seven projections of the upper layers only (PEFT `layers_to_transform`, --first-layer up; made by
kvrelay.bench.adapters). Such adapters compute the base's own KV below --first-layer, so with sharing
on the engine takes those layers from whichever model of the family prefilled the context first and
recomputes only the rest; with sharing off (the baseline) every variant prefills every layer. There
are no profiles for this family, so no DroidSpeak plan is used: what is measured is exact sharing.

    .venv/bin/python scripts/lora_mixed_load.py [--first-layer 16] [--adapters 4] [-- LOADTEST ARGS]

Everything after `--` goes to `kvrelay loadtest` (e.g. --requests 48 --context-tokens 1024-2048).
Prints the loadtest's JSON summary.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from kvrelay import paths
from kvrelay.bench.adapters import random_adapters
from kvrelay.families import family_spec, user
from kvrelay.model.spec import read_hf_config


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", type=Path, help="the base model directory (default: smol-lora's, built)")
    p.add_argument("--adapters", type=int, default=4)
    p.add_argument("--first-layer", type=int, default=16, help="the lowest layer the adapters change")
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    base = a.base or family_spec("smol-lora").dirs["base"]
    layers = read_hf_config(base)["num_hidden_layers"]
    if not 0 < a.first_layer < layers:
        p.error(f"--first-layer must be in 1..{layers - 1}")
    adapters = random_adapters(base, a.adapters, 16, key="smol-lora", layers=tuple(range(a.first_layer, layers)))
    name = f"lora-upper-{a.first_layer}"
    user.ensure_registered(name, str(base), {f"u{i}": str(d) for i, d in enumerate(adapters)})
    toml = paths.home() / f"{name}.toml"
    toml.write_text(f'family = "{name}"\nlora = "unmerged"\nmax_loras = {a.adapters}\n')
    cmd = [sys.executable, "-m", "kvrelay.cli", "loadtest", "--deployment", str(toml), "--json", *extra]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
