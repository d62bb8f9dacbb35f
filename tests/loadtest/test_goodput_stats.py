"""The goodput arithmetic: the knee, goodput at an SLO, agreement, per-point statistics."""

import pytest

from kvrelay.loadtest import goodput_stats as gs


def test_the_knee_of_a_flat_then_steep_curve_is_where_it_bends():
    pts = [(0.0, 1.0), (0.1, 1.1), (0.2, 1.3), (0.3, 3.0), (0.4, 9.0)]
    assert gs.knee(pts) == 3  # furthest below the chord (scaled): 0.75 - 0.25


def test_a_curve_that_never_bends_has_its_knee_at_the_end():
    assert gs.knee([(0.0, 1.0), (0.1, 2.0), (0.2, 3.0)]) == 2
    assert gs.knee([(0.0, 1.0), (0.1, 5.0)]) == 1


def test_goodput_interpolates_between_the_last_point_meeting_the_slo_and_the_next():
    assert gs.goodput([(0.0, 1.0), (0.1, 2.0), (0.2, 4.0)], 3.0) == {"rps": pytest.approx(0.15), "lower_bound": False}


def test_goodput_never_met_is_zero_and_always_met_is_a_lower_bound():
    assert gs.goodput([(0.0, 5.0), (0.1, 6.0)], 3.0) == {"rps": 0.0, "lower_bound": False}
    assert gs.goodput([(0.0, 1.0), (0.1, 2.0)], 3.0) == {"rps": 0.1, "lower_bound": True}


def test_a_noisy_miss_below_a_point_that_meets_the_slo_does_not_end_the_search():
    assert gs.goodput([(0.0, 3.2), (0.1, 2.5), (0.2, 2.9), (0.3, 5.0)], 3.0)["rps"] == pytest.approx(
        0.2 + 0.1 * 0.1 / 2.1, abs=1e-5
    )


def rec(ctx, text, route="reuse", ok=True, ttft=1.0, lat=2.0, n=5):
    return {
        "context_id": ctx,
        "text": text,
        "route": route,
        "route_reason": "x",
        "ok": ok,
        "ttft_s": ttft,
        "latency_s": lat,
        "output_tokens": n,
        "recomputed_layers": 2,
        "error": None if ok else "boom",
    }


def test_point_stats_and_agreement_with_full_prefill_text():
    recs = [rec(0, "a"), rec(1, "b"), rec(1, "different"), rec(0, "", ok=False)]
    p = gs.point_stats(recs, 0.5, 6.0, reference={0: "a", 1: "b"})
    assert (p["requests"], p["ok"], p["errors"]) == (4, 3, 1)
    assert p["achieved_rps"] == pytest.approx(0.5)
    assert p["agreement"] == {"compared": 3, "exact": 2, "rate": pytest.approx(0.6667)}
    assert p["tbt_s"]["p50"] == pytest.approx(0.25) and p["ttft_s"]["p90"] == pytest.approx(1.0)


def test_the_slo_comes_from_full_prefills_knee():
    full = {
        "idle": {"ttft_s": {"p90": 1.0}},
        "points": [
            {"offered_rps": 0.1, "ttft_s": {"p90": 1.1}},
            {"offered_rps": 0.2, "ttft_s": {"p90": 1.4}},
            {"offered_rps": 0.3, "ttft_s": {"p90": 6.0}},
        ],
    }
    slo = gs.slo_from_full(full)
    assert slo["ttft_s"] == 1.4 and slo["knee_rps"] == 0.2


def test_the_envelope_makes_latency_non_decreasing_in_load_and_the_knee_reads_it():
    measured = [(0.0, 14.2), (0.024, 22.8), (0.045, 21.1), (0.065, 66.0), (0.086, 24.7)]  # a smol run's full curve
    env = gs.envelope(measured)
    assert [y for _, y in env] == [14.2, 22.8, 22.8, 66.0, 66.0]
    assert gs.knee(env) == 2 and gs.goodput(env, 22.8) == {"rps": 0.045, "lower_bound": False}
    assert gs.envelope([(0.0, 1.0), (0.1, None), (0.2, 0.5)]) == [(0.0, 1.0), (0.1, None), (0.2, 1.0)]


def test_a_point_the_server_did_not_keep_up_with_does_not_meet_the_slo():
    mode = {
        "idle": {"ttft_s": {"p90": 1.0}},
        "points": [
            {"offered_rps": 0.2, "achieved_rps": 0.2, "ttft_s": {"p90": 2.0}},
            {"offered_rps": 0.3, "achieved_rps": 0.3, "ttft_s": {"p90": 2.5}},
            {"offered_rps": 0.5, "achieved_rps": 0.29, "ttft_s": {"p90": 8.0}},
        ],
    }  # saturated: 10 requests end early
    assert gs.kept_up(mode) == [True, True, True, False]
    pts = gs.envelope(gs.curve(mode))
    assert gs.goodput(pts, 20.0, gs.kept_up(mode)) == {"rps": 0.3, "lower_bound": False}
    assert gs.goodput(pts, 20.0) == {"rps": 0.5, "lower_bound": True}  # what the latency alone would claim


def _recs(starts, latency):
    return [
        {
            "ok": True,
            "start_s": s,
            "latency_s": latency,
            "ttft_s": 1.0,
            "output_tokens": 2,
            "route": "full",
            "route_reason": "miss",
            "context_id": 0,
            "text": "x",
        }
        for s in starts
    ]


def test_keeping_up_is_judged_on_the_points_own_arrivals_not_the_nominal_rate():
    # the base->code run's full prefill at a nominal 0.044 req/s: the Poisson draw sent 9 requests
    # over ~300 s (0.027/s), every one answered in turn; achieved/offered (0.029/0.044) called that
    # falling behind and put the SLO's goodput at the rate below
    calm = gs.point_stats(_recs([i * 37.0 for i in range(9)], 14.0), 0.0444, 343.0)
    assert calm["arrival_rps"] == pytest.approx(1 / 37.0, rel=1e-3) and calm["completion_rps"] == calm["arrival_rps"]
    assert calm["achieved_rps"] < 0.85 * calm["offered_rps"]
    # saturated: arrivals every 2 s, but the server finishes one request every 14 s
    busy = [{**r, "latency_s": 14.0 * (i + 1) - 2.0 * i} for i, r in enumerate(_recs([i * 2.0 for i in range(10)], 0))]
    sat = gs.point_stats(busy, 0.5, 140.0)
    assert sat["completion_rps"] == pytest.approx(1 / 14.0, rel=1e-3) and sat["arrival_rps"] == pytest.approx(0.5)
    mode = {"idle": {"ttft_s": {"p90": 1.0}}, "points": [calm, sat]}
    assert gs.kept_up(mode) == [True, True, False]
