"""`smol-quick`: the real SmolLM2-135M-Instruct and two quick fine-tunes of it, for a first run.

base   SmolLM2-135M-Instruct (the same conversion as `smol`'s base)
code   + its top 2 of 30 layers fine-tuned on Python standard library sources, 30 steps at lr 3e-4
docs   + its top 2 layers fine-tuned on the Python documentation sources, 30 steps

Built with smol's recipe (kvrelay.families.smol), only smaller: few steps, two layers, a short
held-out eval on the two domains, so that a fresh clone's `kvrelay demo` builds it and shows real
English answers within minutes. The variants stay close to the base (they still speak as it does)
and differ in their top two layers, so reusing the base's KV and recomputing those layers restores
each variant's own output. For measurements use `smol` (more steps, deeper fine-tunes).
"""

from __future__ import annotations

from pathlib import Path

from kvrelay.families import smol

NAME = "smol-quick"
BASE = smol.BASE
VARIANTS = ("code", "docs")
MODELS = (BASE,) + VARIANTS
RECIPE = 2  # 1: lr 1e-4, so close to the base that full reuse matched every profiling token
MAX_STEPS = 30
LR = 3e-4  # about smol's per-weight budget (100 steps at 1e-4) in 30 steps
MAX_MINUTES = 20.0  # a safety net: about a minute per variant on 2 quiet cores
EVAL_BLOCKS = 4


def check_sources() -> None:
    smol.check_sources()


def build(workdir: Path, progress: bool = True) -> dict:
    recipe = smol.Recipe(NAME, {v: 2 for v in VARIANTS}, MAX_MINUTES, MAX_STEPS, EVAL_BLOCKS, VARIANTS, LR)
    return smol.build_recipe(workdir, recipe, progress)
