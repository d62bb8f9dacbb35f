import pytest

from kvrelay.errors import PlanError
from kvrelay.model.plan import RecomputePlan


def test_parse_and_str_round_trip():
    p = RecomputePlan.parse("4-8,20-24")
    assert p.groups == ((4, 8), (20, 24)) and str(p) == "4-8,20-24"
    assert RecomputePlan.parse("none") == RecomputePlan.none() == RecomputePlan.parse("")
    assert str(RecomputePlan.none()) == "none"


@pytest.mark.parametrize(
    "text,msg",
    [
        ("4-8,6-10", "overlap"),
        ("8-12,2-4", "overlap or are unsorted"),
        ("0-31", "out of range"),
        ("5-5", "out of range"),
        ("-2-4", "bad recompute group"),
        ("a-b", "bad recompute group"),
    ],
)
def test_bad_plans_are_clear_errors(text, msg):
    with pytest.raises(PlanError, match=msg):
        RecomputePlan.parse(text).validate(30)


def test_layers_and_e_needs():
    p = RecomputePlan(((0, 2), (2, 4), (10, 12))).validate(30)
    assert p.num_recomputed == 6
    assert p.merged().groups == ((0, 4), (10, 12))
    assert p.e_layers_needed() == [10]  # a group at 0 starts from the receiver's own embeddings
    assert p.reused_layers(12) == [4, 5, 6, 7, 8, 9]
    assert RecomputePlan.all(30).num_recomputed == 30
    assert RecomputePlan.from_list(p.to_list()) == p


def test_from_list_rejects_garbage():
    with pytest.raises(PlanError, match="list of \\[start, end\\] pairs"):
        RecomputePlan.from_list([[1, 2, 3]])
