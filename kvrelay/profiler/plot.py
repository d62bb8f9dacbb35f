"""`kvrelay profile plot`: quality vs. layers recomputed for every scored config, frontier and baselines."""

from __future__ import annotations

from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.model import profile_file
from kvrelay.profiler import target as tg


def default_png(profile_path: str | Path) -> Path:
    p = Path(profile_path)
    return p.with_suffix(".png")


def plot(profile_path: str | Path, out: str | Path | None = None) -> Path:
    try:
        import matplotlib
    except ImportError:
        raise KvRelayError("plotting needs matplotlib: pip install 'kvrelay[loadtest]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = profile_file.load(profile_path)
    d = prof.data
    out = Path(out) if out else default_png(profile_path)
    if prof.teacher_forced:
        return _plot_tf(plt, d, out)
    has_kl = all("kl" in c for c in d["configs"])
    fig, axes = plt.subplots(
        1,
        2 if has_kl else 1,
        figsize=(12.5 if has_kl else 7.5, 4.8),
        dpi=110,
        gridspec_kw={"width_ratios": [3, 2]} if has_kl else None,
    )
    bounded = _quality_panel(axes[0] if has_kl else axes, d)
    if has_kl:
        _kl_panel(axes[1], d, bounded)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def _quality_panel(ax, d: dict) -> bool:
    """Quality against layers recomputed: every scored config (and its flip-model bound when the profile
    has one), the Pareto frontier, the baselines and the 1% target. True when configs carry a bound."""
    L = d["num_layers"]
    xs = [c["layers_recomputed"] for c in d["configs"]]
    ys = [c["quality"] for c in d["configs"]]
    ax.scatter(xs, ys, s=14, color="0.6", label=f"scored configs ({len(xs)}): observed", zorder=2)
    bounded = all("quality_bound" in c for c in d["configs"])
    if bounded:  # what the frontier and the selector go by (kvrelay.profiler.flips)
        ax.scatter(
            xs,
            [c["quality_bound"] for c in d["configs"]],
            s=16,
            marker="x",
            color="tab:orange",
            label="flip-model bound (selection)",
            zorder=2,
        )
        ys = ys + [c["quality_bound"] for c in d["configs"]]
    fx = [f["layers_recomputed"] for f in d["frontier"]]
    fy = [f["quality"] for f in d["frontier"]]
    ax.plot(fx, fy, "-o", color="tab:red", ms=5, lw=1.6, label="Pareto frontier", zorder=3)
    for f in d["frontier"]:
        ax.annotate(
            str(profile_file.plan_of(f)),
            (f["layers_recomputed"], f["quality"]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
            color="tab:red",
        )
    b = d["baselines"]
    _baseline_lines(ax, b, L)
    ax.set_xlabel(f"layers recomputed (of {L})")
    ax.set_ylabel(f"quality: {d['metric']['name']} with {d['receiver']}'s full prefill (0-100)")
    ds = d["dataset"]
    ax.set_title(
        f"{d['family']}: {d['sender']} -> {d['receiver']}  ({ds['samples']} {ds['kind']} samples, "
        f"{ds.get('context_tokens_seen', ds['context_tokens'])} ctx tokens, stride {d['stride']})",
        fontsize=9,
    )
    ax.plot([L], [b["full_prefill"]["quality"]], "*", color="tab:green", ms=10, zorder=4)
    ax.set_xlim(-0.5, L + 0.5)
    lo = min(ys + [b["full_reuse"]["quality"]])
    ax.set_ylim(max(0, lo - 5), 101.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return bounded


def _baseline_lines(ax, b: dict, L: int) -> None:
    ax.axhline(
        b["full_prefill"]["quality"],
        color="tab:green",
        ls="-",
        lw=1.2,
        label=f"full prefill ({L} layers): {b['full_prefill']['quality']:.1f}",
    )
    ax.axhline(
        b["full_reuse"]["quality"],
        color="tab:blue",
        ls="--",
        lw=1.2,
        label=f"full reuse (0 layers): {b['full_reuse']['quality']:.1f}",
    )
    ax.axhline(b["full_prefill"]["quality"] * 0.99, color="tab:green", ls=":", lw=1.0, label="1% quality target")


def _kl_panel(kx, d: dict, bounded: bool) -> None:
    """The smooth view: how far each config's next-token distributions are from the full prefill (the
    top-2 logit gap's shift when configs carry a flip-model bound, else KL)."""
    L = d["num_layers"]
    xs = [c["layers_recomputed"] for c in d["configs"]]
    key = "gap_shift" if bounded else "kl"
    kx.scatter(xs, [c[key] for c in d["configs"]], s=14, color="0.6", label="scored configs")
    on = {str(f["plan"]) for f in d["frontier"]}
    fr = [c for c in d["configs"] if str(c["plan"]) in on]
    kx.plot(
        [c["layers_recomputed"] for c in fr],
        [c[key] for c in fr],
        "o",
        color="tab:red",
        ms=5,
        label="frontier configs",
    )
    if bounded:  # spans orders of magnitude: an exact plan moves the gap by fp noise only
        kx.set_yscale("log")
        kx.set_ylabel("mean |shift of the top-2 logit gap|, logits")
    else:
        kx.axhline(0.0, color="tab:green", lw=1.2, label="full prefill")
        kx.set_ylabel("mean KL(full || plan), nats")
    kx.set_xlabel(f"layers recomputed (of {L})")
    kx.set_title(f"{'gap shift' if bounded else 'next-token KL'} at positions with identical prefixes", fontsize=9)
    kx.set_xlim(-0.5, max(xs) + 1)
    kx.grid(alpha=0.3)
    kx.legend(fontsize=7, loc="upper right")


def _plot_tf(plt, d: dict, out: Path) -> Path:
    """Teacher-forced profile: retained gain and top-1 agreement (with intervals) against layers
    recomputed and against measured prefill time, plain plans beside K/V-corrected ones."""
    L = d["num_layers"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8), dpi=110)
    style = {False: ("tab:blue", "o", "plain (DroidSpeak)"), True: ("tab:orange", "s", "K/V-corrected")}
    full_s = d["baselines"]["full_prefill"].get("prefill_s")
    for corr, (color, marker, label) in style.items():
        cs = [c for c in d["configs"] if bool(c.get("kv_correction")) == corr]
        for ax, key in ((axes[0], "retained_gain"), (axes[1], "top1_agreement")):
            x = [c["layers_recomputed"] + (0.15 if corr else -0.15) for c in cs]
            y = [c[key] for c in cs]
            err = [[c[key] - c[key + "_ci"][0] for c in cs], [c[key + "_ci"][1] - c[key] for c in cs]]
            ax.errorbar(x, y, yerr=err, fmt=marker, color=color, ms=4, lw=0.8, capsize=2, label=label)
        timed = [c for c in cs if c.get("prefill_s")]
        axes[2].scatter(
            [c["prefill_s"] for c in timed],
            [c["retained_gain_ci"][0] for c in timed],
            color=color,
            marker=marker,
            s=18,
            label=label + " (lower bound)",
        )
    for ax, key, lim, name in (
        (axes[0], "retained_gain", tg.TARGET.retained_gain, "retained gain"),
        (axes[1], "top1_agreement", tg.TARGET.top1, "teacher-forced top-1 agreement"),
    ):
        ax.axhline(lim, color="tab:green", ls=":", lw=1.2, label=f"target >= {lim:.0%} (lower bound)")
        ax.axhline(1.0, color="tab:green", lw=1.0)
        ax.set_xlabel(f"layers recomputed (of {L})")
        ax.set_ylabel(name)
        ax.set_xlim(-0.8, L * 0.65)
        ys = [c[key + "_ci"][0] for c in d["configs"]]
        ax.set_ylim(max(-0.2, min(ys) - 0.05), 1.03)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fr = d.get("frontier_time") or []
    axes[2].plot(
        [f["prefill_s"] for f in fr],
        [f["quality"] / 100 for f in fr],
        "-",
        color="tab:red",
        lw=1.2,
        label="frontier (quality vs prefill time)",
    )
    if full_s:
        axes[2].axvline(full_s, color="tab:green", lw=1.2, label=f"full prefill {full_s:.2f} s")
    axes[2].axhline(tg.TARGET.retained_gain, color="tab:green", ls=":", lw=1.2)
    axes[2].set_xlabel("measured prefill seconds (context + question)")
    axes[2].set_ylabel("retained gain, lower bound")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7, loc="lower right")
    ds = d["dataset"]
    sel = d.get("selected")
    fig.suptitle(
        f"{d['family']}: {d['sender']} -> {d['receiver']}, teacher-forced on {ds['samples']} contexts "
        f"({ds['context_tokens_seen']} tokens, {ds['ref_tokens']} reference tokens each); selected: "
        f"{profile_file.plan_of(sel) if sel else 'full prefill'}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
