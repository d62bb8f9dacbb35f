"""Online choice of a recompute plan for one request (DroidSpeak's rule), from committed profiles.

    sel = Selector(repo_root() / "profiles", "smol", latency=LatencyModel.from_bench(bench_json))
    choice = sel.choose("base", "code", base_fp, code_fp, context_tokens=2048, queued=3)
    choice.plan      # RecomputePlan, or None = full prefill (no reuse)

Rule for teacher-forced profiles (kvrelay.profiler.tf_run): candidates are the configs that meet the
deployment's quality mode by their lower bounds: "target" (default; kvrelay.profiler.target.TARGET:
retained gain >= 95%, teacher-forced top-1 >= 97%) or "strict" (top-1 >= 99%), and whose E layers the
donors' pages carry (`e_layers`); "fewest" is then the cheapest by the profile's fitted prefill time.
Rule for exact-agreement profiles (the older profiler; always strict): candidates are the profile's
Pareto-frontier plans whose quality is within `quality_target`
(relative) of the receiver's own full-prefill quality. A frontier point's quality is the profile's
selection quality: observed agreement capped by the flip model's predicted exact agreement
(kvrelay.profiler.flips), so a plan that matched a few samples by luck does not qualify. With requests
queued (queued > 0) take the
fewest layers recomputed (throughput); when idle with an SLO and a latency model, take the most
recompute whose predicted prefill still meets the SLO (quality); idle without SLO or latency model,
the fewest layers. No candidate, no profile, a malformed profile or fingerprints that differ from the
profile's => plan None (full prefill), the reason logged (logger "kvrelay.serving.selector") and counted in
`fallbacks`. Profiles are read once per pair and cached; `reload()` forgets them.
No torch import: this runs in the orchestrator per request.
"""

from __future__ import annotations

import bisect
import logging
import threading
from typing import Protocol
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.model import profile_file
from kvrelay.model.plan import RecomputePlan

log = logging.getLogger("kvrelay.serving.selector")

# Fallback reasons (keys of Selector.fallbacks; the Choice.reason starts with one of them).
NO_PROFILE = "no profile"
MALFORMED = "malformed profile"
FP_MISMATCH = "fingerprint mismatch"
NO_PLAN = "no plan meets the quality target"
# Not fallbacks (the plan is still used), counted beside them:
WEIGHTS_MISMATCH = "profile scored on other weights"
WEIGHTS_UNKNOWN = "profile without weights digests"
QUALITY_MODES = ("target", "strict")


@dataclass(frozen=True)
class Unusable:
    """Why a pair has no profile to choose from."""

    kind: str  # NO_PROFILE | MALFORMED
    reason: str


@dataclass(frozen=True)
class Choice:
    plan: RecomputePlan | None  # None => full prefill (no reuse)
    reason: str
    expected_quality: float | None
    expected_prefill_s: float | None
    cause: str = ""  # with plan None: the fallback key (NO_PROFILE, ...), for counters and labels


class Latency(Protocol):
    """Predicted prefill seconds for (context tokens, layers recomputed); None while it cannot say
    (OnlineLatency before it has seen enough prefills)."""

    def predict(self, tokens: int, layers: int) -> float | None: ...


class LatencyModel:
    """Prefill seconds as a function of (context tokens, layers recomputed).

    Fitted from `kvrelay bench prefill --json`: at each measured context length n, a least-squares
    line t = a(n) + b(n) * layers over the full prefill (all layers) and the re-prefills (10/25/50%
    of layers); a and b are interpolated linearly between measured lengths and scaled in proportion
    to n beyond them."""

    def __init__(self, lengths: list[int], intercepts: list[float], slopes: list[float], num_layers: int):
        if not lengths or len(lengths) != len(intercepts) or len(lengths) != len(slopes):
            raise KvRelayError("a latency model needs at least one measured context length")
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        self.lengths = [int(lengths[i]) for i in order]
        self.intercepts = [max(0.0, float(intercepts[i])) for i in order]
        self.slopes = [max(0.0, float(slopes[i])) for i in order]
        self.num_layers = int(num_layers)

    @classmethod
    def from_bench(cls, bench_json: dict) -> "LatencyModel":
        try:
            L = int(bench_json["num_layers"])
            full = {int(n): float(s) for n, s in bench_json["full_s"].items()}
            layers = {f: int(n) for f, n in bench_json["layers_recomputed"].items()}
            re = {f: {int(n): float(s) for n, s in per.items()} for f, per in bench_json["reprefill_s"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise KvRelayError(f"not a `kvrelay bench prefill --json` result: {e!r}") from None
        lengths, a, b = [], [], []
        for n, t_full in sorted(full.items()):
            pts = [(L, t_full)] + [(layers[f], re[f][n]) for f in re if f in layers and n in re[f]]
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            var = sum((x - mx) ** 2 for x in xs)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else t_full / max(L, 1)
            slope = max(slope, 0.0)
            lengths.append(n)
            a.append(max(my - slope * mx, 0.0))
            b.append(slope)
        return cls(lengths, a, b, L)

    def _coef(self, tokens: int) -> tuple[float, float]:
        ns = self.lengths
        if tokens <= ns[0]:
            s = tokens / ns[0]
            return self.intercepts[0] * s, self.slopes[0] * s
        if tokens >= ns[-1]:
            s = tokens / ns[-1]
            return self.intercepts[-1] * s, self.slopes[-1] * s
        i = bisect.bisect_right(ns, tokens)
        w = (tokens - ns[i - 1]) / (ns[i] - ns[i - 1])
        return (
            (1 - w) * self.intercepts[i - 1] + w * self.intercepts[i],
            (1 - w) * self.slopes[i - 1] + w * self.slopes[i],
        )

    def predict(self, tokens: int, layers: int) -> float:
        a, b = self._coef(max(int(tokens), 1))
        return a + b * layers

    def to_dict(self) -> dict:
        return {
            "lengths": self.lengths,
            "intercepts": self.intercepts,
            "slopes": self.slopes,
            "num_layers": self.num_layers,
        }


class OnlineLatency:
    """Prefill seconds ~ tokens x (a + b x layers), fitted by least squares to this server's own
    prefills (a full prefill computes every layer over the prompt; a re-prefill its recomputed layers
    over the reused context), over the last `window` of them. While every observation has the same
    layer count (full prefills only) it assumes cost in proportion to layers (a = 0), DroidSpeak's
    first-order model. predict() is None until `min_samples` prefills were seen."""

    def __init__(self, window: int = 256, min_samples: int = 3):
        self.samples: deque = deque(maxlen=window)
        self.min_samples = min_samples
        self._lock = threading.Lock()
        self._coef: tuple[float, float] | None = None

    def observe(self, tokens: int, layers: int, seconds: float) -> None:
        if tokens <= 0 or layers <= 0 or not seconds > 0:
            return
        with self._lock:
            self.samples.append((float(tokens), float(layers), float(seconds)))
            self._coef = self._fit() if len(self.samples) >= self.min_samples else None

    def _fit(self) -> tuple[float, float]:
        # normal equations of s = a*t + b*t*l
        s11 = s12 = s22 = y1 = y2 = 0.0
        for t, l, s in self.samples:
            x1, x2 = t, t * l
            s11, s12, s22, y1, y2 = s11 + x1 * x1, s12 + x1 * x2, s22 + x2 * x2, y1 + x1 * s, y2 + x2 * s
        det = s11 * s22 - s12 * s12
        if det > 1e-9 * s11 * s22:
            a, b = (y1 * s22 - y2 * s12) / det, (s11 * y2 - s12 * y1) / det
            if a >= 0 and b > 0:
                return a, b
        return 0.0, y2 / s22 if s22 else 0.0

    def predict(self, tokens: int, layers: int) -> float | None:
        with self._lock:
            coef = self._coef
        return None if coef is None else tokens * (coef[0] + coef[1] * layers)


class Selector:
    def __init__(
        self,
        profiles_dir: Path,
        family: str,
        latency: Latency | None = None,
        quality_target: float = 0.01,
        quality_mode: str = "target",
        e_layers: tuple[int, ...] | None = None,
    ):
        if not 0 <= quality_target < 1:
            raise KvRelayError(f"quality_target is a relative tolerance in [0, 1), got {quality_target!r}")
        if quality_mode not in QUALITY_MODES:
            raise KvRelayError(f"quality_mode must be one of {', '.join(QUALITY_MODES)}, got {quality_mode!r}")
        self.quality_mode = quality_mode
        self.e_layers = None if e_layers is None else set(e_layers)  # None: donors carry E wherever needed
        self.profiles_dir = Path(profiles_dir)
        self.family = family
        self.latency = latency
        self.quality_target = quality_target
        self.fallbacks: Counter = Counter()
        self._cache: dict[tuple[str, str], profile_file.Profile | Unusable] = {}
        self._logged: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def reload(self) -> None:
        """Forget cached profiles (after re-profiling)."""
        with self._lock:
            self._cache.clear()
            self._logged.clear()

    def profile(self, sender: str, receiver: str) -> profile_file.Profile | Unusable:
        """The pair's profile, or why there is none usable (cached either way)."""
        key = (sender, receiver)
        with self._lock:
            got = self._cache.get(key)
        if got is not None:
            return got
        path = profile_file.path_for(self.profiles_dir, self.family, sender, receiver)
        if not path.exists():
            got = Unusable(NO_PROFILE, f"{NO_PROFILE} for {sender}->{receiver} ({path})")
        else:
            try:
                got = profile_file.load(path)
                if (got.family, got.sender, got.receiver) != (self.family, sender, receiver):
                    got = Unusable(
                        MALFORMED,
                        f"{MALFORMED} for {sender}->{receiver}: {path} describes "
                        f"{got.family}:{got.sender}->{got.receiver}",
                    )
            except KvRelayError as e:
                got = Unusable(MALFORMED, f"{MALFORMED} for {sender}->{receiver}: {e}")
        with self._lock:
            self._cache[key] = got
        return got

    def _fallback(self, key: str, reason: str, pair: tuple[str, str]) -> Choice:
        with self._lock:
            self.fallbacks[key] += 1
            first = (pair + (key,)) not in self._logged
            self._logged.add(pair + (key,))
        log.log(logging.WARNING if first else logging.DEBUG, "full prefill for %s->%s: %s", *pair, reason)
        return Choice(None, reason, None, None, key)

    def _candidates(self, sender: str, receiver: str, sender_fp: str, receiver_fp: str):
        """(plans of this pair's frontier that meet the quality target, None, None), or (None, the
        fallback key, the reason) when there are none to choose from."""
        prof = self.profile(sender, receiver)
        if isinstance(prof, Unusable):
            return None, prof.kind, prof.reason
        d = prof.data
        if d["sender_fingerprint"] != sender_fp or d["receiver_fingerprint"] != receiver_fp:
            which = [
                w
                for w, a, b in (
                    ("sender", d["sender_fingerprint"], sender_fp),
                    ("receiver", d["receiver_fingerprint"], receiver_fp),
                )
                if a != b
            ]
            return (
                None,
                FP_MISMATCH,
                (
                    f"{FP_MISMATCH}: the {' and '.join(which)} model(s) differ from those "
                    f"profiled for {sender}->{receiver}; re-profile"
                ),
            )
        if prof.teacher_forced:
            cands = [
                p
                for p in prof.passing(self.quality_mode)
                if self.e_layers is None or set(p.plan.e_layers_needed(prof.num_layers)) <= self.e_layers
            ]
            if not cands:
                return None, NO_PLAN, f"{NO_PLAN} ({self.quality_mode}) for {sender}->{receiver}"
            return cands, None, None
        floor = prof.full_prefill_quality * (1 - self.quality_target)
        cands = [p for p in prof.frontier if p.quality >= floor]
        if not cands:
            return None, NO_PLAN, f"{NO_PLAN} ({floor:.2f}) for {sender}->{receiver}"
        return cands, None, None

    def _check_weights(self, sender: str, receiver: str, weights: tuple[str, str]) -> None:
        """A profile scored on other weights of the same models still applies (same architecture and
        tokenizer), but its quality figures were measured elsewhere: counted in `weights_mismatch`,
        logged once per pair. Profiles from before digests were recorded count as `weights_unknown`."""
        d = self.profile(sender, receiver).data
        status = profile_file.weights_status(d, weights)
        if status in ("scored", "verified"):
            return
        scored = (d.get("sender_weights") or "", d.get("receiver_weights") or "")
        key = WEIGHTS_UNKNOWN if status == "unknown" else WEIGHTS_MISMATCH
        with self._lock:
            self.fallbacks[key] += 1
            first = (sender, receiver, key) not in self._logged
            self._logged.add((sender, receiver, key))
        if first:
            log.warning(
                "%s->%s: the profile was scored on %s weights (%s) than those served (%s); "
                "`kvrelay profile check` re-scores it on these",
                sender,
                receiver,
                "unrecorded" if key == WEIGHTS_UNKNOWN else "other",
                "/".join(scored),
                "/".join(weights),
            )

    def has_plan(self, sender: str, receiver: str, sender_fp: str, receiver_fp: str) -> bool:
        """Whether some profiled plan of this pair meets the quality target (no logging, no counting)."""
        return self._candidates(sender, receiver, sender_fp, receiver_fp)[0] is not None

    def choose(
        self,
        sender: str,
        receiver: str,
        sender_fp: str,
        receiver_fp: str,
        *,
        context_tokens: int,
        queued: int = 0,
        slo_s: float | None = None,
        weights: tuple[str, str] | None = None,
    ) -> Choice:
        """weights: the (sender, receiver) weights digests being served, checked against the profile's."""
        cands, key, reason = self._candidates(sender, receiver, sender_fp, receiver_fp)
        if cands is None:
            return self._fallback(key, reason, (sender, receiver))
        if weights is not None:
            self._check_weights(sender, receiver, weights)
        predict = (lambda p: self.latency.predict(context_tokens, p.layers)) if self.latency else (lambda p: None)
        fewest = min(cands, key=lambda p: (p.prefill_s if p.prefill_s is not None else p.layers, p.layers, -p.quality))
        if queued > 0:
            pick, why = fewest, f"queueing ({queued} queued): fewest layers meeting quality"
        elif self.latency is None or slo_s is None or predict(fewest) is None:
            pick, why = fewest, "idle, no SLO or latency model: fewest layers meeting quality"
        else:
            fast = [p for p in cands if predict(p) <= slo_s]
            if fast:
                pick = max(fast, key=lambda p: (p.layers, p.quality))
                why = f"idle: most recompute meeting the {slo_s:.3f}s SLO"
            else:
                pick, why = fewest, f"idle: no plan meets the {slo_s:.3f}s SLO; fewest layers"
        return Choice(pick.plan, why, pick.quality, predict(pick))
