"""Model families: a base model and fine-tuned variants sharing one architecture and tokenizer.

    from kvrelay.families import load_family, ensure_built, family_spec
    fam = ensure_built("tiny")          # builds into $KVRELAY_HOME/families/tiny on first use
    fam.model_dir("code")               # a Hugging Face model dir
    fam.model("code")                   # its identity (kvrelay.model.spec.ModelSpec)
    family_spec("llama8b-random")       # the same type (kvrelay.model.spec.FamilySpec), synthetic too

Families: "tiny" (random-init Llama for tests), "smol" (SmolLM2-135M-Instruct + top-layer fine-tunes),
"smol-quick" (the same recipe, small enough for the first-run demo) and "smol-lora" (four PEFT LoRA
fine-tunes over every layer, merged).
Importing this package does not import torch.
"""

from kvrelay.families.registry import (
    FAMILY_NAMES,
    build_family,
    ensure_built,
    family_models,
    family_spec,
    is_built,
    load_family,
)

__all__ = [
    "FAMILY_NAMES",
    "build_family",
    "ensure_built",
    "family_models",
    "family_spec",
    "is_built",
    "load_family",
]
