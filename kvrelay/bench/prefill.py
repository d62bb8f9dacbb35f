"""The prefill benchmark (`kvrelay bench prefill`, kvrelay/bench/prefill_cmd.py): receiver full prefill
vs. DroidSpeak re-prefill, side by side, one run.

For each context length, the sender prefills context + its question and exports pages; the receiver
then prefills context + another question (a) fully and (b) from the sender's pages recomputing
10/25/50% of its layers as one contiguous group. Median of repeats; prefix caching off so every
repeat does the work.

With --store, the sender's pages also go into a page store (kvrelay.store) and the re-prefill at each
fraction is timed end to end including getting them back (lookup, then only the reused layers' KV and
the group start's E): (c) `fetch` everything, then re-prefill; (d) `stream` (pipelined, DroidSpeak
section 4.3): recompute starts as soon as the E arrived while the reused layers' KV streams in.
`--store redis` starts a temporary redis-server on a free loopback port for the run.
"""

from __future__ import annotations

import random
import statistics
import sys
import time

from kvrelay.engines import make_engine
from kvrelay.errors import KvRelayError
from kvrelay.families import family_models
from kvrelay.model.engine_api import EngineConfig, Request, SamplingParams
from kvrelay.model.plan import RecomputePlan
from kvrelay.store import open_store
from kvrelay.store.redis_server import RedisServer

FRACTIONS = (0.10, 0.25, 0.50)


def bench(
    family,
    lengths,
    repeats=3,
    suffix=32,
    device="cpu",
    dtype=None,
    sender=None,
    receiver=None,
    progress=False,
    store=None,
    **synthetic_overrides,
) -> dict:
    if store is None:
        return _bench(
            family, lengths, repeats, suffix, device, dtype, sender, receiver, progress, None, **synthetic_overrides
        )

    server = None
    if store == "redis":
        server = RedisServer()
        store = server.url
    try:
        with open_store(store) as st:
            return _bench(
                family, lengths, repeats, suffix, device, dtype, sender, receiver, progress, st, **synthetic_overrides
            )
    finally:
        if server is not None:
            server.stop()


STORE_TENANT = "bench"


def _bench(
    family, lengths, repeats, suffix, device, dtype, sender, receiver, progress, st, **synthetic_overrides
) -> dict:
    """engines -> per length: the sender's pages, then timed repeats of every kind -> result."""
    from tqdm import tqdm

    b = _Bench(family, lengths, suffix, device, dtype, sender, receiver, st, synthetic_overrides)
    bar = tqdm(
        total=len(lengths) * (len(b.kinds) * repeats + 1), desc=f"bench {family}", disable=not progress, file=sys.stderr
    )
    per_len = {n: b.measure(n, repeats, bar) for n in lengths}
    bar.close()
    return b.result(per_len, repeats)


class _Bench:
    """One sender -> receiver pair, timed at one context length at a time."""

    def __init__(self, family, lengths, suffix, device, dtype, sender, receiver, st, synthetic_overrides):
        self.family, self.suffix, self.device, self.st = family, suffix, device, st
        self.dtype = dtype or ("float32" if device == "cpu" else "bfloat16")
        models = family_models(family)
        self.sender, self.receiver = sender or models[0], receiver or models[1]
        if self.sender == self.receiver:
            raise KvRelayError("--sender and --receiver must differ")
        longest = max(lengths) + suffix + 1
        cfg = lambda caching, kv_bytes: EngineConfig(
            device=device, dtype=self.dtype, prefix_caching=caching, max_model_len=None, kv_cache_bytes=kv_bytes
        )
        self.S = make_engine(family, self.sender, cfg(True, 2 << 30), **synthetic_overrides)
        kv_bytes = self.S.page_format.page_bytes * (2 * (longest // self.S.page_format.block_size + 2))
        self.R = make_engine(family, self.receiver, cfg(False, kv_bytes), **synthetic_overrides)
        if longest > self.R.max_model_len:
            raise KvRelayError(f"length {max(lengths)} + suffix exceeds the model's {self.R.max_model_len}-token limit")
        self.L = self.R.num_layers
        self.plans = {f: RecomputePlan.mid_model(f, self.L) for f in FRACTIONS}
        self.rng = random.Random()
        self.one = SamplingParams(max_tokens=1, ignore_eos=True)
        self.store_kinds = [(mode, f) for mode in ("store", "pipelined") for f in FRACTIONS] if st is not None else []
        self.kinds = ["full", *FRACTIONS, *self.store_kinds]

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.R.cfg.vocab_size) for _ in range(n)]

    def _timed(self, req) -> float:
        return self.R.generate([req])[req.request_id].prefill.seconds

    def _timed_store(self, rid, q, plan, pipelined) -> tuple[float, float]:
        """Wall clock: lookup + fetch (or stream) of what the plan needs + the re-prefill (first token)."""

        R, S, st = self.R, self.S, self.st
        t0 = time.perf_counter()
        blocks = st.lookup(STORE_TENANT, R.fingerprint, q, R.page_format.block_size).get(S.model_id, 0)
        args = (STORE_TENANT, R.fingerprint, S.model_id, q, R.page_format, blocks)
        kw = dict(layers=plan.kv_layers_needed(self.L), e_layers=plan.e_layers_needed(self.L))
        donor = st.stream(*args, **kw) if pipelined else st.fetch(*args, **kw)
        t1 = time.perf_counter()
        out = R.generate([Request(rid, q, self.one, donor=donor, plan=plan)])[rid]
        if out.prefill.reused_tokens == 0:
            raise KvRelayError(f"the store returned none of {S.model_id}'s pages for {rid}")
        return time.perf_counter() - t0, t1 - t0

    def measure(self, n: int, repeats: int, bar) -> dict:
        """Medians at context length n: full prefill, re-prefill per fraction (and from the store)."""

        ctx = self._tokens(n)
        pages = self.S.generate([Request("donor", ctx + self._tokens(self.suffix), self.one, export_pages=True)])[
            "donor"
        ].pages
        bar.update(1)
        times: dict = {k: [] for k in self.kinds}
        fetch_times: dict = {f: [] for f in FRACTIONS}
        if self.st is not None:
            t0 = time.perf_counter()
            self.st.put(STORE_TENANT, pages)
            put_s = time.perf_counter() - t0
        self._timed(Request("warmup", ctx + [1] * self.suffix, self.one))
        for r in range(repeats):
            for kind in times:
                q = ctx + self._tokens(self.suffix)
                if isinstance(kind, tuple):
                    mode, f = kind
                    total, fetch_s = self._timed_store(f"{mode}-{f}-{r}", q, self.plans[f], mode == "pipelined")
                    times[kind].append(total)
                    if mode == "store":
                        fetch_times[f].append(fetch_s)
                else:
                    req = (
                        Request(f"{kind}-{r}", q, self.one)
                        if kind == "full"
                        else Request(f"{kind}-{r}", q, self.one, donor=pages, plan=self.plans[kind])
                    )
                    times[kind].append(self._timed(req))
                bar.update(1)
        full = statistics.median(times["full"])
        out = {
            "full_s": full,
            "reprefill_s": {str(f): statistics.median(times[f]) for f in FRACTIONS},
            "speedup": {str(f): full / statistics.median(times[f]) for f in FRACTIONS},
        }
        if self.st is not None:
            out["store"] = {
                "put_s": put_s,
                **{
                    f"{mode}_s": {str(f): statistics.median(times[(mode, f)]) for f in FRACTIONS}
                    for mode in ("store", "pipelined")
                },
                "fetch_s": {str(f): statistics.median(fetch_times[f]) for f in FRACTIONS},
            }
        return out

    def result(self, per_len: dict, repeats: int) -> dict:
        st, plans = self.st, self.plans
        ref = 2048 if 2048 in per_len else max(per_len)
        extra = {}
        if st is not None:
            by = lambda key: {str(f): {str(n): v["store"][key][str(f)] for n, v in per_len.items()} for f in FRACTIONS}
            extra = {
                "store": getattr(st, "url", type(st).__name__),
                "reprefill_store_s": by("store_s"),  # lookup + fetch, then re-prefill (end to end)
                "reprefill_pipelined_s": by("pipelined_s"),  # lookup + stream overlapped with re-prefill
                "store_fetch_s": by("fetch_s"),  # lookup + fetch alone
                "store_put_s": {str(n): v["store"]["put_s"] for n, v in per_len.items()},
                "store_stats": st.stats(),
            }
        return {
            "family": self.family,
            "sender": self.sender,
            "receiver": self.receiver,
            "device": self.device,
            "dtype": self.dtype,
            "num_layers": self.L,
            "suffix_tokens": self.suffix,
            "repeats": repeats,
            "plans": {str(f): str(p) for f, p in plans.items()},
            "layers_recomputed": {str(f): p.num_recomputed for f, p in plans.items()},
            "full_s": {str(n): v["full_s"] for n, v in per_len.items()},
            "reprefill_s": {str(f): {str(n): v["reprefill_s"][str(f)] for n, v in per_len.items()} for f in FRACTIONS},
            "speedup": {str(f): {str(n): v["speedup"][str(f)] for n, v in per_len.items()} for f in FRACTIONS},
            "speedup_25": per_len[ref]["speedup"]["0.25"],
            "speedup_25_at": ref,
            **extra,
        }
