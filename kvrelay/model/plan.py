"""Recompute plans: which layers a receiver recomputes from a donor's E, in contiguous groups.

A plan is a tuple of half-open groups [start, end). Layers outside every group reuse the donor's KV.
A group starting at layer 0 starts from the receiver's own embeddings (cheap, exact); a group starting
at layer a > 0 starts from the donor's hidden state entering layer a (the E cache).

K/V correction (`correct_kv`, beyond DroidSpeak): a reused layer's K and V are not copied from the
donor but rebuilt from the donor's E entering that layer with the receiver's own input norm, k/v
projections and RoPE (about 6% of a layer's compute on SmolLM2's shapes). A fine-tune's change to
k_proj / v_proj then no longer reaches the reused layers; what remains is the drift of E itself.
It needs E at every reused layer > 0 (layer 0's input is the receiver's own embedding) and no donor KV.
Written "4-8+kv" / "none+kv".
"""

from __future__ import annotations

from dataclasses import dataclass

from kvrelay.errors import PlanError


@dataclass(frozen=True, slots=True)
class RecomputePlan:
    groups: tuple[tuple[int, int], ...] = ()
    correct_kv: bool = False

    KV_SUFFIX = "+kv"

    @classmethod
    def none(cls) -> "RecomputePlan":
        return cls(())

    @classmethod
    def all(cls, num_layers: int) -> "RecomputePlan":
        return cls(((0, num_layers),))

    @classmethod
    def mid_model(cls, fraction: float, num_layers: int) -> "RecomputePlan":
        """One contiguous group of round(fraction * L) layers, starting at an even layer >= 2 (so it starts
        from the donor's E, the realistic and costlier case) and placed mid-model."""
        n = max(1, round(fraction * num_layers))
        start = max(2, (num_layers - n) // 2 // 2 * 2)
        start = min(start, (num_layers - n) // 2 * 2)
        return cls(((start, start + n),))

    @classmethod
    def parse(cls, text: str) -> "RecomputePlan":
        """'' or 'none' -> no recompute; '4-8,20-24' -> groups [4,8) and [20,24); a '+kv' suffix
        turns on K/V correction at the reused layers."""
        text = text.strip()
        correct = text.endswith(cls.KV_SUFFIX)
        if correct:
            text = text[: -len(cls.KV_SUFFIX)].strip()
        if text in ("", "none"):
            return cls((), correct)
        groups = []
        for part in text.split(","):
            try:
                a, b = (int(x) for x in part.split("-"))
            except ValueError:
                raise PlanError(f"bad recompute group {part!r}: expected START-END, e.g. 4-8") from None
            groups.append((a, b))
        return cls(tuple(groups), correct)

    def __str__(self) -> str:
        return (",".join(f"{a}-{b}" for a, b in self.groups) or "none") + (self.KV_SUFFIX if self.correct_kv else "")

    def validate(self, num_layers: int) -> "RecomputePlan":
        prev_end = 0
        for a, b in self.groups:
            if not (isinstance(a, int) and isinstance(b, int)):
                raise PlanError(f"recompute group ({a!r}, {b!r}) must be two integers")
            if not 0 <= a < b <= num_layers:
                raise PlanError(
                    f"recompute group [{a}, {b}) is out of range for a {num_layers}-layer model "
                    f"(need 0 <= start < end <= {num_layers})"
                )
            if a < prev_end:
                raise PlanError(f"recompute groups overlap or are unsorted at [{a}, {b}) in plan {self}")
            prev_end = b
        return self

    def merged(self) -> "RecomputePlan":
        """Adjacent groups ([0,4),[4,8)) fused: one E fetch instead of two."""
        out: list[tuple[int, int]] = []
        for a, b in self.groups:
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            else:
                out.append((a, b))
        return RecomputePlan(tuple(out), self.correct_kv)

    @property
    def num_recomputed(self) -> int:
        return sum(b - a for a, b in self.groups)

    def recomputed_layers(self) -> list[int]:
        return [l for a, b in self.groups for l in range(a, b)]

    def reused_layers(self, num_layers: int) -> list[int]:
        rec = set(self.recomputed_layers())
        return [l for l in range(num_layers) if l not in rec]

    def e_layers_needed(self, num_layers: int | None = None) -> list[int]:
        """Layers whose donor E the receiver reads: each group's start > 0, and with K/V correction
        every reused layer > 0 (num_layers is then required)."""
        starts = [a for a, _ in self.merged().groups if a > 0]
        if not self.correct_kv:
            return starts
        if num_layers is None:
            raise PlanError(f"plan {self}: K/V correction needs the model's layer count to name its E layers")
        return sorted(set(starts) | {l for l in self.reused_layers(num_layers) if l > 0})

    def kv_layers_needed(self, num_layers: int) -> list[int]:
        """Layers whose donor KV the receiver reads: the reused ones, none under K/V correction."""
        return [] if self.correct_kv else self.reused_layers(num_layers)

    def to_list(self) -> list[list[int]]:
        return [[a, b] for a, b in self.groups]

    @classmethod
    def from_list(cls, groups, correct_kv: bool = False) -> "RecomputePlan":
        try:
            return cls(tuple((int(a), int(b)) for a, b in groups), bool(correct_kv))
        except (TypeError, ValueError):
            raise PlanError(f"a plan is a list of [start, end] pairs, got {groups!r}") from None
