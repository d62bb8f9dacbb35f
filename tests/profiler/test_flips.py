"""The flip model: exact Poisson bounds, and predictions that move the right way."""

import math

import pytest
import torch

from kvrelay.profiler import flips


@pytest.mark.parametrize("count, upper", [(0, 2.9957), (1, 4.7439), (5, 10.5130), (20, 29.0620)])
def test_poisson_upper_matches_tables(count, upper):
    assert flips.poisson_upper(count) == pytest.approx(upper, abs=2e-3)


def test_fewer_gaps_give_a_looser_density():
    # the same share of near-ties, seen over 10x fewer positions, bounds the density higher
    few = flips.near_tie_density([0.1] * 2 + [3.0] * 98)
    many = flips.near_tie_density([0.1] * 20 + [3.0] * 980)
    assert few > many > 20 / 1000 / flips.EPS


def test_prediction_is_exact_without_shift_and_falls_with_it():
    rho = flips.near_tie_density([0.2, 1.0, 2.0, 4.0])
    assert flips.predicted_exact(rho, 0.0, 12) == 100.0
    small, large = flips.predicted_exact(rho, 1e-3, 12), flips.predicted_exact(rho, 1e-1, 12)
    assert 100.0 > small > large >= 0.0
    assert flips.predicted_exact(rho, 1e3, 12) == 0.0


def test_gaps_and_shifts_read_the_reference_top_two():
    ref = [torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 1.5])]
    test = [torch.tensor([3.0, 2.5, 0.0]), torch.tensor([9.0, 2.0, 1.5])]  # token 0 is not in ref's top 2 at pos 1
    assert flips.top2_gaps(ref) == pytest.approx([2.0, 0.5])
    assert flips.gap_shifts(ref, test, 2) == pytest.approx([1.5, 0.0])
    assert flips.gap_shifts(ref, test, 1) == pytest.approx([1.5])
    assert math.isclose(flips.gap_shifts(ref, ref, 2)[1], 0.0)
