"""Shared fixtures. Models come from the real families (tiny, built once into the cache), and for the
real-model family a SmolLM2 pair that is cheap enough for CI (see smol_pair_dirs)."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import pytest


@pytest.fixture
def rng():
    """Fresh random inputs each run; the seed is printed so a failure can be replayed (KVRELAY_SEED)."""
    seed = int(os.environ.get("KVRELAY_SEED") or random.SystemRandom().randrange(2**31))
    print(f"KVRELAY_SEED={seed}")
    return random.Random(seed)


@pytest.fixture(scope="session")
def tiny_family():
    from kvrelay.families import ensure_built

    return ensure_built("tiny")


def _smol_pair_dirs() -> tuple[Path, Path]:
    """(sender, receiver) model dirs of the real SmolLM2 architecture.

    With the smol family built: its base and code models. Otherwise (fresh CI machine) the real
    pretrained base converted from the GGUF wheel, and a receiver made from it by a few real
    fine-tuning steps on code, cached under $KVRELAY_HOME so later runs are instant."""
    from kvrelay.families import is_built, load_family

    if is_built("smol"):
        fam = load_family("smol")
        return fam.model_dir("base"), fam.model_dir("code")
    from kvrelay.families import finetune, sources
    from kvrelay.paths import home

    root = home() / "test-fixtures" / "smol-pair"
    base, tuned = root / "base", root / "tuned"
    if not (tuned / "config.json").exists():
        shutil.rmtree(root, ignore_errors=True)
        tok = sources.load_tokenizer()
        model = sources.load_model(progress=False)
        finetune.save_model(model, tok, base)
        blocks = finetune.mixed_blocks(tok, ["code"], "train", n_blocks=8, block_len=128, seed=0)
        finetune.train(model, blocks, max_steps=2, batch_size=4, lr=1e-4, seed=0, warmup=1, progress=False)
        finetune.save_model(model, tok, tuned)
    return base, tuned


FAMILY_CONTEXT = {"tiny": 200, "smol": 96}  # context tokens per exactness case: fast, several blocks


@pytest.fixture(scope="session", params=["tiny", "smol"])
def pair(request):
    """(family name, sender engine, receiver engine) for both families."""
    from kvrelay.model.engine_api import EngineConfig
    from kvrelay.backends.torch_engine.engine import TorchEngine

    if request.param == "tiny":
        fam = request.getfixturevalue("tiny_family")
        s_dir, r_dir = fam.model_dir("base"), fam.model_dir("code")
    else:
        s_dir, r_dir = _smol_pair_dirs()
    cfg = lambda: EngineConfig(block_size=16, kv_cache_bytes=256 << 20)
    return request.param, TorchEngine.from_dir("sender", s_dir, cfg()), TorchEngine.from_dir("receiver", r_dir, cfg())
