"""Byte sizes as people write them in configs and on command lines."""

from __future__ import annotations

import re

from kvrelay.errors import KvRelayError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}


def parse_bytes(text) -> int:
    """'2GiB', '512MB', '1.5g', '1048576' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise KvRelayError(f"bad size {text!r}: expected a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise KvRelayError(f"size {text!r} must be at least 1 byte")
    return n


def parse_int_list(text: str, what: str) -> list[int]:
    """'A,B,C' -> [A, B, C]; `what` (the option's name) goes into the error."""
    try:
        return [int(x) for x in str(text).split(",")]
    except ValueError:
        raise KvRelayError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_range(text, minimum: int = 0) -> tuple[int, int]:
    """'N' or 'LO-HI' (integers, minimum <= LO <= HI) -> (LO, HI)."""
    try:
        parts = [int(x) for x in str(text).split("-")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not minimum <= parts[0] <= parts[1]:
        raise KvRelayError(f"expected N or LO-HI with {minimum} <= LO <= HI, got {text!r}")
    return parts[0], parts[1]
