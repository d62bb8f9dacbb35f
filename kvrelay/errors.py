"""Errors a caller can act on. The CLI prints them and exits 2; Triton maps them to INVALID_ARG."""


class KvRelayError(Exception):
    """A request, plan, file or argument that kvrelay refuses, with a message naming the problem."""


class PlanError(KvRelayError):
    """A recompute plan that cannot be applied (overlapping groups, layers out of range, ...)."""


class FingerprintMismatch(KvRelayError):
    """KV from a model of another architecture or tokenizer: sharing it would give wrong answers."""


class FamilyNotBuilt(KvRelayError):
    """A model family whose weights are not on disk yet."""


class StaleFamily(FamilyNotBuilt):
    """A model family on disk that an older recipe built: it counts as not built (rebuilt on use)."""


class SourceMissing(KvRelayError):
    """A package that a family build reads (weights, corpus) is not installed."""


class FamilyChanged(KvRelayError):
    """A registered family whose files changed after registration: its digests and profiles describe
    other weights, so it is not served until it is registered again."""
