"""A tiny random-weight Llama base and PEFT adapters / a merged full checkpoint made from it, as a user
would bring them: made by transformers and PEFT directly, nothing of kvrelay involved. Seconds on CPU."""

from __future__ import annotations

import json
from pathlib import Path

VOCAB = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(253)]
ARCH = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=512,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    initializer_range=0.25,
)


def tokenizer(bos: bool = False):
    """A word-level tokenizer over VOCAB; `bos`: it puts <s> before every sequence, as Gemma's and Llama 3's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_base(out: Path, seed: int = 0, dtype=None, shard: str | None = None, **arch) -> Path:
    """A random-weight Llama saved as HF does (`shard`: a max_shard_size, for an indexed checkpoint)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(VOCAB), bos_token_id=1, eos_token_id=2, pad_token_id=0, **{**ARCH, **arch})
    model = LlamaForCausalLM(cfg)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    tokenizer().save_pretrained(out)
    return Path(out)


def load(model_dir, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32)


def make_lora(base: Path, out: Path, seed: int = 1, safetensors: bool = True, **lora) -> Path:
    """A PEFT LoRA adapter over `base` with random non-zero B (init_lora_weights=False), not trained."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        **{
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "init_lora_weights": False,
            "task_type": "CAUSAL_LM",
            **lora,
        }
    )
    model = get_peft_model(load(base), cfg)
    model.save_pretrained(out, safe_serialization=safetensors)
    return Path(out)


def make_full(base: Path, adapter: Path, out: Path) -> Path:
    """A full checkpoint: `adapter` merged into `base` by PEFT (merge_and_unload), saved with the tokenizer."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(base), str(adapter)).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer().save_pretrained(out)
    return Path(out)


def merged(base: Path, adapter: Path):
    """PEFT's own merge of `adapter` into `base`: the reference a LoRA variant must equal."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load(base), str(adapter)).merge_and_unload()


def edit_json(path: Path, **changes) -> None:
    d = json.loads(Path(path).read_text())
    d.update(changes)
    Path(path).write_text(json.dumps(d, indent=2))
