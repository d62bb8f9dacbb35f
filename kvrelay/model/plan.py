"""Recompute plans: which layers a receiver recomputes from a donor's E, in contiguous groups.

A plan is a tuple of half-open groups [start, end). Layers outside every group reuse the donor's KV.
A group starting at layer 0 starts from the receiver's own embeddings (cheap, exact); a group starting
at layer a > 0 starts from the donor's hidden state entering layer a (the E cache).
"""
from __future__ import annotations

from dataclasses import dataclass

from kvrelay.errors import PlanError


@dataclass(frozen=True, slots=True)
class RecomputePlan:
    groups: tuple[tuple[int, int], ...] = ()

    @classmethod
    def none(cls) -> "RecomputePlan":
        return cls(())

    @classmethod
    def all(cls, num_layers: int) -> "RecomputePlan":
        return cls(((0, num_layers),))

    @classmethod
    def parse(cls, text: str) -> "RecomputePlan":
        """'' or 'none' -> no recompute; '4-8,20-24' -> groups [4,8) and [20,24)."""
        text = text.strip()
        if text in ("", "none"):
            return cls.none()
        groups = []
        for part in text.split(","):
            try:
                a, b = (int(x) for x in part.split("-"))
            except ValueError:
                raise PlanError(f"bad recompute group {part!r}: expected START-END, e.g. 4-8") from None
            groups.append((a, b))
        return cls(tuple(groups))

    def __str__(self) -> str:
        return ",".join(f"{a}-{b}" for a, b in self.groups) or "none"

    def validate(self, num_layers: int) -> "RecomputePlan":
        prev_end = 0
        for a, b in self.groups:
            if not (isinstance(a, int) and isinstance(b, int)):
                raise PlanError(f"recompute group ({a!r}, {b!r}) must be two integers")
            if not 0 <= a < b <= num_layers:
                raise PlanError(f"recompute group [{a}, {b}) is out of range for a {num_layers}-layer model "
                                f"(need 0 <= start < end <= {num_layers})")
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
        return RecomputePlan(tuple(out))

    @property
    def num_recomputed(self) -> int:
        return sum(b - a for a, b in self.groups)

    def recomputed_layers(self) -> list[int]:
        return [l for a, b in self.groups for l in range(a, b)]

    def reused_layers(self, num_layers: int) -> list[int]:
        rec = set(self.recomputed_layers())
        return [l for l in range(num_layers) if l not in rec]

    def e_layers_needed(self) -> list[int]:
        return [a for a, _ in self.merged().groups if a > 0]

    def to_list(self) -> list[list[int]]:
        return [[a, b] for a, b in self.groups]

    @classmethod
    def from_list(cls, groups) -> "RecomputePlan":
        try:
            return cls(tuple((int(a), int(b)) for a, b in groups))
        except (TypeError, ValueError):
            raise PlanError(f"a plan is a list of [start, end] pairs, got {groups!r}") from None
