"""How often a plan would flip a greedy token: a first-order model that counts near-ties.

Why: a plan's exact agreement with the receiver's greedy output is a rare-event statistic. A
profile of 8-16 samples cannot tell a plan that diverges on 1 request in 10 from one that never
does (measured on smol at 7k tokens: every config of docs->code, full reuse included, matched the
first sample exactly, yet full reuse served 4-5 of 6 contexts exactly under load). Counting flips
directly would need hundreds of samples per plan at serving lengths.

The model splits the rare event into two frequent ones. At a generated position the greedy token
flips when the plan moves the logit gap between the reference's top two tokens by more than that
gap: flip iff shift > gap. Across positions, treating gap and shift as independent,

    P(flip) = E_shift[P(gap < shift)] ~= rho * E[shift]       (shift small against eps)

where rho is the density of the reference's top-2 gap at 0. rho is estimated from how many of the
n observed gaps fall below eps, at the 95% upper Poisson bound of that count: few samples give a
loose (high) density, so a plan must show a correspondingly smaller shift to pass. E[shift] is the
mean over every position where the two runs' prefixes are identical (so many more positions than
exact matches). Predicted exact agreement of a T-token generation: 100 * (1 - P(flip))^T.

No torch at module level: gaps and shifts need it, the pooled model does not.
"""

from __future__ import annotations

import math

EPS = 0.5  # logits: gaps below this count towards the near-tie density
CONFIDENCE = 0.95  # one-sided, for the density's upper bound


def top2_gaps(logits) -> list[float]:
    """Per position: the reference's top-1 minus top-2 logit."""
    import torch

    out = []
    for z in logits:
        top = torch.topk(z.double(), 2).values
        out.append(float(top[0] - top[1]))
    return out


def gap_shifts(logits_ref, logits_test, k: int) -> list[float]:
    """Per position (the first k, identical prefixes): how far the test run moved the logit gap
    between the reference's top two tokens."""
    import torch

    out = []
    for a, b in zip(logits_ref[:k], logits_test[:k]):
        i, j = torch.topk(a.double(), 2).indices.tolist()
        out.append(abs(float((b[i].double() - b[j].double()) - (a[i].double() - a[j].double()))))
    return out


def poisson_upper(count: int, confidence: float = CONFIDENCE) -> float:
    """The one-sided upper confidence bound on a Poisson mean after observing `count`:
    the lambda with P(X <= count; lambda) = 1 - confidence (bisection; exact, no scipy)."""
    alpha = 1 - confidence

    def cdf(lam: float) -> float:
        term = total = math.exp(-lam)
        for x in range(1, count + 1):
            term *= lam / x
            total += term
        return total

    lo, hi = float(count), float(count) + 10 + 10 * math.sqrt(count + 1)
    for _ in range(100):
        mid = (lo + hi) / 2
        if cdf(mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def near_tie_density(gaps: list[float], eps: float = EPS) -> float:
    """Upper bound on the density (per logit) of the reference's top-2 gap near 0."""
    if not gaps:
        raise ValueError("no gaps observed")
    below = sum(1 for g in gaps if g < eps)
    return poisson_upper(below) / (len(gaps) * eps)


def flip_rate(density: float, mean_shift: float) -> float:
    return min(1.0, density * mean_shift)


def predicted_exact(density: float, mean_shift: float, tokens: int) -> float:
    """Predicted share (0-100) of `tokens`-token greedy generations reproduced exactly."""
    return 100.0 * (1.0 - flip_rate(density, mean_shift)) ** tokens
