"""Every prompt starts the way the family's tokenizer starts a sequence: with BOS where it adds one
(Gemma, Llama 3), with nothing where it does not (SmolLM2), whether or not a context is shared."""

from __future__ import annotations

import pytest

from helpers import user_models as um
from kvrelay.model import tokenizer as tk


@pytest.mark.parametrize("bos", [True, False])
def test_start_ids_are_what_the_tokenizer_puts_first(bos):
    tok = um.tokenizer(bos=bos)
    assert tk.start_ids(tok) == ([1] if bos else [])
    assert tok.encode("w5 w6") == tk.start_ids(tok) + tk.encode(tok, "w5 w6")


@pytest.mark.parametrize("bos", [True, False])
def test_prompt_starts_with_them_once_with_or_without_context(bos):
    tok = um.tokenizer(bos=bos)
    start = [1] if bos else []
    ctx, q = tk.prompt_ids(tok, "w10 w11 w12", "w20")
    assert ctx == start + [13, 14, 15] and 1 not in q  # BOS leads the shared context only
    ctx, q = tk.prompt_ids(tok, "", "w20")
    assert ctx == [] and q == start + [23]
