"""The quality target a plan must meet to be served, and the statistics it is judged by.

Teacher-forced on a fixed reference continuation (kvrelay.profiler.cases), every position of every
case counts for every plan. Per case the scorer sums, over its reference positions:
  kl     KL(receiver's full prefill || plan), nats
  nll    negative log-likelihood of the reference under the plan
  top1   positions where the plan's argmax equals the receiver's full prefill's
and, once per case, the same for the receiver's and the sender's own full prefills.

Retained gain: how much of what distinguishes the receiver from the sender the plan keeps.
  nll basis: (NLL_sender - NLL_plan) / (NLL_sender - NLL_receiver)   where the receiver is clearly
             better than the sender on this text (the lower bound of the difference >= MIN_NLL_GAP);
  kl basis:  1 - KL(R || plan) / KL(R || sender)                     elsewhere (the difference is
             small or the sender is the better predictor of this text).
Both are 1 for the receiver's own full prefill and 0 for the sender's.

Intervals: bootstrap over cases (paired: every statistic on the same resamples), 90% two-sided,
so `_lo` is a one-sided 95% lower bound; selection goes by lower bounds.

The target (default, `TARGET`): retained gain >= 95% and teacher-forced top-1 agreement >= 97%,
both as lower bounds, and where task answers exist and the receiver's own task score is above
TASK_FLOOR, the plan's task score within TASK_POINTS of it. `STRICT` (a deployment's strict mode):
top-1 agreement lower bound >= 99%: the receiver's own tokens, nearly always.
No torch import here (the selector reads the judgements from profiles).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_NLL_GAP = 0.02  # nats/token: below this the NLL difference is too small to divide by
BOOTSTRAP = 2000
CI_LEVEL = 0.90
TASK_FLOOR = 5.0  # task points (0-100): below this the receiver itself barely does the task
TASK_POINTS = 1.0


@dataclass(frozen=True)
class Target:
    name: str
    retained_gain: float | None  # minimum lower bound, or None (not judged)
    top1: float  # minimum lower bound of top-1 agreement, 0-1
    task_points: float | None  # allowed task-score drop where above the floor, or None

    def describe(self) -> str:
        parts = []
        if self.retained_gain is not None:
            parts.append(f"retained gain >= {self.retained_gain:.0%}")
        parts.append(f"teacher-forced top-1 agreement >= {self.top1:.0%}")
        s = " and ".join(parts) + " (95% lower bounds over contexts)"
        if self.task_points is not None:
            s += f"; task score within {self.task_points:g} point of the receiver's where above {TASK_FLOOR:g}"
        return s


TARGET = Target("target", 0.95, 0.97, TASK_POINTS)
STRICT = Target("strict", None, 0.99, None)
TARGETS = {t.name: t for t in (TARGET, STRICT)}


@dataclass
class CaseSums:
    """One case's sums over its reference positions (see the module docstring)."""

    positions: int
    kl: float
    nll: float
    top1: float

    def to_dict(self) -> dict:
        return {"positions": self.positions, "kl": self.kl, "nll": self.nll, "top1": self.top1}

    @classmethod
    def from_dict(cls, d: dict) -> "CaseSums":
        return cls(int(d["positions"]), float(d["kl"]), float(d["nll"]), float(d["top1"]))


def _resample(n_cases: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_cases, size=(BOOTSTRAP, n_cases))


def _ci(values: np.ndarray) -> list[float]:
    a = (1 - CI_LEVEL) / 2
    return [float(np.quantile(values, a)), float(np.quantile(values, 1 - a))]


def summarize(plan: list[CaseSums], receiver: list[CaseSums], sender: list[CaseSums], seed: int = 0) -> dict:
    """Point estimates and intervals of one plan's kl, nll, top1 and retained gain over the cases.
    `receiver` / `sender`: the same cases under each model's own full prefill (the sender's kl is
    KL(R || sender))."""
    n = len(plan)
    if not n or len(receiver) != n or len(sender) != n:
        raise ValueError("summarize needs the same cases for the plan, the receiver and the sender")
    col = lambda rows, k: np.array([getattr(r, k) for r in rows], dtype=np.float64)
    pos = col(plan, "positions")
    idx = _resample(n, seed)
    full = np.arange(n)[None, :]

    def stats(ix):
        P = pos[ix].sum(-1)
        kl, nll, top1 = (col(plan, k)[ix].sum(-1) / P for k in ("kl", "nll", "top1"))
        nll_r, nll_s = col(receiver, "nll")[ix].sum(-1) / P, col(sender, "nll")[ix].sum(-1) / P
        kl_s = col(sender, "kl")[ix].sum(-1) / P
        gain_nll = (nll_s - nll) / np.where(nll_s - nll_r == 0, np.nan, nll_s - nll_r)
        gain_kl = 1 - kl / np.where(kl_s == 0, np.nan, kl_s)
        return dict(kl=kl, nll=nll, top1=top1, gap=nll_s - nll_r, gain_nll=gain_nll, gain_kl=gain_kl)

    point = {k: float(v[0]) for k, v in stats(full).items()}
    boot = stats(idx)
    basis = "nll" if _ci(boot["gap"])[0] >= MIN_NLL_GAP else "kl"
    gain = boot["gain_" + basis]
    gain = gain[np.isfinite(gain)]
    out = {
        "kl": round(point["kl"], 6),
        "kl_ci": [round(x, 6) for x in _ci(boot["kl"])],
        "nll": round(point["nll"], 5),
        "nll_ci": [round(x, 5) for x in _ci(boot["nll"])],
        "top1_agreement": round(point["top1"], 5),
        "top1_agreement_ci": [round(x, 5) for x in _ci(boot["top1"])],
        "retained_gain": round(point["gain_" + basis], 5),
        "retained_gain_ci": [round(x, 5) for x in _ci(gain)] if len(gain) else [float("-inf"), float("inf")],
        "retained_gain_basis": basis,
        "nll_gap_sender_minus_receiver": round(point["gap"], 5),
        "contexts": n,
        "positions": int(pos.sum()),
    }
    return out


def task_ok(plan_task: float | None, receiver_task: float | None, target: Target = TARGET) -> bool | None:
    """The task clause: None where it does not apply (no answers, no clause, receiver below the floor)."""
    if target.task_points is None or plan_task is None or receiver_task is None or receiver_task < TASK_FLOOR:
        return None
    return plan_task >= receiver_task - target.task_points


def meets(s: dict, target: Target = TARGET, task: bool | None = None) -> bool:
    """Whether a summary (from `summarize`) meets `target` by its lower bounds; `task` the task clause."""
    if s["top1_agreement_ci"][0] < target.top1:
        return False
    if target.retained_gain is not None and s["retained_gain_ci"][0] < target.retained_gain:
        return False
    return task is not False
