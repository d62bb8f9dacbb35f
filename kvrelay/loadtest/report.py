"""Load-test figures from per-request records: per mode, the on/off ratio, quality agreement.

A record is a dict (see users.record): index, model, context_id, ok, error, start_s, latency_s,
ttft_s (streaming only), output_tokens, route (full | reuse | restore), route_reason, donor,
reused_layers, recomputed_layers, reused_tokens, text.

Definitions:
  requests_per_s         successful requests / measured window (first request sent -> last answer)
  output_tokens_per_s    output tokens of successful requests / the same window
  ttft_ms p50/p95/p99    client-side time to first token (streaming requests only)
  latency_ms p50/p95     client-side end-to-end latency
  reuse_rate             fraction of successful requests whose context KV came from the store
                         (route reuse: another variant's KV + recompute; restore: own pages)
  mean_layers_recomputed mean kv_recomputed_layers over reuse-routed requests (None if none)
  throughput_ratio       requests_per_s(sharing on) / requests_per_s(sharing off)
Percentiles interpolate linearly between closest ranks (numpy's default).
No Locust, torch or matplotlib import at module level.
"""

from __future__ import annotations

import json
import math
import random
import sys
from collections import Counter

from kvrelay.profiler.scores import token_f1

MODES = ("off", "on")
MODE_LABEL = {"off": "sharing off", "on": "sharing on"}
SUMMARY_KEYS = (
    "requests",
    "ok",
    "errors",
    "window_s",
    "requests_per_s",
    "output_tokens_per_s",
    "ttft_ms",
    "latency_ms",
    "reuse_rate",
    "mean_layers_recomputed",
    "routes",
)


def log(msg: str) -> None:
    """Progress of a load test, on stderr (stdout is the result)."""
    print(f"kvrelay: {msg}", file=sys.stderr, flush=True)


def percentile(values, p: float) -> float | None:
    """p in [0, 100]; None for no values."""
    xs = sorted(float(v) for v in values if v is not None)
    if not xs:
        return None
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _ms(x):
    return None if x is None else round(x * 1000.0, 1)


def summarize(records: list[dict], window_s: float) -> dict:
    ok = [r for r in records if r.get("ok")]
    window = max(float(window_s), 1e-9)
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    lat = [r["latency_s"] for r in ok]
    routes = Counter(r.get("route") or "?" for r in ok)
    reasons = Counter(f"{r.get('route') or '?'}: {r.get('route_reason') or ''}".rstrip(": ") for r in ok)
    reused = [r for r in ok if r.get("route") == "reuse"]
    from_store = sum(1 for r in ok if r.get("route") in ("reuse", "restore"))
    # exact lower-layer sharing inside one engine (lora = "unmerged"): a full-prefill route whose
    # lowest layers came from another model's blocks
    # (a `prefix` route's reused tokens are the model's own cached blocks)
    shared = sum(1 for r in ok if r.get("route") == "full" and r.get("reused_tokens"))
    errors = Counter((r.get("error") or "?")[:200] for r in records if not r.get("ok"))
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "window_s": round(window, 3),
        "requests_per_s": round(len(ok) / window, 4),
        "output_tokens_per_s": round(sum(r.get("output_tokens") or 0 for r in ok) / window, 3),
        "ttft_ms": {
            "p50": _ms(percentile(ttft, 50)),
            "p95": _ms(percentile(ttft, 95)),
            "p99": _ms(percentile(ttft, 99)),
            "n": len(ttft),
        },
        "latency_ms": {
            "p50": _ms(percentile(lat, 50)),
            "p95": _ms(percentile(lat, 95)),
            "mean": _ms(sum(lat) / len(lat)) if lat else None,
        },
        "reuse_rate": round(from_store / len(ok), 4) if ok else 0.0,
        "shared_lower_layers_rate": round(shared / len(ok), 4) if ok else 0.0,
        "mean_layers_recomputed": round(sum(r.get("recomputed_layers") or 0 for r in reused) / len(reused), 3)
        if reused
        else None,
        "mean_reused_tokens": round(sum(r.get("reused_tokens") or 0 for r in reused) / len(reused), 1)
        if reused
        else None,
        "routes": dict(sorted(routes.items())),
        "route_reasons": dict(sorted(reasons.items())),
        "error_messages": dict(errors.most_common(5)),
    }


def quality(off: list[dict], on: list[dict], sample: int | None = 64, seed: int = 0) -> dict:
    """Agreement of sharing-on outputs with sharing-off outputs for the same requests (same context,
    question, variant, greedy decoding; sharing off is the receiver's own full prefill or an exact
    prefix hit of it). Scored on the requests that sharing on served by cross-model reuse (the only
    ones whose KV differs), a seeded sample of at most `sample`; exact-match rate and token F1 (x100).
    `all_requests` gives the same over every request both runs answered (a consistency check:
    outputs not served by reuse should agree exactly)."""
    a = {r["index"]: r for r in off if r.get("ok")}
    pairs = [(a[r["index"]], r) for r in on if r.get("ok") and r["index"] in a]

    def score(ps):
        if not ps:
            return {"compared": 0, "exact_match": None, "token_f1": None}
        em = sum(1 for x, y in ps if x.get("text", "") == y.get("text", ""))
        f1 = sum(token_f1(y.get("text", ""), x.get("text", "")) for x, y in ps)
        return {
            "compared": len(ps),
            "exact_match": round(100.0 * em / len(ps), 2),
            "token_f1": round(100.0 * f1 / len(ps), 2),
        }

    reuse = [p for p in pairs if p[1].get("route") == "reuse"]
    if sample is not None and len(reuse) > sample:
        reuse = sorted(random.Random(f"kvrelay-quality:{seed}").sample(reuse, sample), key=lambda p: p[1]["index"])
    out = {
        "scope": "requests served by cross-model reuse with sharing on, vs. the same request with sharing off",
        **score(reuse),
        "sample_limit": sample,
        "all_requests": score(pairs),
    }
    examples = [
        {
            "index": y["index"],
            "model": y.get("model"),
            "donor": y.get("donor"),
            "off": x.get("text", "")[:120],
            "on": y.get("text", "")[:120],
        }
        for x, y in reuse
        if x.get("text") != y.get("text")
    ][:3]
    if examples:
        out["differing_examples"] = examples
    return out


def cross_model(off: list[dict], on: list[dict]) -> dict:
    """The requests sharing can speed up: those that sharing off served by a full prefill although
    another variant's KV for their context was in the store (route reason "sharing off"), paired
    with the same requests under sharing on. Median TTFT and latency in both modes."""
    a = {r["index"]: r for r in on if r.get("ok")}
    pairs = [
        (x, a[x["index"]]) for x in off if x.get("ok") and x.get("route_reason") == "sharing off" and x["index"] in a
    ]

    def med(rs, k):
        v = percentile([r.get(k) for r in rs], 50)
        return _ms(v)

    xs, ys = [p[0] for p in pairs], [p[1] for p in pairs]
    return {
        "requests": len(pairs),
        "served_by_reuse_with_sharing_on": sum(1 for y in ys if y.get("route") == "reuse"),
        "ttft_p50_ms": {"off": med(xs, "ttft_s"), "on": med(ys, "ttft_s")},
        "latency_p50_ms": {"off": med(xs, "latency_s"), "on": med(ys, "latency_s")},
    }


def compare(modes: dict[str, dict]) -> dict:
    """Cross-mode figures from per-mode summaries (keys "off", "on")."""
    off, on = modes.get("off"), modes.get("on")
    if not off or not on:
        return {"throughput_ratio": None}
    t_off, t_on = off["ttft_ms"]["p50"], on["ttft_ms"]["p50"]
    return {
        "throughput_ratio": _r(ratio(on["requests_per_s"], off["requests_per_s"])),
        "output_tokens_ratio": _r(ratio(on["output_tokens_per_s"], off["output_tokens_per_s"])),
        "ttft_p50_speedup": _r(ratio(t_off, t_on)),
        "latency_p50_speedup": _r(ratio(off["latency_ms"]["p50"], on["latency_ms"]["p50"])),
    }


def _r(x):
    return None if x is None else round(x, 3)


# --- rendering ----------------------------------------------------------------------------------


def _f(x, digits=1):
    if x is None:
        return "-"
    return f"{x:.{digits}f}"


def table(summary: dict) -> str:
    """Markdown table of both modes (what docs/loadtest.md shows)."""
    rows = [
        (
            "mode",
            "req/s",
            "out tok/s",
            "TTFT p50 ms",
            "TTFT p95 ms",
            "TTFT p99 ms",
            "latency p50 ms",
            "latency p95 ms",
            "errors",
            "reuse rate",
            "layers recomputed",
        )
    ]
    for m in MODES:
        s = summary["modes"].get(m)
        if not s:
            continue
        rows.append(
            (
                MODE_LABEL[m],
                _f(s["requests_per_s"], 3),
                _f(s["output_tokens_per_s"], 1),
                _f(s["ttft_ms"]["p50"], 0),
                _f(s["ttft_ms"]["p95"], 0),
                _f(s["ttft_ms"]["p99"], 0),
                _f(s["latency_ms"]["p50"], 0),
                _f(s["latency_ms"]["p95"], 0),
                str(s["errors"]),
                f"{100 * s['reuse_rate']:.0f}%",
                _f(s["mean_layers_recomputed"], 2),
            )
        )
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "|".join(" --- " for _ in rows[0]) + "|")
    return "\n".join(lines)


def text_report(summary: dict) -> str:
    c, q = summary.get("comparison", {}), summary.get("quality") or {}
    out = [table(summary), ""]
    out.append(
        f"throughput ratio (on/off requests/s): {_f(c.get('throughput_ratio'), 3)}   "
        f"TTFT p50 speed-up: {_f(c.get('ttft_p50_speedup'), 2)}x"
    )
    w = summary.get("workload", {})
    if w.get("full_prefill_ceiling"):
        out.append(
            f"workload ceiling: {w['distinct_context_model_pairs']} context-model pairs over "
            f"{w['distinct_contexts_requested']} contexts, {w['repeat_requests']} repeats: sharing can cut full "
            f"prefills at most {_f(w['full_prefill_ceiling'], 2)}x (decode and re-prefill not counted)"
        )
    if q:
        out.append(
            f"quality vs. full prefill on {q.get('compared', 0)} reuse-served requests: exact match "
            f"{_f(q.get('exact_match'))}%, token F1 {_f(q.get('token_f1'))}   "
            f"(all {q['all_requests']['compared']} requests: exact match {_f(q['all_requests']['exact_match'])}%)"
        )
    x = summary.get("cross_model")
    if x and x["requests"]:
        out.append(
            f"cross-model requests ({x['requests']} that sharing off prefilled although another variant's KV was "
            f"stored): TTFT p50 {_f(x['ttft_p50_ms']['off'], 0)} -> {_f(x['ttft_p50_ms']['on'], 0)} ms, latency p50 "
            f"{_f(x['latency_p50_ms']['off'], 0)} -> {_f(x['latency_p50_ms']['on'], 0)} ms"
        )
    for m in MODES:
        s = summary["modes"].get(m)
        if s:
            out.append(f"routes, {MODE_LABEL[m]}: " + ", ".join(f"{k} {v}" for k, v in s["route_reasons"].items()))
    for w in summary.get("warnings", []):
        out.append(f"warning: {w}")
    if summary.get("out_dir"):
        out.append(f"results: {summary['out_dir']}")
    return "\n".join(out)


def write_json(summary: dict, path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")


def timeline(records: list[dict], t0: float, bin_s: float) -> tuple[list[float], list[float]]:
    """Completions per second in bins of bin_s seconds from t0 (successful requests)."""
    ends = [r["start_s"] + r["latency_s"] - t0 for r in records if r.get("ok")]
    if not ends:
        return [], []
    n = int(max(ends) // bin_s) + 1
    counts = [0] * n
    for e in ends:
        counts[max(0, int(e // bin_s))] += 1
    return [(i + 0.5) * bin_s for i in range(n)], [c / bin_s for c in counts]


def plot(summary: dict, records: dict[str, list[dict]], path) -> str | None:
    """PNG: requests/s and output tokens/s per mode, TTFT percentiles per mode, throughput over time.
    None (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    modes = [m for m in MODES if m in summary["modes"]]
    colors = {"off": "#7f7f7f", "on": "#1f77b4"}
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    s = summary["modes"]
    x = range(len(modes))
    ax[0].bar(x, [s[m]["requests_per_s"] for m in modes], color=[colors[m] for m in modes])
    ax[0].set_xticks(list(x), [MODE_LABEL[m] for m in modes])
    ax[0].set_ylabel("requests / s")
    tw = ax[0].twinx()
    tw.plot(list(x), [s[m]["output_tokens_per_s"] for m in modes], "o--", color="#d62728")
    tw.set_ylabel("output tokens / s", color="#d62728")
    ratio_ = summary.get("comparison", {}).get("throughput_ratio")
    ax[0].set_title(f"throughput (on/off = {_f(ratio_, 2)})")
    pcts = ("p50", "p95", "p99")
    w = 0.38
    for i, m in enumerate(modes):
        vals = [s[m]["ttft_ms"][p] or 0 for p in pcts]
        ax[1].bar([j + (i - 0.5) * w for j in range(len(pcts))], vals, w, label=MODE_LABEL[m], color=colors[m])
    ax[1].set_xticks(range(len(pcts)), [f"TTFT {p}" for p in pcts])
    ax[1].set_ylabel("ms")
    ax[1].legend()
    ax[1].set_title("time to first token")
    for m in modes:
        recs = records.get(m) or []
        if not recs:
            continue
        t0 = min(r["start_s"] for r in recs)
        span = max(r["start_s"] + r["latency_s"] for r in recs) - t0
        xs, ys = timeline(recs, t0, max(1.0, span / 20))
        ax[2].plot(xs, ys, "-o", ms=3, label=MODE_LABEL[m], color=colors[m])
    ax[2].set_xlabel("s since first request")
    ax[2].set_ylabel("completed requests / s")
    if ax[2].get_lines():
        ax[2].legend()
    ax[2].set_title("throughput over time")
    fam = summary.get("deployment", {}).get("family", "")
    fig.suptitle(f"kvrelay load test, family {fam}: sharing off vs. on")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
