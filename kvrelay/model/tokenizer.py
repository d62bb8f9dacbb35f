"""The family's tokenizer (all models of a family share it: that is part of the fingerprint)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=8)
def load(model_dir: str | Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(model_dir))


def encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=True)


def prompt(context: str, question: str) -> tuple[str, str]:
    """How kvrelay lays out a request: the shared context first (so its blocks hash the same for
    every model and question), then the request's own part."""
    return context.rstrip() + "\n\n", f"Question: {question.strip()}\nAnswer:"
