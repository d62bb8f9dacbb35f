"""The offline profiler: score every contiguous recompute group of a (sender, receiver) pair.

Configs: full reuse (no recompute) and every single group [a, b) with a and b on the stride grid
(b may also be the last layer) and b - a <= max_group_layers; O(L^2 / (2 stride^2)) of them.
Each is scored on the profiling split against the receiver's own full prefill (quality, 0-100:
metrics.profile_quality = the share of the receiver's own first max_tokens greedy tokens that the
re-prefill reproduces exactly before it first diverges), averaged over samples.

Cost per sample: one sender prefill (its pages serve every config), one receiver full prefill (the
reference), then one re-prefill per config, `batch` configs decoding together.
Partial results go to <out>.partial.json after every batch; a rerun with the same settings continues
from there; the partial file is removed once the profile is written.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.families import load_family
from kvrelay.model import profile_file
from kvrelay.model import tokenizer as tk
from kvrelay.model.plan import RecomputePlan
from kvrelay.profiler import evaldata, flips, scoring

METRIC_NAME = "prefix_agreement"
METRIC_VERSION = 2  # 2: gaps and gap shifts recorded for the flip model (older partials do not resume)
METRIC_DESCRIPTION = (
    "Agreement with the receiver's own full-prefill output on the profiling split, 0-100: per "
    "sample, the share of the receiver's first `tokens` greedy tokens (EOS included) that the "
    "re-prefill reproduces exactly before its first differing token; averaged over samples. The "
    "receiver's full prefill scores 100. Per config also: f1 (token F1 of the generated texts), "
    "top1 and kl (next-token argmax agreement and KL(full || plan), nats, over the positions whose "
    "prefixes are identical in both runs), gap_shift, positions, predicted_exact and "
    "quality_bound = min(quality, predicted_exact): the flip model of kvrelay.profiler.flips, "
    "which the frontier and the selector use), task_quality (the task metric of the generation "
    "against the reference answer: token F1 / Rouge-L / edit similarity, 0-100; short "
    "generations, so low), prefill_s."
)


@dataclass
class Settings:
    family: str
    sender: str
    receiver: str
    stride: int = 2
    samples: int = 8
    context_tokens: tuple[int, int] = evaldata.DEFAULT_CONTEXT_TOKENS
    max_tokens: int = 8
    max_group_frac: float = 0.5
    kind: str = "mixed"
    seed: int = 0
    batch: int = 16

    def validate(self) -> "Settings":
        if self.sender == self.receiver:
            raise KvRelayError("--sender and --receiver must differ (a model reuses its own KV by prefix caching)")
        if self.stride < 1 or self.samples < 1 or self.max_tokens < 1 or self.batch < 1:
            raise KvRelayError("--stride, --samples, --max-tokens and --batch must be >= 1")
        if not 0 < self.max_group_frac <= 1:
            raise KvRelayError(f"--max-group is a fraction of layers in (0, 1], got {self.max_group_frac}")
        return self


def max_group_layers(num_layers: int, stride: int, frac: float) -> int:
    return max(stride, int(num_layers * frac))


def enumerate_plans(num_layers: int, stride: int, max_group: int) -> list[RecomputePlan]:
    """Full reuse, then single groups [a, b) on the stride grid (b = L allowed), shortest first."""
    ends = sorted(set(range(stride, num_layers + 1, stride)) | {num_layers})
    plans = [RecomputePlan.none()]
    groups = [(a, b) for a in range(0, num_layers, stride) for b in ends if a < b and b - a <= max_group]
    groups.sort(key=lambda g: (g[1] - g[0], g[0]))
    plans += [RecomputePlan(((a, b),)) for a, b in groups]
    return plans


def _meta(st: Settings, s_fp: str, r_fp: str, L: int, cap: int, plans, samples) -> dict:
    return {
        "family": st.family,
        "sender": st.sender,
        "receiver": st.receiver,
        "sender_fingerprint": s_fp,
        "receiver_fingerprint": r_fp,
        "num_layers": L,
        "stride": st.stride,
        "max_group_layers": cap,
        "kind": st.kind,
        "seed": st.seed,
        "context_tokens": list(st.context_tokens),
        "max_tokens": st.max_tokens,
        "metric": METRIC_NAME,
        "metric_version": METRIC_VERSION,
        "plans": [str(p) for p in plans],
        "sample_ids": [s.id for s in samples],
    }


def _load_partial(path: Path, meta: dict) -> dict:
    if not path.exists():
        return {"meta": meta, "samples": {}}
    try:
        part = json.loads(path.read_text())
        old = part["meta"]
        part["samples"]
    except (ValueError, KeyError, TypeError) as e:
        raise KvRelayError(f"partial results {path} are unreadable ({e}); delete the file or pass --fresh") from None
    if old != meta:
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        raise KvRelayError(
            f"partial results {path} were made with other settings ({', '.join(diff)} differ); "
            "delete the file or pass --fresh"
        )
    return part


def profile(st: Settings, out: str | Path, *, progress: bool = True, fresh: bool = False, command: str = "") -> dict:
    """Run (or continue) the profile of st.sender -> st.receiver and write it to `out`."""
    st.validate()
    t0 = time.time()
    out = Path(out)
    fam = load_family(st.family)
    for m in (st.sender, st.receiver):
        fam.model_dir(m)
    tok = tk.load(fam.model_dir(st.receiver))
    samples = evaldata.build(tok, st.kind, "profile", st.samples, context_tokens=st.context_tokens, seed=st.seed)
    preps = [scoring.prepare(tok, s) for s in samples]
    longest = max(len(p.prompt) for p in preps)
    S = make_engine(st.family, st.sender, scoring.engine_config(fam.model_dir(st.sender), longest, 1, 1))
    R = make_engine(
        st.family, st.receiver, scoring.engine_config(fam.model_dir(st.receiver), longest, st.max_tokens, st.batch)
    )
    L = R.num_layers
    cap = max_group_layers(L, st.stride, st.max_group_frac)
    plans = enumerate_plans(L, st.stride, cap)
    no_e = sorted({a for p in plans for a in p.e_layers_needed()} - set(S.page_format.e_layers))
    if no_e:
        raise KvRelayError(
            f"--stride {st.stride} starts groups at layers {no_e}, where the sender keeps no E "
            f"(it keeps E at {list(S.page_format.e_layers)}); use an even stride"
        )
    meta = _meta(st, S.fingerprint, R.fingerprint, L, cap, plans, samples)
    meta["sender_weights"], meta["receiver_weights"] = (S.weights, R.weights)
    ppath = profile_file.partial_path(out)
    if fresh and ppath.exists():
        ppath.unlink()
    part = _load_partial(ppath, meta)
    done_before = sum(len(v["configs"]) + 1 for v in part["samples"].values())
    bar = tqdm(
        total=len(samples) * (len(plans) + 1),
        initial=done_before,
        file=sys.stderr,
        disable=not progress,
        desc=f"profile {st.family} {st.sender}->{st.receiver}",
        unit="cfg",
        dynamic_ncols=True,
    )
    for prep in preps:
        sid = prep.sample.id
        rec = part["samples"].setdefault(sid, {"full": None, "configs": {}})
        todo = [p for p in plans if str(p) not in rec["configs"]]
        if not todo and rec["full"] is not None:
            continue
        pages = scoring.sender_pages(S, prep)
        ref = scoring.run_full(R, tok, prep, st.max_tokens, st.max_tokens)
        if rec["full"] is None:
            rec["full"] = {
                "task": scoring.task_score(prep.sample, ref),
                "prefill_s": ref.prefill_s,
                "text": ref.text,
                "context_tokens": len(prep.ctx),
                "gaps": flips.top2_gaps(ref.logits[: st.max_tokens]),
            }
            bar.update(1)

        def done(i, o, todo=todo, rec=rec, prep=prep, ref=ref):
            rec["configs"][str(todo[i])] = scoring.score(prep.sample, ref, o, st.max_tokens)
            bar.update(1)

        for lo in range(0, len(todo), st.batch):
            chunk = todo[lo : lo + st.batch]
            scoring.run_plans(
                R,
                tok,
                prep,
                pages,
                chunk,
                st.max_tokens,
                st.max_tokens,
                st.batch,
                on_done=lambda i, o, lo=lo: done(lo + i, o),
            )
            profile_file.write_json_atomic(part, ppath)
        profile_file.write_json_atomic(part, ppath)
    bar.close()
    data = assemble(part, plans, st, time.time() - t0, command)
    profile_file.save(data, out)
    ppath.unlink(missing_ok=True)
    return data


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


def _flip_model(recs: list[dict]) -> dict | None:
    """The near-tie density over every reference gap of the profile, or None for results that
    predate the flip model."""
    if not all("gaps" in r["full"] for r in recs):
        return None
    gaps = [g for r in recs for g in r["full"]["gaps"]]
    if not gaps:
        return None
    return {
        "eps": flips.EPS,
        "confidence": flips.CONFIDENCE,
        "gaps": len(gaps),
        "near_ties": sum(1 for g in gaps if g < flips.EPS),
        "density_upper": flips.near_tie_density(gaps),
    }


def _config(p: RecomputePlan, per: list[dict], model: dict | None, tokens: int) -> dict:
    c = {"plan": p.to_list(), "layers_recomputed": p.num_recomputed}
    for k in ("quality", "task", "f1", "top1", "kl", "prefill_s"):
        c["task_quality" if k == "task" else k] = round(_mean(x[k] for x in per), 4 if k != "kl" else 6)
    if model is not None:
        n = sum(x["positions"] for x in per)
        shift = sum(x["gap_shift"] * x["positions"] for x in per) / n if n else 0.0
        pred = flips.predicted_exact(model["density_upper"], shift, tokens) if n else 0.0
        c.update(
            gap_shift=round(shift, 6),
            positions=n,
            predicted_exact=round(pred, 4),
            quality_bound=round(min(c["quality"], pred), 4),
        )
    return c


def assemble(part: dict, plans: list[RecomputePlan], st: Settings, seconds: float, command: str) -> dict:
    """The profile dict (profile_file schema) from per-sample results."""
    meta = part["meta"]
    recs = [part["samples"][sid] for sid in meta["sample_ids"]]
    L = meta["num_layers"]
    model = _flip_model(recs)
    configs = [_config(p, [r["configs"][str(p)] for r in recs], model, st.max_tokens) for p in plans]
    reuse = next(c for c in configs if c["layers_recomputed"] == 0)
    seen = [r["full"]["context_tokens"] for r in recs]
    return {
        "format": profile_file.FORMAT,
        "family": st.family,
        "sender": st.sender,
        "receiver": st.receiver,
        "sender_fingerprint": meta["sender_fingerprint"],
        "receiver_fingerprint": meta["receiver_fingerprint"],
        # the weights it was scored on: a profile applies to any weights of the same architecture and
        # tokenizer, but its figures hold for these (the selector counts a mismatch)
        "sender_weights": meta.get("sender_weights", ""),
        "receiver_weights": meta.get("receiver_weights", ""),
        "num_layers": L,
        "stride": st.stride,
        "max_group_layers": meta["max_group_layers"],
        "dataset": {
            "kind": st.kind,
            "split": "profile",
            "samples": len(recs),
            "seed": st.seed,
            "context_tokens": list(st.context_tokens),
            "context_tokens_seen": [min(seen), max(seen)],
            "max_tokens": st.max_tokens,
            "sample_ids": meta["sample_ids"],
        },
        "metric": {"name": METRIC_NAME, "description": METRIC_DESCRIPTION, "tokens": st.max_tokens},
        "configs": configs,
        "flip_model": model,
        "frontier": profile_file.pareto_frontier(configs),
        "baselines": {
            "full_prefill": {
                "layers_recomputed": L,
                "quality": 100.0,
                "task_quality": round(_mean(r["full"]["task"] for r in recs), 4),
                "prefill_s": round(_mean(r["full"]["prefill_s"] for r in recs), 4),
            },
            "full_reuse": {
                "plan": [],
                "layers_recomputed": 0,
                "quality": reuse["quality"],
                "task_quality": reuse["task_quality"],
                "prefill_s": reuse["prefill_s"],
                **({"predicted_exact": reuse["predicted_exact"]} if model else {}),
            },
        },
        "notes": (
            f"groups of at most {meta['max_group_layers']} of {L} layers scored (cap "
            f"{st.max_group_frac:.0%} of layers); single contiguous groups only; prefill_s measured on a "
            f"shared CPU, indicative only"
        ),
        "command": command,
        "kvrelay_version": profile_file.kvrelay_version(),
        "created": profile_file.now_utc(),
        "seconds": round(seconds, 1),
    }
