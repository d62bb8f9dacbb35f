"""Quality metrics: task metrics against a reference answer, and agreement with a reference output.

Task metrics (all in [0, 1]; reports multiply by 100):
  token_f1         SQuAD-style bag-of-words F1 over normalized words (lowercase, punctuation and
                   English articles removed): extractive QA.
  rouge_l          Rouge-L F1: longest common subsequence of lowercase word tokens, F with beta = 1:
                   summary / continuation.
  edit_similarity  1 - Levenshtein(a, b) / max(len(a), len(b)) over characters (both stripped): code.

Agreement of a re-prefilled output with the receiver's own full-prefill output:
  the same text metrics on the generated texts, plus
  prefix_match     fraction of the reference's first N tokens reproduced exactly before the first
                   divergence (profile_quality: the profiler's quality score),
  top1_agreement   fraction of the first N generated positions where both next-token distributions
                   have the same argmax,
  mean_kl          mean KL(P_full || P_plan) in nats over those positions (from `return_logits`);
                   callers restrict both to `comparable_positions` (identical prefixes).
No torch import at module level: the logit metrics import it when called.
"""

from __future__ import annotations

import re
import string
from collections import Counter

from kvrelay.errors import KvRelayError

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and articles, squeeze whitespace."""
    text = text.lower()
    text = "".join(" " if ch in _PUNCT else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-words F1 of normalized words. Both empty -> 1.0; exactly one empty -> 0.0."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1 over lowercase word/punctuation tokens. Both empty -> 1.0; one empty -> 0.0."""
    p, r = _words(prediction), _words(reference)
    if not p or not r:
        return float(p == r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_similarity(prediction: str, reference: str) -> float:
    """1 - normalized character Levenshtein distance of the stripped strings; both empty -> 1.0."""
    p, r = prediction.strip(), reference.strip()
    if not p and not r:
        return 1.0
    return 1.0 - levenshtein(p, r) / max(len(p), len(r))


TEXT_METRICS = {"token_f1": token_f1, "rouge_l": rouge_l, "edit_similarity": edit_similarity}


def text_metric(name: str):
    try:
        return TEXT_METRICS[name]
    except KeyError:
        raise KvRelayError(f"unknown metric {name!r}; known: {', '.join(TEXT_METRICS)}") from None


def score(name: str, prediction: str, reference: str) -> float:
    return text_metric(name)(prediction, reference)


# --- agreement with the receiver's own full-prefill output ----------------------------------------


def top1_agreement(logits_ref, logits_test, n: int | None = None) -> float:
    """Fraction of the first n positions (default: all both have) whose argmax tokens agree.
    Each argument is a sequence of 1-D logit tensors (one per generated position)."""
    k = min(len(logits_ref), len(logits_test)) if n is None else min(n, len(logits_ref), len(logits_test))
    if k == 0:
        return 0.0
    return sum(int(a.argmax()) == int(b.argmax()) for a, b in zip(logits_ref[:k], logits_test[:k])) / k


def mean_kl(logits_ref, logits_test, n: int | None = None) -> float:
    """Mean over the first n positions of KL(softmax(ref) || softmax(test)), in nats."""
    import torch

    k = min(len(logits_ref), len(logits_test)) if n is None else min(n, len(logits_ref), len(logits_test))
    if k == 0:
        return 0.0
    total = 0.0
    for a, b in zip(logits_ref[:k], logits_test[:k]):
        lp = torch.log_softmax(a.double(), -1)
        lq = torch.log_softmax(b.double(), -1)
        total += float((lp.exp() * (lp - lq)).sum())
    return max(total / k, 0.0)


def agreement(text_ref: str, text_test: str, logits_ref=(), logits_test=(), n_logits: int | None = None) -> dict:
    """All agreement metrics of a test output against a reference output (each in [0, 1], KL in nats)."""
    out = {name: fn(text_test, text_ref) for name, fn in TEXT_METRICS.items()}
    if len(logits_ref) and len(logits_test):
        out["top1"] = top1_agreement(logits_ref, logits_test, n_logits)
        out["kl"] = mean_kl(logits_ref, logits_test, n_logits)
    return out


def first_divergence(ref_tokens, test_tokens) -> int:
    """Index of the first position where the two token sequences differ (the shorter length if one
    is a prefix of the other)."""
    for i, (a, b) in enumerate(zip(ref_tokens, test_tokens)):
        if a != b:
            return i
    return min(len(ref_tokens), len(test_tokens))


def prefix_match(ref_tokens, test_tokens, n: int | None = None) -> float:
    """Fraction of the reference's first n tokens (all if n is None) that the test reproduces as an
    exact prefix. Generation stops at EOS, which is part of the tokens, so stopping early or late
    counts as a mismatch. An empty reference scores 1.0."""
    ref = list(ref_tokens)[:n] if n is not None else list(ref_tokens)
    if not ref:
        return 1.0
    return min(first_divergence(ref, test_tokens), len(ref)) / len(ref)


def comparable_positions(ref_tokens, test_tokens, n: int | None = None) -> int:
    """Generated positions whose prefixes are identical in both runs (so their next-token
    distributions can be compared): up to and including the first divergence, at most n."""
    d = first_divergence(ref_tokens, test_tokens)
    k = min(d + 1, len(ref_tokens), len(test_tokens))
    return k if n is None else min(k, n)


def profile_quality(ref_tokens, test_tokens, n: int | None = None) -> float:
    """The profiler's quality score of one sample, 0-100: how much of the receiver's own greedy
    full-prefill output (its first n tokens, EOS included) a re-prefill reproduces exactly before
    it first diverges. The full prefill scores 100 against itself.

    Why not F1 / top-1 of free-running outputs: after the first differing token the two runs
    condition on different prefixes, so later positions compare unrelated distributions, and
    near-ties at EOS or punctuation swing word-level F1 between 0 and 100."""
    return 100.0 * prefix_match(ref_tokens, test_tokens, n)
