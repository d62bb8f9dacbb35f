"""`smol-lora`: the real SmolLM2-135M-Instruct and four LoRA fine-tunes of it, every layer adapted.

base       SmolLM2-135M-Instruct (the same conversion as `smol`'s base)
code       + a LoRA adapter trained on Python standard library sources
docs       + a LoRA adapter trained on the Python documentation sources (python3.11-doc)
legal      + a LoRA adapter trained on Debian copyright files
changelog  + a LoRA adapter trained on Debian package changelogs (release notes)

This is how owners of real variants fine-tune a shared base (the paper's LoRA pairs: ultrachat SFT,
Phi-3.5 and LoRA-Land adapters): Hugging Face PEFT, rank RANK adapters on the attention and MLP
projections (q, k, v, o, gate, up, down) of all 30 layers, so every layer moves, unlike `smol`,
whose variants train only their top layers and so leave the lower layers' KV exactly the base's.
Each adapter trains for exactly MAX_STEPS AdamW steps on its domain's "train" part (seeded data
order and seeded adapter init): the build is defined by steps, seed and data, never by the clock;
past MAX_MINUTES per variant the build stops with an error. The adapter is saved as PEFT wrote it
(<variant>/adapter/: adapter_config.json, adapter_model.safetensors) and then merged into full
weights (<variant>/model.safetensors), which is what is served. Held-out loss on every domain for
the base and the variant goes to <variant>/eval.json; the build fails if a variant does not beat the
base on its own domain. family.json records the adapter config, steps, seeds and data per variant.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import SourceMissing
from kvrelay.families import corpora, smol, sources

NAME = "smol-lora"
BASE = "base"
VARIANTS = ("code", "docs", "legal", "changelog")
MODELS = (BASE,) + VARIANTS
RECIPE = 1

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK = 16
ALPHA = 32
DROPOUT = 0.0  # no dropout: a seeded build is then a function of steps, seed and data
BLOCK_LEN = 256
BATCH = 4
LR = 1e-3  # LoRA's usual 1e-4..2e-4 is for thousands of steps; a CPU budget affords 60
WARMUP = 5
WEIGHT_DECAY = 0.0
MAX_STEPS = 60  # about 4 minutes per variant on 2 quiet cores (3.9 s a step)
MAX_MINUTES = 30.0  # a safety net only
EVAL_BLOCKS = 12
SEED = 3030


def budget() -> tuple[float, int]:
    minutes = float(os.environ.get("KVRELAY_SMOL_MAX_MINUTES") or MAX_MINUTES)
    return minutes, MAX_STEPS


def check_sources() -> None:
    sources.gguf_path()
    for d in VARIANTS:
        corpora.check_source(d)
    check_peft(NAME)


def check_peft(family: str) -> None:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise SourceMissing(
            f"family {family!r} is built with Hugging Face PEFT, which is not installed ({e}); "
            "run: pip install peft (scripts/setup.sh installs it)"
        ) from None


def lora_config() -> dict:
    return dict(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=DROPOUT,
        target_modules=list(TARGET_MODULES),
        bias="none",
        task_type="CAUSAL_LM",
    )  # == LoraRecipe(...).lora_config() with smol-lora's defaults


@dataclass(frozen=True)
class LoraRecipe:
    """What a LoRA family trains: its base's source, variants (= corpus domains), adapter and budget.
    `smol-lora` is RECIPE_SMOL; gemma-lora (kvrelay/families/gemma_lora.py) another instance."""

    name: str
    source: object  # a sources.GgufSource (None: SmolLM2)
    variants: tuple[str, ...]
    max_steps: int
    max_minutes: float
    eval_blocks: int
    block_len: int
    batch: int = BATCH
    lr: float = LR
    seed: int = SEED
    rank: int = RANK
    alpha: int = ALPHA
    target_modules: tuple[str, ...] = TARGET_MODULES
    bos: bool = False  # every train and eval row starts with BOS (finetune.with_bos): Gemma

    def lora_config(self) -> dict:
        return dict(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=DROPOUT,
            target_modules=list(self.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )


def build(workdir: Path, progress: bool = True) -> dict:
    """Write the models into workdir/<model>; return per-model build info for family.json."""
    max_minutes, max_steps = budget()
    return build_lora(
        workdir, LoraRecipe(NAME, None, VARIANTS, max_steps, max_minutes, EVAL_BLOCKS, BLOCK_LEN), progress
    )


def build_lora(workdir: Path, recipe: LoraRecipe, progress: bool = True) -> dict:
    """The base converted from recipe.source, then one merged PEFT LoRA fine-tune per variant."""
    import torch
    from peft import LoraConfig, get_peft_model

    from kvrelay.families import finetune  # lazy: torch; load_family imports this builder (RECIPE)

    name, L, B = recipe.name, recipe.block_len, recipe.batch
    tok, base, evaluate, info = smol.convert_base(
        workdir, name, recipe.variants, recipe.eval_blocks, L, progress, source=recipe.source, batch=B, bos=recipe.bos
    )
    for k, variant in enumerate(recipe.variants):
        seed = recipe.seed + 100 * (k + 1)
        torch.manual_seed(seed)  # the adapter's A matrices are drawn here (B starts at zero)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**recipe.lora_config()))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        blocks = finetune.token_blocks(tok, corpora.load_split(variant, "train"), recipe.max_steps * B, L, seed)
        if recipe.bos:
            blocks = finetune.with_bos(blocks, tok.bos_token_id)
        res = finetune.train(
            model,
            blocks,
            max_steps=recipe.max_steps,
            batch_size=B,
            lr=recipe.lr,
            seed=seed,
            warmup=WARMUP,
            weight_decay=WEIGHT_DECAY,
            max_seconds=recipe.max_minutes * 60,
            progress=progress,
            desc=f"{name}/{variant} LoRA fine-tune",
        )
        out = workdir / variant
        model.save_pretrained(out / "adapter", safe_serialization=True)
        merged = model.merge_and_unload()
        var_eval, eval_s = smol.finish_variant(
            workdir, name, variant, merged, tok, evaluate, info, recipe.eval_blocks, L
        )
        info[variant] = dict(
            seconds=res.seconds,
            eval_seconds=eval_s,
            steps=res.steps,
            corpus=variant,
            parent=BASE,
            data=f"corpora {variant!r} train part: {len(blocks)} blocks of {L} tokens"
            f"{' (BOS first)' if recipe.bos else ''}, seed {seed}",
            seed=seed,
            lora=recipe.lora_config(),
            trainable_params=trainable,
            adapter="adapter/",
            merged=True,
            lr=recipe.lr,
            batch=B,
            block_len=L,
            warmup=WARMUP,
            tokens=res.tokens,
            max_minutes=recipe.max_minutes,
            max_steps=recipe.max_steps,
            train_loss=[res.first_loss, res.last_loss],
            heldout_loss=var_eval,
        )
        del model, merged
    return info
