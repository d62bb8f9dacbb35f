"""The load-test workload: a pool of long shared contexts and a seeded request sequence over it.

Each request picks a context by a Zipf law over the pool (rank k drawn with weight 1 / k^s; s = 0 is
uniform), a variant uniformly over the deployment's models (or by a Zipf law of its own, in
deployment order: S-LoRA's popular-adapters workload), a question (the context's own task
question or a generic one) and a short output length (8-32 tokens by default). Arrivals are closed
loop (every user sends its next request as soon as its last one is answered) or Poisson at a given
rate. Everything is drawn from `random.Random(seed)`, so two runs with the same spec (sharing off,
then on) send exactly the same requests in the same order.

Contexts (1k-4k tokens by default) come from `kvrelay.profiler.evaldata` (long-context tasks built from the
held-out corpus part), falling back to held-out corpus documents cut to length; for synthetic
(random-weight, tokenizer-less) families they are random token ids written as text.

No Locust, no torch here: the schedule is plain Python, safe under gevent or threads.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field

from kvrelay.errors import KvRelayError
from kvrelay.families import corpora, family_spec
from kvrelay.loadtest import report
from kvrelay.model import tokenizer as tk
from kvrelay.profiler import evaldata

GENERIC_QUESTIONS = (
    "Summarise the text above in one sentence.",
    "What is the main subject of the text above?",
    "Name one technical term used in the text above.",
)
OUTPUT_HEADROOM = 64  # tokens kept free for the question and output beyond max_tokens


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    family: str
    models: tuple[str, ...]
    requests: int = 96  # measured requests (count bound)
    contexts: int = 12  # size of the shared-context pool
    context_tokens: tuple[int, int] = (2048, 4000)
    max_tokens: tuple[int, int] = (8, 16)
    zipf_s: float = 0.5
    variant_zipf_s: float = 0.0  # Zipf exponent of model popularity, in deployment order (0 = uniform)
    rate: float | None = None  # Poisson arrivals per second; None = closed loop
    seed: int = 0
    tenant: str = "loadtest"
    warmup: int = 2  # warm-up rounds (each: every model once, on a separate context)

    def validate(self) -> "WorkloadSpec":
        if not self.models:
            raise KvRelayError("the workload needs at least one model")
        if self.requests < 1 or self.contexts < 1:
            raise KvRelayError("--requests and --contexts must be >= 1")
        lo, hi = self.context_tokens
        if not 32 <= lo <= hi:
            raise KvRelayError(f"context tokens must satisfy 32 <= lo <= hi, got {lo}-{hi}")
        a, b = self.max_tokens
        if not 1 <= a <= b:
            raise KvRelayError(f"max tokens must satisfy 1 <= lo <= hi, got {a}-{b}")
        if self.zipf_s < 0:
            raise KvRelayError(f"the Zipf exponent of contexts (--zipf) must be >= 0, got {self.zipf_s}")
        if self.variant_zipf_s < 0:
            raise KvRelayError(f"the Zipf exponent of models (--variant-zipf) must be >= 0, got {self.variant_zipf_s}")
        if self.rate is not None and not self.rate > 0:
            raise KvRelayError(f"--rate must be > 0 requests/s, got {self.rate}")
        if self.warmup < 0:
            raise KvRelayError("--warmup must be >= 0")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"], d["context_tokens"], d["max_tokens"] = (
            list(self.models),
            list(self.context_tokens),
            list(self.max_tokens),
        )
        return d


@dataclass(frozen=True, slots=True)
class Context:
    id: int
    text: str  # the shared part (synthetic families: whitespace-separated token ids)
    tokens: int  # its length in tokens
    questions: tuple[str, ...]
    source: str = ""  # evaldata sample id, corpus documents, or "random"


@dataclass(frozen=True, slots=True)
class Request:
    index: int  # position in the sequence (warm-up requests: negative)
    context_id: int
    model: str
    question: str
    max_tokens: int
    arrival_s: float | None = None  # offset from the run's start (Poisson); None = closed loop
    tenant: str = "loadtest"

    @property
    def warmup(self) -> bool:
        return self.index < 0


@dataclass
class Workload:
    spec: WorkloadSpec
    contexts: list[Context]  # the measured pool
    requests: list[Request]
    warmup_contexts: list[Context] = field(default_factory=list)
    warmup_requests: list[Request] = field(default_factory=list)
    merge_context: bool = False  # send context + question as one text_input (tokenizer-less families)
    context_source: str = ""

    def context(self, cid: int) -> Context:
        return self._by_id[cid]

    def __post_init__(self):
        self._by_id = {c.id: c for c in self.contexts + self.warmup_contexts}

    def payload(self, r: Request) -> tuple[str, str | None]:
        """(text_input, context) for the request. A tokenizer-less family's preprocessing reads token
        ids only, and kvrelay's prompt layout adds words around the question: so there the context
        and question ids go as one text_input (the context's blocks still lead the prompt, so their
        hashes, and reuse, are the same)."""
        ctx = self.context(r.context_id)
        if self.merge_context:
            return f"{ctx.text} {r.question}", None
        return r.question, ctx.text

    def describe(self) -> dict:
        toks = [c.tokens for c in self.contexts]
        return {
            **self.spec.to_dict(),
            "context_source": self.context_source,
            "context_tokens_seen": [min(toks), max(toks)] if toks else [],
            **sharing_ceiling(self.requests),
        }


def sharing_ceiling(requests: list[Request]) -> dict:
    """How much this request sequence lets sharing save, whatever the engine: with sharing off every
    distinct (context, model) pair prefills once (repeats hit the model's own prefix cache); with
    sharing on, at best only the first model to see each context does. So pairs / contexts bounds
    the number of full prefills sharing can divide by, before decode and re-prefill costs."""
    contexts = len({r.context_id for r in requests})
    pairs = len({(r.context_id, r.model) for r in requests})
    return {
        "distinct_contexts_requested": contexts,
        "distinct_context_model_pairs": pairs,
        "repeat_requests": len(requests) - pairs,
        "full_prefill_ceiling": round(pairs / contexts, 3) if contexts else None,
    }


# --- drawing ------------------------------------------------------------------------------------


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised weights of ranks 1..n under P(k) ~ 1 / k^s."""
    w = [1.0 / (k**s) for k in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def generate(spec: WorkloadSpec, contexts: list[Context]) -> list[Request]:
    """The measured request sequence: deterministic in (spec, [c.id for c in contexts], questions)."""
    spec.validate()
    if not contexts:
        raise KvRelayError("no contexts to draw requests from")
    rng = random.Random(f"kvrelay-loadtest:{spec.seed}")
    weights = zipf_weights(len(contexts), spec.zipf_s)
    popularity = zipf_weights(len(spec.models), spec.variant_zipf_s)
    out, t = [], 0.0
    for i in range(spec.requests):
        ctx = contexts[rng.choices(range(len(contexts)), weights=weights)[0]]
        if spec.variant_zipf_s:  # (uniform draws stay as they were: same seed, same sequence)
            model = spec.models[rng.choices(range(len(spec.models)), weights=popularity)[0]]
        else:
            model = spec.models[rng.randrange(len(spec.models))]
        question = ctx.questions[rng.randrange(len(ctx.questions))]
        max_tokens = rng.randint(*spec.max_tokens)
        arrival = None
        if spec.rate is not None:
            t += rng.expovariate(spec.rate)
            arrival = round(t, 6)
        out.append(Request(i, ctx.id, model, question, max_tokens, arrival, spec.tenant))
    return out


def warmup_sequence(spec: WorkloadSpec, contexts: list[Context]) -> list[Request]:
    """`spec.warmup` rounds over separate contexts: every model once per round, the first one
    prefilling and the others (with sharing on) reusing; then same-model prefix hits."""
    out = []
    for rnd in range(spec.warmup):
        ctx = contexts[rnd % len(contexts)]
        for j, m in enumerate(spec.models):
            out.append(
                Request(
                    -1 - len(out),
                    ctx.id,
                    m,
                    ctx.questions[(rnd + j) % len(ctx.questions)],
                    spec.max_tokens[0],
                    None,
                    f"{spec.tenant}-warmup",
                )
            )
    return out


# --- contexts -----------------------------------------------------------------------------------


def build(spec: WorkloadSpec, log=None) -> Workload:
    """The workload for a family: contexts (pool + warm-up) and both request sequences."""
    spec.validate()
    log = log or report.log
    n_warm = 1 if spec.warmup else 0
    fam = family_spec(spec.family)
    base = fam.model(fam.base)
    lo, hi = _fit(spec, base.max_position_embeddings)
    if fam.synthetic:
        ctxs = random_contexts(spec.contexts + n_warm, (lo, hi), base.vocab_size, spec.seed)
        source, merge = "random token ids", True
    else:
        tok = tokenizer(spec.family)
        ctxs, source = text_contexts(tok, spec.contexts + n_warm, (lo, hi), spec.seed, log)
        merge = False
    pool, warm = ctxs[: spec.contexts], ctxs[spec.contexts :]
    return Workload(
        spec,
        pool,
        generate(spec, pool),
        warm,
        warmup_sequence(spec, warm) if warm else [],
        merge_context=merge,
        context_source=source,
    )


def _fit(spec: WorkloadSpec, max_len: int) -> tuple[int, int]:
    lo, hi = spec.context_tokens
    room = max_len - spec.max_tokens[1] - OUTPUT_HEADROOM
    if lo > room:
        raise KvRelayError(
            f"contexts of {lo}+ tokens do not fit the models' {max_len}-token window "
            f"with {spec.max_tokens[1]} output tokens"
        )
    return lo, min(hi, room)


def tokenizer(family: str):
    """The family's tokenizer (shared by its models), or None for a synthetic family."""
    d = family_spec(family).tokenizer_dir()
    return tk.load(d) if d is not None else None


def random_contexts(n: int, tokens: tuple[int, int], vocab: int, seed: int) -> list[Context]:
    """Random token-id contexts (tokenizer-less families); ids avoid the vocabulary's ends, where
    special tokens usually live. Questions are random ids too."""
    rng = random.Random(f"kvrelay-loadtest-random:{seed}")
    lo_id, hi_id = min(1000, vocab // 10), max(vocab - 1000, vocab * 9 // 10)
    out = []
    for i in range(n):
        length = rng.randint(*tokens)
        text = " ".join(str(rng.randrange(lo_id, hi_id)) for _ in range(length))
        qs = tuple(" ".join(str(rng.randrange(lo_id, hi_id)) for _ in range(rng.randint(8, 24))) for _ in range(3))
        out.append(Context(i, text, length, qs, "random"))
    return out


def text_contexts(tok, n: int, tokens: tuple[int, int], seed: int, log) -> tuple[list[Context], str]:
    """Contexts from kvrelay.profiler.evaldata's held-out long-context tasks; held-out corpus documents cut
    to length if evaldata cannot build them."""
    try:
        samples = evaldata.build(tok, "mixed", "heldout", n=n, context_tokens=tokens, seed=seed)
        return [
            Context(
                i,
                s.context,
                len(tok.encode(s.context, add_special_tokens=False)),
                (s.question,) + GENERIC_QUESTIONS,
                s.id,
            )
            for i, s in enumerate(samples)
        ], "evaldata heldout (mixed)"
    except Exception as e:  # noqa: BLE001 - evaldata is optional here; say why we fall back
        log(f"evaldata could not build contexts ({e}); using held-out corpus documents")
    return corpus_contexts(tok, n, tokens, seed), "corpora heldout documents"


def corpus_contexts(tok, n: int, tokens: tuple[int, int], seed: int) -> list[Context]:
    rng = random.Random(f"kvrelay-loadtest-corpus:{seed}")
    docs = {d: corpora.load_split(d, "heldout") for d in corpora.FIRST_DOMAINS}
    docs = {d: v for d, v in docs.items() if v}
    if not docs:
        raise KvRelayError("no held-out corpus documents to build contexts from")
    out = []
    for i in range(n):
        domain = sorted(docs)[i % len(docs)]
        target = rng.randint(*tokens)
        pool = list(docs[domain])
        rng.shuffle(pool)
        ids, names = [], []
        for d in pool:
            if len(ids) >= target:
                break
            ids += tok.encode(f"### File: {d.name.split(':', 1)[1]}\n{d.text.strip()}\n\n", add_special_tokens=False)
            names.append(d.name)
        text = tok.decode(ids[:target])
        out.append(
            Context(
                i,
                text,
                len(tok.encode(text, add_special_tokens=False)),
                GENERIC_QUESTIONS,
                "+".join(names[:3]) + ("+..." if len(names) > 3 else ""),
            )
        )
    return out


# --- the schedule a run draws from ---------------------------------------------------------------


class Schedule:
    """Hands out a run's requests in order, within a count bound (the sequence) and a time bound.

    Users call next() for their next request (None: stop), wait_s(r) for how long to sleep before a
    Poisson arrival, and begin()/end() around each request; `done` once nothing more will be issued
    and nothing is in flight. Cooperative (gevent) or single-threaded use: no locks."""

    def __init__(self, requests: list[Request], duration_s: float | None = None, clock=time.monotonic):
        self.requests = list(requests)
        self.duration_s = duration_s
        self.clock = clock
        self.t0: float | None = None
        self.issued = self.completed = self.in_flight = 0
        self.closed = False
        self.first_start: float | None = None
        self.last_end: float | None = None

    def start(self) -> None:
        self.t0 = self.clock()

    def elapsed(self) -> float:
        return 0.0 if self.t0 is None else self.clock() - self.t0

    def expired(self) -> bool:
        return self.duration_s is not None and self.t0 is not None and self.elapsed() >= self.duration_s

    def next(self) -> Request | None:
        if self.t0 is None:
            self.start()
        if self.closed or self.issued >= len(self.requests) or self.expired():
            self.closed = True
            return None
        r = self.requests[self.issued]
        if r.arrival_s is not None and self.duration_s is not None and r.arrival_s >= self.duration_s:
            self.closed = True
            return None
        self.issued += 1
        return r

    def wait_s(self, r: Request) -> float:
        if r.arrival_s is None or self.t0 is None:
            return 0.0
        return max(0.0, self.t0 + r.arrival_s - self.clock())

    def begin(self) -> None:
        self.in_flight += 1
        if self.first_start is None:
            self.first_start = self.clock()

    def end(self) -> None:
        self.in_flight -= 1
        self.completed += 1
        self.last_end = self.clock()

    def close(self) -> None:
        self.closed = True

    @property
    def done(self) -> bool:
        return (self.closed or self.issued >= len(self.requests)) and self.in_flight == 0

    @property
    def window_s(self) -> float:
        """From the first request sent to the last answer: the measured window."""
        if self.first_start is None or self.last_end is None:
            return 0.0
        return max(self.last_end - self.first_start, 1e-9)
