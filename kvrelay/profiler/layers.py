"""The per-layer picture of a pair (DroidSpeak Fig. 7): reuse one layer's KV, compute every other layer.

For every ordered (sender, receiver) pair of a family and every layer L: the receiver runs its own
full forward over a profiling context, except that layer L attends with the sender's keys and values
(the sender's k_proj / v_proj outputs at L, which RoPE then rotates at the same positions: exactly
the sender's KV cache at L). Measured against the receiver's own forward at every position:
  kl     mean KL(receiver || receiver with L reused), nats per position
  flip   % of positions whose argmax next token changes
and, as the cheap proxy one would use without this run, the relative deviation of the two models'
K and V at L (||x_s - x_r|| / ||x_r||). A layer whose reuse costs much is a critical layer.

This runs the Hugging Face reference model, not the serving engine: the engine's plans restart a
recompute group from the sender's hidden state, so it cannot express "only L reused". One sender
forward per sample per model, then per (pair, layer) the receiver's forward from layer L up (below L
it is the receiver's own, recorded once), consecutive layers batched.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import family_spec
from kvrelay.families.sources import quiet_transformers
from kvrelay.model import tokenizer as tk
from kvrelay.profiler import evaldata

SUFFIX = ".layers.json"


def _load(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return m.eval()


def _kv_hooks(model, store: dict, replace: dict | None = None):
    """Hooks on every layer's k_proj / v_proj: record outputs into store[(layer, 'k'|'v')], or, for
    rows named in replace[layer] (row indices), return the given tensor's output instead."""
    handles = []
    for layer, block in enumerate(model.model.layers):
        for kind, mod in (("k", block.self_attn.k_proj), ("v", block.self_attn.v_proj)):

            def hook(_m, _inp, out, layer=layer, kind=kind):
                if replace is None:
                    store[(layer, kind)] = out.detach()
                    return None
                rows = replace.get(layer)
                if not rows:
                    return None
                out = out.clone()
                out[rows] = replace["donor"][(layer, kind)][0].to(out.dtype)
                return out

            handles.append(mod.register_forward_hook(hook))
    return handles


def _forward(model, ids, store: dict, inputs: dict):
    """The model's own forward; records every layer's K/V projections into `store` and every layer's
    input (hidden state and keyword arguments, as HF passed them) into `inputs`."""
    import torch

    handles = _kv_hooks(model, store)

    def pre(_m, args, kwargs, layer):
        inputs[layer] = (
            args[0] if args else kwargs["hidden_states"],
            {k: v for k, v in kwargs.items() if k != "hidden_states"},
        )

    for layer, block in enumerate(model.model.layers):
        handles.append(
            block.register_forward_pre_hook(lambda m, a, k, layer=layer: pre(m, a, k, layer), with_kwargs=True)
        )
    try:
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits.float()
    finally:
        for h in handles:
            h.remove()


def _forward_from(model, inputs: dict, start: int, replace: dict):
    """Rows of the model's forward restarted at layer `start` from its own recorded input there (the
    layers below a swap are the model's own), with the rows' K/V swaps of `replace`."""
    import torch

    rows = sum(1 for k in replace if k != "donor")
    hidden, kwargs = inputs[start]
    h = hidden.expand(rows, -1, -1).contiguous()
    handles = _kv_hooks(model, {}, replace)
    try:
        with torch.no_grad():
            for block in model.model.layers[start:]:
                h = block(h, **kwargs)
            return model.lm_head(model.model.norm(h)).float()
    finally:
        for hd in handles:
            hd.remove()


def measure(
    family: str,
    samples: int = 3,
    context_tokens: tuple[int, int] = (256, 384),
    seed: int = 0,
    pairs: list[tuple[str, str]] | None = None,
    batch: int = 6,
    progress: bool = True,
) -> dict:
    """{(sender, receiver): per-layer result} for `pairs` (default: every ordered pair)."""
    import torch
    from tqdm.auto import tqdm

    fam = family_spec(family)
    if fam.synthetic:
        raise KvRelayError(f"{family!r} is synthetic: its random models have no fine-tuning to picture")
    names = list(fam.models)
    pairs = pairs or [(s, r) for s in names for r in names if s != r]
    for m in {m for p in pairs for m in p}:
        fam.model(m)  # an unknown model name: an error naming the family's models
    used = sorted({m for p in pairs for m in p}, key=names.index)
    models = {m: _load(fam.dirs[m]) for m in used}
    tok = tk.load(fam.tokenizer_dir())
    data = evaldata.build(tok, "mixed", "profile", samples, context_tokens=context_tokens, seed=seed)
    num_layers = len(models[used[0]].model.layers)
    acc = {p: {k: [0.0] * num_layers for k in ("kl", "flip", "k_dev", "v_dev")} for p in pairs}
    positions = 0
    t0 = time.monotonic()
    bar = tqdm(
        total=len(data) * len(pairs),
        desc=f"{family} per-layer reuse",
        disable=not progress,
        file=sys.stderr,
        unit="pair",
    )
    for s in data:
        ids = torch.tensor([tk.encode(tok, s.context)])
        kv, logp, inputs = {}, {}, {}
        for m, model in models.items():
            kv[m], inputs[m] = {}, {}
            logp[m] = torch.log_softmax(_forward(model, ids, kv[m], inputs[m])[0], -1)
        positions += ids.shape[1]
        for snd, rcv in pairs:
            a = acc[(snd, rcv)]
            for layer in range(num_layers):
                for kind in ("k", "v"):
                    xs, xr = kv[snd][(layer, kind)], kv[rcv][(layer, kind)]
                    a[f"{kind}_dev"][layer] += float((xs - xr).norm() / xr.norm()) * ids.shape[1]
            ref = logp[rcv]
            top = ref.argmax(-1)
            for start in range(0, num_layers, batch):
                layers = list(range(start, min(num_layers, start + batch)))
                replace = {"donor": kv[snd], **{l: [i] for i, l in enumerate(layers)}}
                out = torch.log_softmax(_forward_from(models[rcv], inputs[rcv], start, replace), -1)
                for i, l in enumerate(layers):
                    a["kl"][l] += float((ref.exp() * (ref - out[i])).sum(-1).sum())
                    a["flip"][l] += float((out[i].argmax(-1) != top).sum()) * 100.0
                del out
            bar.update(1)
    bar.close()
    seconds = round(time.monotonic() - t0, 1)
    out = {}
    for (snd, rcv), a in acc.items():
        per = [{"layer": l, **{k: round(a[k][l] / positions, 6) for k in a}} for l in range(num_layers)]
        out[(snd, rcv)] = {
            "family": family,
            "sender": snd,
            "receiver": rcv,
            "num_layers": num_layers,
            "sender_weights": fam.model(snd).weights,
            "receiver_weights": fam.model(rcv).weights,
            "dataset": {
                "kind": "mixed",
                "split": "profile",
                "samples": len(data),
                "seed": seed,
                "context_tokens": list(context_tokens),
                "positions": positions,
                "sample_ids": [d.id for d in data],
            },
            "method": __doc__.strip().splitlines()[0],
            "per_layer": per,
            "seconds": seconds,
            "critical": critical_layers(per),
        }
    return out


def critical_layers(per: list[dict], share: float = 0.5) -> list[int]:
    """The fewest layers that together carry `share` of the summed single-layer KL: where reuse hurts."""
    order = sorted(per, key=lambda p: -p["kl"])
    total = sum(p["kl"] for p in per) or 1.0
    out, acc = [], 0.0
    for p in order:
        if acc >= share * total:
            break
        out.append(p["layer"])
        acc += p["kl"]
    return sorted(out)


def write(results: dict, out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for (snd, rcv), r in results.items():
        p = out_dir / f"{snd}__{rcv}{SUFFIX}"
        p.write_text(json.dumps(r, indent=1) + "\n")
        paths.append(p)
    return paths


def load_dir(out_dir: str | Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out_dir).glob(f"*__*{SUFFIX}"))]


def plot(results: list[dict], png: str | Path) -> Path:
    """One panel per pair (rows: sender, columns: receiver): single-layer reuse KL per layer, log scale,
    with the K deviation proxy on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise KvRelayError("no per-layer results to plot")
    models = []
    for r in results:
        for m in (r["sender"], r["receiver"]):
            if m not in models:
                models.append(m)
    n = len(models)
    fig, axes = plt.subplots(n, n, figsize=(2.6 * n, 1.9 * n), sharex=True, squeeze=False)
    by = {(r["sender"], r["receiver"]): r for r in results}
    ymax = max(p["kl"] for r in results for p in r["per_layer"]) * 1.5
    ymin = max(1e-6, min(p["kl"] for r in results for p in r["per_layer"]) / 1.5)
    for i, snd in enumerate(models):
        for j, rcv in enumerate(models):
            ax = axes[i][j]
            r = by.get((snd, rcv))
            if r is None:
                ax.axis("off")
                ax.text(0.5, 0.5, snd, ha="center", va="center", fontsize=11, weight="bold", transform=ax.transAxes)
                continue
            per = r["per_layer"]
            crit = set(r["critical"])
            ax.bar(
                [p["layer"] for p in per],
                [p["kl"] for p in per],
                color=["#c0392b" if p["layer"] in crit else "#7f8c8d" for p in per],
                width=0.8,
            )
            ax.set_yscale("log")
            ax.set_ylim(ymin, ymax)
            ax2 = ax.twinx()
            ax2.plot([p["layer"] for p in per], [p["k_dev"] for p in per], color="#2980b9", lw=1)
            ax2.tick_params(labelsize=6, colors="#2980b9")
            ax.set_title(f"{snd} -> {rcv}: {len(crit)} critical", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == n - 1:
                ax.set_xlabel("layer reused", fontsize=7)
            if j == 0:
                ax.set_ylabel("KL (nats)", fontsize=7)
    fam = results[0]["family"]
    ds = results[0]["dataset"]
    fig.suptitle(
        f"{fam}: reuse one layer's KV from the sender, compute the rest (DroidSpeak Fig. 7), "
        f"{ds['samples']} samples, {ds['positions']} positions\nbars: KL to the receiver's own output (red: "
        f"the fewest layers carrying half the total); blue line: K deviation ||K_s-K_r|| / ||K_r||",
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    png = Path(png)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png
