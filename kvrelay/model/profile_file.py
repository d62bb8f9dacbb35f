"""The profile file: the one place that defines, reads, writes and checks its schema.

Path convention: profiles/<family>/<sender>__<receiver>.json (see `path_for`). Contents (FORMAT 1):

    format                 1
    family, sender, receiver
    sender_fingerprint, receiver_fingerprint    the models' fingerprints when profiled
    num_layers             receiver layers
    stride                 group boundaries lie on multiples of this
    max_group_layers       longest group scored (the profiler caps group length; said here)
    dataset                {kind, split, samples, seed, context_tokens: [lo, hi],
                            context_tokens_seen: [min, max], max_tokens, sample_ids}
    metric                 {name, description, tokens}; `quality` values are on a 0-100 scale
    configs                every scored config: {plan: [[a, b], ...], kv_correction (absent: false),
                            layers_recomputed, quality,
                            task_quality, f1, top1, kl, prefill_s}; plan [] = full reuse
                            and, from profiler metric version 2: gap_shift, positions,
                            predicted_exact, quality_bound (kvrelay.profiler.flips)
    flip_model             {eps, confidence, gaps, near_ties, density_upper}, or null/absent
    frontier               the Pareto frontier of configs (fewer layers and higher quality dominate),
                            by layers recomputed ascending: {plan, layers_recomputed, quality}; quality
                            is quality_bound where configs have it (observed_quality beside it)
    baselines              {full_prefill: {layers_recomputed: L, quality, task_quality, prefill_s},
                            full_reuse: {layers_recomputed: 0, quality, task_quality, prefill_s}}
    command                the command line that produced it
    sender_weights, receiver_weights   weights digests of the models it was scored on (absent: older)
    verified_on            optional list: weights a passing `kvrelay profile check --record` re-scored
                            the frontier on: {sender_weights, receiver_weights, samples, seed, max_tokens,
                            plans: [{plan, profiled, fresh}], created}
    kvrelay_version, created (UTC ISO 8601), seconds (wall time of the run)

Teacher-forced profiles (metric.name "teacher_forced", kvrelay.profiler.tf_run) add per config
kl / nll / top1_agreement / retained_gain with `_ci` intervals, retained_gain_basis, meets_target,
meets_strict, prefill_s_fit (fitted cost, what selection goes by) and, where timed, prefill_s and
prefill_speedup; beside them criticality,
frontier_time (quality vs measured prefill time) and selected (the cheapest plan meeting the target).

No torch import here: the online selector reads these files. The schema is model-layer vocabulary
(like recompute plans): the profiler writes profiles, while serving's selector, `kvrelay models list`,
the load tests and the eval read them, so none of those has to reach into the profiler.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.model.plan import RecomputePlan

FORMAT = 1
SUFFIX = ".json"
PARTIAL_SUFFIX = ".partial.json"

_TOP = {
    "format": int,
    "family": str,
    "sender": str,
    "receiver": str,
    "sender_fingerprint": str,
    "receiver_fingerprint": str,
    "num_layers": int,
    "stride": int,
    "max_group_layers": int,
    "dataset": dict,
    "metric": dict,
    "configs": list,
    "frontier": list,
    "baselines": dict,
    "command": str,
    "kvrelay_version": str,
    "created": str,
}
_DATASET = {"kind": str, "split": str, "samples": int, "context_tokens": list}
_METRIC = {"name": str, "description": str}
_BASELINES = ("full_prefill", "full_reuse")


class ProfileError(KvRelayError):
    """A profile file that is missing, unreadable or does not follow the schema."""


def path_for(profiles_dir: str | Path, family: str, sender: str, receiver: str) -> Path:
    return Path(profiles_dir) / family / f"{sender}__{receiver}{SUFFIX}"


def pairs_in(profiles_dir: str | Path, family: str) -> list[tuple[str, str, Path]]:
    """(sender, receiver, path) of every profile file of `family` under profiles_dir (partial
    results of an unfinished run excluded), by file name."""
    root = Path(profiles_dir) / family
    out = []
    for f in sorted(root.glob(f"*__*{SUFFIX}")) if root.is_dir() else []:
        if not f.name.endswith(PARTIAL_SUFFIX):
            s, _, r = f.name[: -len(SUFFIX)].partition("__")
            out.append((s, r, f))
    return out


def fixed(
    family: str,
    sender: str,
    receiver: str,
    sender_fp: str,
    receiver_fp: str,
    num_layers: int,
    plan: RecomputePlan,
    command: str,
) -> dict:
    """A profile whose only point is `plan`, at quality 100 by fiat: the selector then always picks it.
    For throughput runs that impose a plan (`kvrelay loadtest --plan`); nothing in it was measured."""
    point = {"plan": plan.to_list(), "layers_recomputed": plan.num_recomputed, "quality": 100.0}
    return {
        "format": FORMAT,
        "family": family,
        "sender": sender,
        "receiver": receiver,
        "sender_fingerprint": sender_fp,
        "receiver_fingerprint": receiver_fp,
        "num_layers": num_layers,
        "stride": 1,
        "max_group_layers": num_layers,
        "dataset": {"kind": f"none: fixed by `{command}`", "split": "profile", "samples": 0, "context_tokens": [0, 0]},
        "metric": {"name": "fixed", "description": "not measured: a plan imposed for a throughput run"},
        "configs": [point],
        "frontier": [point],
        "baselines": {
            "full_prefill": {"layers_recomputed": num_layers, "quality": 100.0},
            "full_reuse": {"layers_recomputed": 0, "quality": 0.0},
        },
        "command": command,
        "kvrelay_version": kvrelay_version(),
        "created": now_utc(),
    }


def write_fixed(root: str | Path, family: str, models: dict, plan_text: str, command: str) -> list[str]:
    """A fixed profile (see `fixed`) of `plan_text` under `root` for every ordered pair of `models`
    (name -> identity with .fingerprint and .num_layers: a kvrelay.model.spec.ModelSpec or a
    deployment's ServedModel). Returns the pair names (sender__receiver)."""
    out = []
    for s in models:
        for r in models:
            if s == r:
                continue
            L = models[r].num_layers
            plan = RecomputePlan.parse(plan_text).validate(L)
            save(
                fixed(family, s, r, models[s].fingerprint, models[r].fingerprint, L, plan, command),
                path_for(root, family, s, r),
            )
            out.append(f"{s}__{r}")
    return out


def partial_path(out: str | Path) -> Path:
    """Where a profiler run keeps its partial results: next to --out, so a rerun continues."""
    out = Path(out)
    name = out.name[: -len(SUFFIX)] if out.name.endswith(SUFFIX) else out.name
    return out.with_name(name + PARTIAL_SUFFIX)


@dataclass(frozen=True)
class Point:
    plan: RecomputePlan
    layers: int
    quality: float
    prefill_s: float | None = None


def plan_of(d: dict) -> RecomputePlan:
    """The plan of a config or frontier point (its groups and whether it corrects K/V)."""
    return RecomputePlan.from_list(d["plan"], d.get("kv_correction", False))


def _point(c: dict) -> Point:
    """A config as the selector sees it; its cost is the fitted prefill time where there is one."""
    return Point(plan_of(c), c["layers_recomputed"], float(c["quality"]), c.get("prefill_s_fit", c.get("prefill_s")))


@dataclass(frozen=True)
class Profile:
    """A validated profile: the raw dict plus typed views the selector uses."""

    data: dict
    path: Path | None = None

    @property
    def family(self) -> str:
        return self.data["family"]

    @property
    def sender(self) -> str:
        return self.data["sender"]

    @property
    def receiver(self) -> str:
        return self.data["receiver"]

    @property
    def num_layers(self) -> int:
        return self.data["num_layers"]

    @functools.cached_property
    def frontier(self) -> list[Point]:
        return [Point(plan_of(f), f["layers_recomputed"], float(f["quality"])) for f in self.data["frontier"]]

    @property
    def configs(self) -> list[Point]:
        return [_point(c) for c in self.data["configs"]]

    @property
    def teacher_forced(self) -> bool:
        return self.data["metric"].get("name") == "teacher_forced"

    def passing(self, mode: str) -> list[Point]:
        """Teacher-forced profiles: the configs that meet `mode` ("target" | "strict") by their lower bounds."""
        key = f"meets_{mode}"
        return [_point(c) for c in self.data["configs"] if c.get(key)]

    @property
    def full_prefill_quality(self) -> float:
        return float(self.data["baselines"]["full_prefill"]["quality"])

    @property
    def full_reuse_quality(self) -> float:
        return float(self.data["baselines"]["full_reuse"]["quality"])


# --- frontier ------------------------------------------------------------------------------------


def weights_status(data: dict, weights: tuple[str, str]) -> str:
    """How a profile relates to the (sender, receiver) weights at hand: "scored" (profiled on them),
    "verified" (a passing `profile check --record` re-scored it on them), "other" (other weights) or
    "unknown" (the profile predates weights digests and was never verified)."""
    scored = (data.get("sender_weights"), data.get("receiver_weights"))
    if scored == tuple(weights):
        return "scored"
    if any(
        (v.get("sender_weights"), v.get("receiver_weights")) == tuple(weights) for v in data.get("verified_on") or []
    ):
        return "verified"
    return "other" if all(scored) else "unknown"


def selection_quality(c: dict) -> float:
    """The quality the frontier and the selector go by: `quality_bound` (observed agreement capped
    by the flip model's prediction) where the profile has it, else the observed `quality`."""
    return c.get("quality_bound", c["quality"])


def pareto_frontier(configs: list[dict]) -> list[dict]:
    """Configs not dominated by another (one with no more layers and no less selection quality,
    better in one), sorted by layers recomputed; of equal (layers, quality) the one with the lowest
    "kl" (if given), then the first listed, is kept. A frontier point's `quality` is its selection
    quality (`observed_quality` beside it where they differ in kind)."""
    order = sorted(
        range(len(configs)),
        key=lambda i: (configs[i]["layers_recomputed"], -selection_quality(configs[i]), configs[i].get("kl", 0.0), i),
    )
    out, best = [], -math.inf
    for i in order:
        c = configs[i]
        q = selection_quality(c)
        if q > best:
            point = {"plan": c["plan"], "layers_recomputed": c["layers_recomputed"], "quality": q}
            if c.get("kv_correction"):
                point["kv_correction"] = True
            if "quality_bound" in c:
                point["observed_quality"] = c["quality"]
            out.append(point)
            best = q
    return out


# --- validation ----------------------------------------------------------------------------------


def _where(path) -> str:
    return f"profile {path}" if path else "profile"


def _need(d: dict, spec: dict, what: str, where: str) -> None:
    if not isinstance(d, dict):
        raise ProfileError(f"{where}: {what} must be an object, got {type(d).__name__}")
    missing = [k for k in spec if k not in d]
    if missing:
        raise ProfileError(f"{where}: {what} lacks field(s) {', '.join(missing)}")
    for k, t in spec.items():
        v = d[k]
        ok = isinstance(v, t) and not (t is int and isinstance(v, bool))
        if t is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if not ok:
            raise ProfileError(f"{where}: {what}.{k} must be {t.__name__}, got {v!r}")


def _check_point(p: dict, L: int, what: str, where: str) -> None:
    _need(p, {"plan": list, "layers_recomputed": int, "quality": float}, what, where)
    try:
        plan = plan_of(p).validate(L)
    except KvRelayError as e:
        raise ProfileError(f"{where}: {what}.plan {p['plan']!r}: {e}") from None
    if plan.num_recomputed != p["layers_recomputed"]:
        raise ProfileError(
            f"{where}: {what}: plan {plan} recomputes {plan.num_recomputed} layers, "
            f"but layers_recomputed says {p['layers_recomputed']}"
        )


def validate(data, path=None) -> dict:
    """Check a parsed profile against the schema; ProfileError naming the first problem."""
    where = _where(path)
    _need(data, _TOP, "the profile", where)
    if data["format"] != FORMAT:
        raise ProfileError(f"{where}: format {data['format']} is not supported (this kvrelay reads format {FORMAT})")
    L = data["num_layers"]
    if L < 1 or data["stride"] < 1 or data["max_group_layers"] < 1:
        raise ProfileError(f"{where}: num_layers, stride and max_group_layers must be >= 1")
    _need(data["dataset"], _DATASET, "dataset", where)
    _need(data["metric"], _METRIC, "metric", where)
    if not data["configs"]:
        raise ProfileError(f"{where}: no scored configs")
    for i, c in enumerate(data["configs"]):
        _check_point(c, L, f"configs[{i}]", where)
    if not data["frontier"]:
        raise ProfileError(f"{where}: empty frontier")
    prev = None
    for i, f in enumerate(data["frontier"]):
        _check_point(f, L, f"frontier[{i}]", where)
        if prev is not None and not (
            f["layers_recomputed"] > prev["layers_recomputed"] and f["quality"] > prev["quality"]
        ):
            raise ProfileError(f"{where}: frontier must rise strictly in layers and quality; frontier[{i}] does not")
        prev = f
    for b in _BASELINES:
        if b not in data["baselines"]:
            raise ProfileError(f"{where}: baselines lacks {b}")
        _need(data["baselines"][b], {"layers_recomputed": int, "quality": float}, f"baselines.{b}", where)
    return data


# --- load / save ---------------------------------------------------------------------------------


def load(path: str | Path) -> Profile:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(f"no profile at {path}") from None
    except OSError as e:
        raise ProfileError(f"cannot read profile {path}: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ProfileError(f"profile {path} is not valid JSON: {e}") from None
    return Profile(validate(data, path), path)


def save(data: dict, path: str | Path) -> Path:
    """Validate and write atomically (a reader never sees half a file)."""
    path = Path(path)
    validate(data, path)
    write_json_atomic(data, path)
    return path


def write_json_atomic(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


def kvrelay_version() -> str:
    try:
        return version("kvrelay")
    except Exception:
        return "unknown"
