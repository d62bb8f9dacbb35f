"""Triton pre/postprocessing: the family's tokenizer (shared by every variant: same fingerprint)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from kvrelay.families import family_spec
from kvrelay.model import tokenizer as tk
from kvrelay.serving import deployment as dp
from kvrelay.triton import tensors


def _tokenizer(args):
    dep = dp.Deployment.from_json(Path(tensors.params(args)["deployment"]).read_text(encoding="utf-8"))
    d = family_spec(dep.family).tokenizer_dir()
    # random-weight families have no tokenizer: they take token ids as text, "12 7 99 ..."
    return (tk.load(d) if d is not None else None), dep


class Preprocessing:
    """text_input (+ optional context, stop_words) -> input_ids, context_len, stop_ids."""

    def initialize(self, args):
        self.tok, self.dep = _tokenizer(args)
        # a variant's own entry point (e.g. model "code") has a preprocessing of its own that names it
        self.variant = tensors.params(args).get("variant", "")

    def _encode(self, text: str) -> list[int]:
        if self.tok is None:
            try:
                return [int(x) for x in text.split()]
            except ValueError:
                raise tensors.BadInput("this deployment's models have no tokenizer: send token ids as text") from None
        return tk.encode(self.tok, text)

    def _prompt(self, context: str, text: str) -> tuple[list[int], list[int]]:
        if self.tok is None:  # token ids as text: no words to wrap them in
            return self._encode(context), self._encode(text)
        return tk.prompt_ids(self.tok, context, text)

    def execute(self, requests):
        out = []
        for r in requests:
            try:
                text = tensors.scalar(r, "text_input", str, required=True)
                context = tensors.scalar(r, "context", str, "")
                if not text.strip() and not context.strip():
                    raise tensors.BadInput("text_input is empty")
                if len(text) + len(context) > self.dep.max_input_chars:
                    raise tensors.BadInput(
                        f"input is {len(text) + len(context)} characters; the limit is {self.dep.max_input_chars}"
                    )
                ctx, q = self._prompt(context, text)
                out.append(
                    pb_utils.InferenceResponse(
                        [
                            tensors.tensor("input_ids", np.asarray(ctx + q, np.int32)),
                            tensors.tensor("context_len", np.array([len(ctx)], np.int32)),
                            tensors.tensor("stop_ids", np.asarray(self._words(r, "stop_words"), np.int32)),
                            tensors.tensor("bad_ids", np.asarray(self._words(r, "bad_words"), np.int32)),
                            tensors.tensor("model", self._variant(tensors.scalar(r, "variant_name", str, ""))),
                            tensors.tensor("entry", self.variant),
                        ]
                    )
                )
            except tensors.BadInput as e:
                out.append(tensors.error_response(str(e)))
        return out

    def _words(self, r, name: str) -> list[int]:
        """Each word tokenized, -1 between them (tensorrtllm_backend sends a [1, n] tensor too)."""
        ids: list[int] = []
        words = tensors.strings(r, name)
        if len(words) > MAX_WORDS or sum(map(len, words)) > MAX_WORDS_CHARS:
            raise tensors.BadInput(
                f"{name}: at most {MAX_WORDS} words of {MAX_WORDS_CHARS} characters in all, got "
                f"{len(words)} words of {sum(map(len, words))} characters"
            )
        for w in words:
            if w:
                ids += self._encode(w) + [-1]
        return ids

    def _variant(self, asked: str) -> str:
        """The variant: the entry point's own, or the `variant_name` input ("" = the deployment's first)."""
        if self.variant and asked not in ("", self.variant):
            raise tensors.BadInput(
                f"this entry point serves {self.variant!r} only; send to model {asked!r} instead "
                f"(or to 'ensemble' with variant_name={asked!r})"
            )
        return self.variant or asked


MAX_WORDS, MAX_WORDS_CHARS = 64, 4096  # stop_words / bad_words: a list, not a document


class Postprocessing:
    """output_ids (all so far) + prev_len -> the text those tokens add (streaming-safe: decodes the
    whole output, so a multi-byte character split across tokens comes out whole)."""

    def initialize(self, args):
        self.tok, _ = _tokenizer(args)

    def execute(self, requests):
        out = []
        for r in requests:
            ids = tensors.ints(r, "output_ids")
            prev = tensors.scalar(r, "prev_len", int, 0)
            if self.tok is None:
                text = " ".join(map(str, ids[prev:]))
            else:
                text = (
                    tk.decode(self.tok, ids)[len(tk.decode(self.tok, ids[:prev])) :]
                    if prev
                    else tk.decode(self.tok, ids)
                )
            out.append(pb_utils.InferenceResponse([tensors.tensor("text_output", text)]))
        return out
