"""The quality target's statistics: retained gain's two bases, bootstrap lower bounds, the judgement."""

import pytest

from kvrelay.profiler import target as tg
from kvrelay.profiler.target import CaseSums


def _cases(n, kl, nll, top1, positions=64, wobble=0.0):
    return [
        CaseSums(positions, kl * positions * (1 + wobble * ((i % 3) - 1)), nll * positions, top1 * positions)
        for i in range(n)
    ]


R = _cases(6, 0.0, 2.0, 1.0)  # the receiver itself
S = _cases(6, 0.40, 2.5, 0.80)  # the sender: 0.5 nats/token worse on this text, KL 0.4 from R


def test_the_receiver_retains_everything_and_the_sender_nothing():
    own = tg.summarize(R, R, S)
    assert own["retained_gain"] == pytest.approx(1.0) and own["retained_gain_basis"] == "nll"
    assert own["top1_agreement"] == 1.0 and own["kl"] == 0
    assert tg.summarize(S, R, S)["retained_gain"] == pytest.approx(0.0)
    half = tg.summarize(_cases(6, 0.2, 2.25, 0.9), R, S)
    assert half["retained_gain"] == pytest.approx(0.5)


def test_kl_basis_where_the_nll_difference_is_too_small():
    s_close = _cases(6, 0.40, 2.005, 0.8)
    got = tg.summarize(_cases(6, 0.1, 2.004, 0.95), R, s_close)
    assert got["retained_gain_basis"] == "kl" and got["retained_gain"] == pytest.approx(0.75)


def test_intervals_widen_with_spread_and_selection_uses_the_lower_bound():
    R8, S8 = _cases(8, 0.0, 2.0, 1.0), _cases(8, 0.40, 2.5, 0.80)
    tight = tg.summarize(_cases(8, 0.01, 2.01, 0.99), R8, S8)
    loose = tg.summarize(_cases(4, 0.01, 2.01, 0.99) + _cases(4, 0.01, 2.2, 0.99), R8, S8)
    w = lambda s: s["retained_gain_ci"][1] - s["retained_gain_ci"][0]
    assert w(loose) > w(tight)
    assert tg.meets(tight) and not tg.meets(loose)  # same plan class, but its lower bound fails
    assert tight["retained_gain_ci"][0] <= tight["retained_gain"] <= tight["retained_gain_ci"][1]


def test_top1_and_task_clauses():
    ok = tg.summarize(_cases(6, 0.01, 2.01, 0.985), R, S)
    low_top1 = tg.summarize(_cases(6, 0.01, 2.01, 0.95), R, S)
    assert tg.meets(ok) and not tg.meets(low_top1)
    assert (
        tg.meets(low_top1, tg.TARGET) is False and tg.meets(ok, tg.STRICT) is False
    )  # strict: top-1 >= 99% lower bound
    assert tg.task_ok(20.0, 20.5) is True and tg.task_ok(18.0, 20.5) is False
    assert tg.task_ok(0.0, 3.0) is None  # receiver below the floor: the clause does not apply
    assert tg.meets(ok, task=False) is False and tg.meets(ok, task=None) is True


def test_summarize_refuses_mismatched_cases():
    with pytest.raises(ValueError):
        tg.summarize(R[:3], R, S)
