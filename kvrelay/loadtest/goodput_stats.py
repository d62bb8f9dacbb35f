"""Goodput figures from per-request records: one sweep point, the SLO knee, goodput, agreement.

Definitions (the goodput scenario, DroidSpeak section 5.1 / Fig 15):
  point        one Poisson rate, offered to one mode for a bounded number of requests and time
  TTFT         client-side time to the first streamed token; TBT the mean gap between later tokens of
               a request ((E2E - TTFT) / (output tokens - 1)); E2E the whole request
  envelope     p90 latency against offered rate, made non-decreasing (each point at the max of itself
               and every lower rate): a lower p90 at a higher rate is the noise of a short point
  knee         of full prefill's p90 TTFT envelope against offered rate, by Kneedle (Satopaa et al.
               2011): both axes scaled to [0, 1] over the sweep (the idle point at rate 0 included),
               the knee is the point furthest below the diagonal (max of x - y)
  SLO          p90 TTFT at that knee (or given). A point meets it when its p90 TTFT (envelope) does
               and the server kept up (its completion rate >= 0.85 x the point's arrival rate, both
               (n - 1) / span of the point's own events: a short point offered more than the server
               takes ends before its queue shows in the latency. Measured, not nominal: a Poisson
               draw of 9 arrivals where 13 were expected is not the server falling behind, nor is
               the drain of the last request after the arrivals stop); goodput = the
               highest offered rate that meets it, interpolated linearly towards the next point when
               that one misses on latency; a sweep whose highest rate still meets it gives that
               rate, marked lower_bound
No Locust, torch or matplotlib at import.
"""

from __future__ import annotations

from collections import Counter

from kvrelay.loadtest.report import percentile

PERCENTILES = (50, 90, 99)


def _pcts(values) -> dict:
    return {f"p{p}": (None if (v := percentile(values, p)) is None else round(v, 4)) for p in PERCENTILES}


def tbt_s(rec: dict) -> float | None:
    n = rec.get("output_tokens") or 0
    if rec.get("ttft_s") is None or n < 2:
        return None
    return (rec["latency_s"] - rec["ttft_s"]) / (n - 1)


def point_stats(records: list[dict], offered_rps: float, window_s: float, reference: dict | None = None) -> dict:
    """One sweep point. reference: context_id -> full prefill's text (greedy) for the agreement."""
    ok = [r for r in records if r.get("ok")]
    routes = Counter(f"{r.get('route')}: {r.get('route_reason')}".rstrip(": ") for r in ok)
    errors = Counter((r.get("error") or "?")[:200] for r in records if not r.get("ok"))
    out = {
        "offered_rps": round(offered_rps, 5),
        "achieved_rps": round(len(ok) / window_s, 5) if window_s > 0 else 0.0,
        **event_rates(records),
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_messages": dict(errors.most_common(3)),
        "window_s": round(window_s, 2),
        "ttft_s": _pcts([r["ttft_s"] for r in ok]),
        "tbt_s": _pcts([tbt_s(r) for r in ok]),
        "e2e_s": _pcts([r["latency_s"] for r in ok]),
        "routes": dict(sorted(routes.items())),
        "mean_layers_recomputed": round(sum(r.get("recomputed_layers") or 0 for r in ok) / len(ok), 3) if ok else None,
    }
    if reference is not None:
        out["agreement"] = agreement(ok, reference)
    return out


def rate_of(times: list[float]) -> float | None:
    """(n - 1) / span of n event times: a Poisson rate estimated from the events themselves."""
    if len(times) < 2:
        return None
    span = max(times) - min(times)
    return round((len(times) - 1) / span, 5) if span > 0 else None


def event_rates(records: list[dict]) -> dict:
    """The point's measured arrival rate (request starts) and completion rate (successful ends)."""
    return {
        "arrival_rps": rate_of([r["start_s"] for r in records if r.get("start_s") is not None]),
        "completion_rps": rate_of(
            [r["start_s"] + r["latency_s"] for r in records if r.get("ok") and r.get("start_s") is not None]
        ),
    }


def _kept_up(p: dict) -> bool:
    if p.get("arrival_rps") and p.get("completion_rps") is not None:
        return p["completion_rps"] >= KEPT_UP * p["arrival_rps"]
    return p["achieved_rps"] >= KEPT_UP * p["offered_rps"]  # points measured before the event rates


def agreement(records: list[dict], reference: dict) -> dict:
    """Of the requests served from another model's KV, how many gave exactly full prefill's text."""
    served = [r for r in records if r.get("route") == "reuse" and r["context_id"] in reference]
    same = sum(1 for r in served if r["text"] == reference[r["context_id"]])
    return {"compared": len(served), "exact": same, "rate": round(same / len(served), 4) if served else None}


def knee(points: list[tuple[float, float]]) -> int:
    """Index of the Kneedle knee of an increasing convex curve given as (x, y) points sorted by x;
    the last index when the curve never bends (no point lies below the chord)."""
    if len(points) < 3:
        return len(points) - 1
    (x0, _), (x1, _) = points[0], points[-1]
    y0, y1 = min(y for _, y in points), max(y for _, y in points)
    if x1 <= x0 or y1 <= y0:
        return len(points) - 1
    diffs = [(x - x0) / (x1 - x0) - (y - y0) / (y1 - y0) for x, y in points]
    best = max(range(len(points)), key=lambda i: diffs[i])
    return best if diffs[best] > 0 else len(points) - 1


def goodput(points: list[tuple[float, float | None]], slo_s: float, kept_up: list[bool] | None = None) -> dict:
    """points: (offered rate, p90 TTFT) sorted by rate, the idle point (0, idle TTFT) first; kept_up:
    per point, whether the server kept up with it (KEPT_UP). A point meets the SLO when its p90 TTFT
    does and the server kept up: a short point offered more than the server can take ends before its
    queue shows in the latency. Goodput is the highest rate that meets it; when the next point misses
    on latency, interpolated linearly towards it."""
    kept_up = kept_up or [True] * len(points)
    met = [i for i, ((_, y), k) in enumerate(zip(points, kept_up)) if y is not None and y <= slo_s and k]
    if not met:
        return {"rps": 0.0, "lower_bound": False}
    i = met[-1]
    xa, ya = points[i]
    if i == len(points) - 1:
        return {"rps": round(xa, 5), "lower_bound": True}
    x, y = points[i + 1]
    if y is None or y <= slo_s or y <= ya:  # the next point misses by not keeping up: no interpolation
        return {"rps": round(xa, 5), "lower_bound": False}
    return {"rps": round(xa + (x - xa) * (slo_s - ya) / (y - ya), 5), "lower_bound": False}


KEPT_UP = 0.85  # completion / arrival rate at which a point counts as served, not cut short


def kept_up(mode: dict) -> list[bool]:
    """Aligned with curve(mode): the idle point, then the sweep points by rate."""
    pts = sorted(mode["points"], key=lambda p: p["offered_rps"])
    return ([True] if mode.get("idle") else []) + [_kept_up(p) for p in pts]


def curve(mode: dict, key: str = "ttft_s", pct: str = "p90") -> list[tuple[float, float | None]]:
    """A mode's (rate, latency) curve as measured: the idle point, then its sweep points by rate."""
    pts = [(0.0, mode["idle"][key][pct])] if mode.get("idle") else []
    return pts + sorted((p["offered_rps"], p[key][pct]) for p in mode["points"])


def envelope(points: list[tuple[float, float | None]]) -> list[tuple[float, float | None]]:
    """Latency does not fall as load rises: a point's p90 below that of a lower rate is the noise of
    a short Poisson point (a calmer draw). Each point is taken at the max of itself and every lower
    rate, which can only lower a goodput, and does so alike for every mode. A point with no answer
    stays None (it misses any SLO)."""
    out, top = [], None
    for x, y in points:
        if y is None:
            out.append((x, None))
            continue
        top = y if top is None else max(top, y)
        out.append((x, top))
    return out


def slo_from_full(full: dict) -> dict:
    pts = [(x, y) for x, y in envelope(curve(full)) if y is not None]
    if not pts:
        return {"ttft_s": None, "how": "full prefill answered nothing"}
    i = knee(pts)
    return {
        "ttft_s": round(pts[i][1], 4),
        "knee_rps": pts[i][0],
        "how": "Kneedle knee of full prefill's p90 TTFT vs offered rate (idle point included, non-decreasing envelope)",
    }


def plot_pair(title: str, modes: dict, slo_s: float | None, path) -> str:
    """Fig 15 of the paper: p90 TTFT, TBT and E2E against request rate, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {
        "full": ("full prefill (no sharing)", "tab:red"),
        "plan": ("DroidSpeak plan", "tab:blue"),
        "reuse": ("full reuse (reference)", "tab:gray"),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in zip(axes, ("ttft_s", "tbt_s", "e2e_s"), ("TTFT p90 (s)", "TBT p90 (s)", "E2E p90 (s)")):
        for m, data in modes.items():
            pts = [(x, y) for x, y in curve(data, key) if y is not None]
            if pts:
                name, color = style.get(m, (m, None))
                ax.plot(*zip(*pts), marker="o", label=name, color=color, linestyle="--" if m == "reuse" else "-")
        if key == "ttft_s" and slo_s:
            ax.axhline(slo_s, color="black", linestyle=":", label=f"SLO {slo_s:.1f}s")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
