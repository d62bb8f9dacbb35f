"""Profile file schema: frontier extraction, round trip, clear errors on malformed files."""

import json

import pytest

from kvrelay.model import profile_file as pf
from kvrelay.errors import KvRelayError
from kvrelay.model.plan import RecomputePlan

from helpers.profiles import FRONTIER, make_profile, write  # noqa: F401


def _c(plan, n, q, kl=0.0):
    return {"plan": plan, "layers_recomputed": n, "quality": q, "kl": kl}


def test_pareto_frontier_keeps_only_undominated_configs():
    cs = [
        _c([[0, 2]], 2, 70.0),
        _c([], 0, 60.0),
        _c([[2, 4]], 2, 90.0),
        _c([[0, 4]], 4, 85.0),
        _c([[2, 8]], 6, 97.0),
        _c([[0, 8]], 8, 97.0),
        _c([[4, 12]], 8, 99.0),
    ]
    fr = pf.pareto_frontier(cs)
    assert [(f["layers_recomputed"], f["quality"]) for f in fr] == [(0, 60.0), (2, 90.0), (6, 97.0), (8, 99.0)]
    assert fr[1]["plan"] == [[2, 4]]


def test_pareto_frontier_goes_by_the_flip_model_bound():
    # both plans matched every sample, but the cheap one is predicted to flip tokens: it is dominated
    cs = [
        {**_c([[26, 30]], 4, 100.0), "quality_bound": 80.0},
        {**_c([[24, 30]], 6, 100.0), "quality_bound": 100.0},
        {**_c([], 0, 100.0), "quality_bound": 60.0},
    ]
    fr = pf.pareto_frontier(cs)
    assert [(f["plan"], f["quality"], f["observed_quality"]) for f in fr] == [
        ([], 60.0, 100.0),
        ([[26, 30]], 80.0, 100.0),
        ([[24, 30]], 100.0, 100.0),
    ]
    prof = make_profile(frontier=[([], 0, 100.0)])
    prof["configs"], prof["frontier"] = cs, fr
    assert pf.validate(prof) is prof


def test_pareto_frontier_ties_prefer_lower_kl_then_first():
    cs = [_c([[0, 2]], 2, 90.0, kl=0.5), _c([[2, 4]], 2, 90.0, kl=0.1), _c([[4, 6]], 2, 90.0, kl=0.1)]
    assert pf.pareto_frontier(cs) == [{"plan": [[2, 4]], "layers_recomputed": 2, "quality": 90.0}]
    # a config with more layers and equal quality is dominated
    assert len(pf.pareto_frontier([_c([], 0, 50.0), _c([[0, 2]], 2, 50.0)])) == 1


def test_round_trip_and_typed_views(tmp_path):
    data = make_profile()
    path = write(tmp_path, data)
    assert path == tmp_path / "tiny" / "base__code.json"
    prof = pf.load(path)
    assert prof.data == data
    assert (prof.family, prof.sender, prof.receiver, prof.num_layers) == ("tiny", "base", "code", 30)
    assert prof.frontier[2].plan == RecomputePlan(((8, 14),)) and prof.frontier[2].layers == 6
    assert prof.full_prefill_quality == 100.0 and prof.full_reuse_quality == 80.0
    assert len(prof.configs) == len(data["configs"])


def test_paths():
    assert pf.path_for("profiles", "smol", "base", "code").as_posix() == "profiles/smol/base__code.json"
    assert pf.partial_path("profiles/smol/base__code.json").as_posix() == "profiles/smol/base__code.partial.json"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("receiver_fingerprint"), "lacks field.*receiver_fingerprint"),
        (lambda d: d.update(num_layers="30"), "num_layers must be int"),
        (lambda d: d.update(format=99), "format 99 is not supported"),
        (lambda d: d["dataset"].pop("split"), "dataset lacks field.*split"),
        (lambda d: d.update(configs=[]), "no scored configs"),
        (lambda d: d["configs"][1].update(plan=[[10, 40]]), r"configs\[1\].plan.*out of range"),
        (lambda d: d["configs"][1].update(plan="2-4"), r"configs\[1\].plan must be list"),
        (lambda d: d["configs"][1].update(layers_recomputed=5), "recomputes 2 layers, but layers_recomputed says 5"),
        (lambda d: d["configs"][1].update(quality=float("nan")), "quality must be float"),
        (lambda d: d["frontier"].reverse(), "frontier must rise"),
        (lambda d: d["baselines"].pop("full_reuse"), "baselines lacks full_reuse"),
        (lambda d: d["baselines"]["full_prefill"].pop("quality"), "baselines.full_prefill lacks field.*quality"),
    ],
)
def test_malformed_profiles_are_clear_errors(tmp_path, mutate, message):
    data = make_profile()
    mutate(data)
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    with pytest.raises(KvRelayError, match=message):
        pf.load(path)
    with pytest.raises(KvRelayError):
        pf.save(data, tmp_path / "q.json")
    assert not (tmp_path / "q.json").exists()


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(pf.ProfileError, match="no profile at"):
        pf.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(pf.ProfileError, match="not valid JSON"):
        pf.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(pf.ProfileError, match="must be an object"):
        pf.load(bad)
