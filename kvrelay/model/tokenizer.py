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


@lru_cache(maxsize=8)
def _start(tok) -> tuple[int, ...]:
    with_, without = tok.encode("a", add_special_tokens=True), tok.encode("a", add_special_tokens=False)
    n = len(with_) - len(without)
    return tuple(with_[:n]) if n > 0 and with_[n : n + len(without)] == without else ()


def start_ids(tok) -> list[int]:
    """What the tokenizer puts before a sequence (BOS for Gemma and Llama 3, nothing for SmolLM2):
    a model trained with BOS first reads a prompt without it as a different input (Gemma-3-270m on
    held-out code: 4.21 nats/token without, 2.24 with), so every prompt starts with these."""
    return list(_start(tok))


def prompt_ids(tok, context: str, question: str) -> tuple[list[int], list[int]]:
    """(context ids, question ids) of a request laid out by `prompt`, the sequence start first."""
    if not context:
        return [], start_ids(tok) + encode(tok, question)
    ctx_text, q_text = prompt(context, question)
    return start_ids(tok) + encode(tok, ctx_text), encode(tok, q_text)


def prompt(context: str, question: str) -> tuple[str, str]:
    """How kvrelay lays out a request: the shared context first (so its blocks hash the same for
    every model and question), then the request's own part."""
    return context.rstrip() + "\n\n", f"Question: {question.strip()}\nAnswer:"
