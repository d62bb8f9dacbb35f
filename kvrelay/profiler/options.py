"""Command-line defaults and parsers that `kvrelay profile` and `kvrelay eval` share: how long the
contexts are. Light on purpose (no torch, no numpy): both commands import it at startup."""

from __future__ import annotations

from kvrelay.errors import KvRelayError
from kvrelay.units import parse_range

PROFILE_CONTEXT = "1024-4096"  # default --context-tokens of the exact-agreement profiler
TF_CONTEXT = "512-768"  # ... of the teacher-forced one (and its held-out eval)
LAYERS_CONTEXT = "256-384"  # ... of `layers`: ~1000 positions in 3 samples, 30 forwards a pair each


def parse_context_tokens(text: str) -> tuple[int, int]:
    """--context-tokens: N or LO-HI tokens, at least 32."""
    try:
        return parse_range(text, minimum=32)
    except KvRelayError:
        raise KvRelayError(f"--context-tokens must be N or LO-HI with 32 <= LO <= HI, got {text!r}") from None
