"""Selector rules (queueing vs. idle/SLO, quality target), fallbacks, caching; the latency model."""

import logging

import pytest

from kvrelay.errors import KvRelayError
from kvrelay.model.plan import RecomputePlan
from kvrelay.serving.selector import Choice, LatencyModel, Selector
from helpers.profiles import make_profile, write

FP = "fp-test"

# 30 layers; at 1024 tokens: full 3.0 s; 3 layers 0.5 s, 8 layers 1.0 s, 15 layers 1.7 s  (~0.1 s / layer)
BENCH = {
    "num_layers": 30,
    "full_s": {"1024": 3.0, "2048": 6.2},
    "layers_recomputed": {"0.1": 3, "0.25": 8, "0.5": 15},
    "reprefill_s": {
        "0.1": {"1024": 0.5, "2048": 1.0},
        "0.25": {"1024": 1.0, "2048": 2.1},
        "0.5": {"1024": 1.7, "2048": 3.5},
    },
}


@pytest.fixture
def profiles(tmp_path):
    write(tmp_path, make_profile())
    return tmp_path


def test_queueing_picks_fewest_layers_meeting_quality(profiles):
    c = Selector(profiles, "tiny").choose("base", "code", FP, FP, context_tokens=1024, queued=3)
    assert isinstance(c, Choice)
    assert c.plan == RecomputePlan(((8, 14),)) and c.expected_quality == 99.2
    assert c.reason.startswith("queueing")
    # a looser target admits the 2-layer plan
    c = Selector(profiles, "tiny", quality_target=0.05).choose("base", "code", FP, FP, context_tokens=1024, queued=1)
    assert c.plan == RecomputePlan(((10, 12),))


def test_idle_without_slo_or_latency_uses_fewest_layers(profiles):
    lat = LatencyModel.from_bench(BENCH)
    for sel, slo in ((Selector(profiles, "tiny"), 5.0), (Selector(profiles, "tiny", latency=lat), None)):
        c = sel.choose("base", "code", FP, FP, context_tokens=1024, queued=0, slo_s=slo)
        assert c.plan == RecomputePlan(((8, 14),)) and "fewest" in c.reason


def test_idle_picks_most_recompute_within_slo(profiles):
    lat = LatencyModel.from_bench(BENCH)
    sel = Selector(profiles, "tiny", latency=lat)
    t6, t10 = lat.predict(1024, 6), lat.predict(1024, 10)
    assert t6 < t10
    c = sel.choose("base", "code", FP, FP, context_tokens=1024, queued=0, slo_s=t10 + 0.01)
    assert c.plan == RecomputePlan(((4, 14),)) and c.reason.startswith("idle: most recompute")
    assert c.expected_prefill_s == pytest.approx(t10)
    c = sel.choose("base", "code", FP, FP, context_tokens=1024, queued=0, slo_s=(t6 + t10) / 2)
    assert c.plan == RecomputePlan(((8, 14),))
    c = sel.choose("base", "code", FP, FP, context_tokens=1024, queued=0, slo_s=t6 / 10)
    assert c.plan == RecomputePlan(((8, 14),)) and "no plan meets" in c.reason
    # queued requests override the idle rule
    c = sel.choose("base", "code", FP, FP, context_tokens=1024, queued=2, slo_s=100.0)
    assert c.plan == RecomputePlan(((8, 14),))
    assert not sel.fallbacks


def test_a_plan_that_matched_by_luck_is_not_chosen(tmp_path):
    # observed 100 on every sample for both plans; the flip model predicts the 4-layer plan flips tokens
    data = make_profile(frontier=[([], 0, 90.0)])
    data["configs"] = [
        {"plan": [[26, 30]], "layers_recomputed": 4, "quality": 100.0, "quality_bound": 85.0},
        {"plan": [[24, 30]], "layers_recomputed": 6, "quality": 100.0, "quality_bound": 99.9},
        {"plan": [], "layers_recomputed": 0, "quality": 100.0, "quality_bound": 40.0},
    ]
    from kvrelay.model import profile_file as pf

    data["frontier"] = pf.pareto_frontier(data["configs"])
    write(tmp_path, data)
    c = Selector(tmp_path, "tiny").choose("base", "code", FP, FP, context_tokens=1024, queued=3)
    assert c.plan == RecomputePlan(((24, 30),)) and c.expected_quality == 99.9


def test_no_plan_meeting_target_falls_back(profiles):
    sel = Selector(profiles, "tiny", quality_target=0.0)
    c = sel.choose("base", "code", FP, FP, context_tokens=1024)
    assert c.plan is None and "quality target" in c.reason and c.cause == "no plan meets the quality target"
    assert sel.fallbacks["no plan meets the quality target"] == 1


def test_no_profile_fallback_is_logged_and_counted(profiles, caplog):
    sel = Selector(profiles, "tiny")
    with caplog.at_level(logging.DEBUG, logger="kvrelay.serving.selector"):
        c = sel.choose("code", "legal", FP, FP, context_tokens=100)
        sel.choose("code", "legal", FP, FP, context_tokens=100)
    assert c == Choice(None, c.reason, None, None, "no profile")
    assert c.reason.startswith("no profile for code->legal")
    assert sel.fallbacks["no profile"] == 2
    warnings = [r for r in caplog.records if r.name == "kvrelay.serving.selector" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "code->legal" in warnings[0].getMessage()  # once per pair and reason


def test_fingerprint_mismatch_fallback(profiles):
    sel = Selector(profiles, "tiny")
    c = sel.choose("base", "code", FP, "other-fp", context_tokens=1024, queued=1)
    assert c.plan is None and c.reason.startswith("fingerprint mismatch") and "receiver" in c.reason
    assert sel.fallbacks["fingerprint mismatch"] == 1


def test_malformed_profile_fallback(tmp_path):
    path = tmp_path / "tiny" / "base__code.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"format": 1}')
    sel = Selector(tmp_path, "tiny")
    c = sel.choose("base", "code", FP, FP, context_tokens=1024)
    assert c.plan is None and c.reason.startswith("malformed profile") and "lacks field" in c.reason
    assert sel.fallbacks == {"malformed profile": 1}


def test_profiles_are_cached_until_reload(profiles):
    sel = Selector(profiles, "tiny")
    assert sel.choose("base", "code", FP, FP, context_tokens=1024, queued=1).plan is not None
    (profiles / "tiny" / "base__code.json").unlink()
    assert sel.choose("base", "code", FP, FP, context_tokens=1024, queued=1).plan is not None  # cached
    sel.reload()
    assert sel.choose("base", "code", FP, FP, context_tokens=1024, queued=1).plan is None


def test_latency_model_from_bench():
    lat = LatencyModel.from_bench(BENCH)
    assert lat.predict(1024, 30) == pytest.approx(3.0, rel=0.15)
    assert lat.predict(1024, 3) == pytest.approx(0.5, rel=0.3)
    assert lat.predict(1024, 8) < lat.predict(1024, 15) < lat.predict(1024, 30)
    assert lat.predict(1024, 8) < lat.predict(1536, 8) < lat.predict(2048, 8) < lat.predict(4096, 8)
    assert lat.predict(4096, 8) == pytest.approx(2 * lat.predict(2048, 8))
    with pytest.raises(KvRelayError, match="bench prefill"):
        LatencyModel.from_bench({"full_s": {}})
    with pytest.raises(KvRelayError):
        Selector("x", "tiny", quality_target=1.5)


def test_a_profile_scored_on_other_weights_is_used_but_counted_and_logged_once(tmp_path, caplog):
    write(tmp_path, {**make_profile(), "sender_weights": "aaa", "receiver_weights": "bbb"})
    sel = Selector(tmp_path, "tiny")
    with caplog.at_level(logging.WARNING, logger="kvrelay.serving.selector"):
        same = sel.choose("base", "code", FP, FP, context_tokens=1024, weights=("aaa", "bbb"))
        other = [sel.choose("base", "code", FP, FP, context_tokens=1024, weights=("aaa", "ccc")) for _ in range(3)]
    assert same.plan is not None and all(c.plan == same.plan for c in other)
    assert sel.fallbacks["profile scored on other weights"] == 3
    assert sum("scored on other weights" in r.message for r in caplog.records) == 1


def test_a_profile_verified_on_the_served_weights_counts_as_matching(tmp_path):
    write(
        tmp_path,
        {
            **make_profile(),
            "sender_weights": "aaa",
            "receiver_weights": "bbb",
            "verified_on": [{"sender_weights": "aaa", "receiver_weights": "ccc"}],
        },
    )
    sel = Selector(tmp_path, "tiny")
    sel.choose("base", "code", FP, FP, context_tokens=1024, weights=("aaa", "ccc"))
    assert sel.fallbacks["profile scored on other weights"] == 0
    sel.choose("base", "code", FP, FP, context_tokens=1024, weights=("aaa", "ddd"))
    assert sel.fallbacks["profile scored on other weights"] == 1


def test_a_profile_without_digests_counts_as_unknown_weights(profiles):
    sel = Selector(profiles, "tiny")
    assert sel.choose("base", "code", FP, FP, context_tokens=1024, weights=("a", "b")).plan is not None
    assert sel.fallbacks["profile without weights digests"] == 1
