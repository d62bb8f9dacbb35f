"""Long-context evaluation tasks built offline from the corpora's "profile" and "heldout" parts.

Three kinds of task, each scored against a reference that is extracted automatically:

  qa        extractive QA; the answer is a span of the context:
              legal  a DEP-5 field of a copyright file (Upstream-Name, Upstream-Contact, Source,
                     the first Copyright line)
              docs   a documented function's parameters, or the first sentence of its definition
              code   a function parameter's default value, or the module a name is imported from
            metric: token F1
  summary   continuation of technical prose / legal text: the context ends at a line break and the
            reference is the text's true next lines; metric: Rouge-L
  code      code completion over Python source: the context ends at a line break and the reference
            is the next non-blank line; metric: edit similarity

Contexts are `context_tokens` (lo, hi) tokens long (default 1k-4k; drawn per sample): one document,
or a window of one around the part the question is about; when the document is shorter, other
documents of the same domain and part fill the context ("### File: <name>" header before each, the
question names its file). Never built from the "train" part (the fine-tuning data). Deterministic
given (kind, split, n, context_tokens, seed) and the tokenizer.
"""

from __future__ import annotations

import ast
import random
import re
from dataclasses import asdict, dataclass

from kvrelay.families import corpora
from kvrelay.errors import KvRelayError

KINDS: tuple[str, ...] = ("qa", "summary", "code")
DATASET_KINDS: tuple[str, ...] = ("mixed",) + KINDS
SPLITS: tuple[str, ...] = ("profile", "heldout")
METRIC_OF = {"qa": "token_f1", "summary": "rouge_l", "code": "edit_similarity"}
MAX_TOKENS = {"qa": 16, "summary": 40, "code": 24}  # generation length that covers the reference
DEFAULT_CONTEXT_TOKENS = (1024, 4096)
# "mixed": (kind, domain) cycled in this order, so even a few samples cover every kind.
MIXED_ORDER = (
    ("qa", "legal"),
    ("code", "code"),
    ("summary", "docs"),
    ("qa", "code"),
    ("qa", "docs"),
    ("summary", "legal"),
)
DOMAINS_OF = {
    "qa": ("legal", "docs", "code", "changelog"),
    "summary": ("docs", "legal", "changelog"),
    "code": ("code",),
}
QUESTIONS = {
    "summary": "Continue the text above: write its next lines.",
    "code": "Write the next line of the code above.",
}


@dataclass(frozen=True)
class Sample:
    id: str  # "<split>/<kind>/<doc name>/<detail>"
    kind: str  # qa | summary | code
    domain: str  # corpus domain of the document asked about
    doc: str  # its document name
    context: str  # the shared long context (what a sender's KV covers)
    question: str  # the request's own part
    answer: str  # the reference
    metric: str  # token_f1 | rouge_l | edit_similarity
    max_tokens: int  # generation length for this task

    def to_dict(self) -> dict:
        return asdict(self)

    def postprocess(self, text: str) -> str:
        """The part of a generation the metric scores: the first non-blank line for qa and code."""
        if self.kind in ("qa", "code"):
            for line in text.strip().splitlines():
                if line.strip():
                    return line.strip()
            return ""
        return text.strip()


# --- facts: (question, answer, char start, char end) of a span of the document --------------------

_DEP5 = {
    "Upstream-Name": "What is the Upstream-Name given in the file {f}?",
    "Upstream-Contact": "What is the Upstream-Contact given in the file {f}?",
    "Source": "What is the Source given in the file {f}?",
    "Copyright": "What does the first Copyright field say in the file {f}?",
}


def _legal_facts(doc: corpora.Document) -> list[tuple[str, str, int, int]]:
    out = []
    for field, q in _DEP5.items():
        m = re.search(rf"^{field}:[ \t]*(\S[^\n]*)$", doc.text, re.M)
        if m and 2 <= len(m.group(1).strip()) <= 120:
            out.append((q.format(f=_short(doc)), m.group(1).strip(), m.start(), m.end()))
    if not any(q.startswith("What does the first Copyright") for q, *_ in out):
        m = re.search(r"^[ \t]*Copyright (?:\([cC]\) )?((?:19|20)\d\d[^\n]{3,100})$", doc.text, re.M)
        if m:
            out.append(
                (
                    f"According to the file {_short(doc)}, who holds the copyright, and since when?",
                    m.group(1).strip(),
                    m.start(),
                    m.end(),
                )
            )
    return out


_SIG = re.compile(
    r"^\.\. (?:function|method)::[ \t]+([\w.]+)\(([^)\n]*)\)[ \t]*\n((?:[ \t]*\n)*(?:[ \t]+\S[^\n]*\n)+)", re.M
)


def _docs_facts(doc: corpora.Document) -> list[tuple[str, str, int, int]]:
    out, seen = [], set()
    for m in _SIG.finditer(doc.text):
        name, params, body = m.group(1), m.group(2).strip(), m.group(3)
        if name in seen:
            continue
        seen.add(name)
        short = name.rsplit(".", 1)[-1]
        if params and len(params) <= 80:
            out.append(
                (
                    f"According to the documentation in {_short(doc)}, what are the parameters of {short}()?",
                    params,
                    m.start(),
                    m.start(2) + len(m.group(2)),
                )
            )
        para = " ".join(l.strip() for l in body.strip().splitlines() if l.strip() and not l.strip().startswith(".. "))
        first = re.match(r"(.{20,240}?[.!?])(?:\s|$)", para)
        if first and not para.startswith(":"):
            out.append(
                (
                    f"According to the documentation in {_short(doc)}, what does {short}() do? "
                    f"Quote the first sentence of its definition.",
                    first.group(1),
                    m.start(),
                    m.end(),
                )
            )
    return out


def _code_facts(doc: corpora.Document) -> list[tuple[str, str, int, int]]:
    try:
        tree = ast.parse(doc.text)
    except (SyntaxError, ValueError):
        return []
    lines = doc.text.splitlines(keepends=True)
    starts = [0]
    for l in lines:
        starts.append(starts[-1] + len(l))

    def pos(lineno, col):  # ast columns are UTF-8 byte offsets; fine for the ASCII-heavy stdlib
        return starts[lineno - 1] + col

    out = []
    names = [n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and names.count(node.name) == 1:
            args = node.args.args + node.args.posonlyargs
            pairs = list(zip(args[len(args) - len(node.args.defaults) :], node.args.defaults))
            pairs += [(a, d) for a, d in zip(node.args.kwonlyargs, node.args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if isinstance(default, ast.Constant) and default.end_lineno == default.lineno:
                    value = ast.get_source_segment(doc.text, default)
                    if value and len(value) <= 40:
                        out.append(
                            (
                                f"In the file {_short(doc)}, what is the default value of the parameter "
                                f"`{arg.arg}` of the function `{node.name}`?",
                                value,
                                pos(node.lineno, node.col_offset),
                                pos(default.end_lineno, default.end_col_offset),
                            )
                        )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if alias.name != "*" and alias.asname is None:
                    out.append(
                        (
                            f"In the file {_short(doc)}, from which module is `{alias.name}` imported?",
                            node.module,
                            pos(node.lineno, node.col_offset),
                            pos(node.end_lineno, node.end_col_offset),
                        )
                    )
    return out


_CHANGE_HEAD = re.compile(r"^(\S+) \(([^)\s]{1,40})\) [^;\n]+; urgency=\w+[^\n]*$", re.M)
_CHANGE_SIGN = re.compile(r"^ -- ([^<\n]{2,60}?) <[^>\n]+>  ([^\n]{10,60})$", re.M)


def _changelog_facts(doc: corpora.Document) -> list[tuple[str, str, int, int]]:
    """Per entry (a "pkg (version) dist; urgency=..." header up to its " -- name <mail>  date" line): who
    signed a version, and when."""
    out = []
    for m in _CHANGE_HEAD.finditer(doc.text):
        sign = _CHANGE_SIGN.search(doc.text, m.end())
        nxt = _CHANGE_HEAD.search(doc.text, m.end())
        if sign is None or (nxt is not None and nxt.start() < sign.start()):
            continue
        pkg, ver = m.group(1), m.group(2)
        out.append(
            (
                f"In the changelog of {pkg}, who signed the entry for version {ver}?",
                sign.group(1).strip(),
                m.start(),
                sign.end(),
            )
        )
        out.append(
            (
                f"In the changelog of {pkg}, on what date was the entry for version {ver} signed?",
                sign.group(2).strip(),
                m.start(),
                sign.end(),
            )
        )
    return out


_FACTS = {"legal": _legal_facts, "docs": _docs_facts, "code": _code_facts, "changelog": _changelog_facts}


def _short(doc: corpora.Document) -> str:
    return doc.name.split(":", 1)[1]


# --- contexts of a token length ------------------------------------------------------------------


class _Tok:
    """Token counting and token-aligned cuts with the family's tokenizer."""

    def __init__(self, tok):
        self.tok = tok

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False))

    def offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]


def _header(doc: corpora.Document, excerpt: bool) -> str:
    return f"### File: {_short(doc)}{' (excerpt)' if excerpt else ''}\n"


def _window(
    tk: _Tok, text: str, lo: int, hi: int, budget: int, rng: random.Random, end_exact: bool = False
) -> tuple[int, int]:
    """A char span [s, e) of text with about `budget` tokens that contains [lo, hi); with end_exact
    it ends exactly at hi. Cuts land on token boundaries, the start on a line start where one is near."""
    offs = tk.offsets(text)
    if not offs:
        return 0, len(text)
    if end_exact:
        e_tok = sum(1 for a, b in offs if b <= hi)
        s_tok, e = max(0, e_tok - budget), hi
    elif len(offs) <= budget:
        return 0, len(text)
    else:
        first = next((i for i, (a, b) in enumerate(offs) if b > lo), len(offs) - 1)
        last = max([i for i, (a, b) in enumerate(offs) if a < hi] or [first])
        lo_tok, hi_tok = max(0, last + 1 - budget), min(first, len(offs) - budget)
        s_tok = rng.randint(lo_tok, hi_tok) if lo_tok <= hi_tok else first
        e = max(offs[min(len(offs), s_tok + budget) - 1][1], hi)
    s = offs[s_tok][0] if s_tok > 0 else 0
    if s > 0:
        nl = text.find("\n", s, s + 200)
        if nl != -1 and nl + 1 <= lo:
            s = nl + 1
    return s, e


def _compose(
    tk: _Tok,
    doc: corpora.Document,
    lo: int,
    hi: int,
    target: int,
    pool: list[corpora.Document],
    rng: random.Random,
    end_exact: bool = False,
) -> str:
    """A context of about `target` tokens holding doc.text[lo:hi] (ending there with end_exact)."""
    header_budget = tk.count(_header(doc, True))
    s, e = _window(tk, doc.text, lo, hi, target - header_budget, rng, end_exact)
    main = _header(doc, s > 0 or e < len(doc.text.rstrip())) + doc.text[s:e]
    if end_exact:
        main = main.rstrip(" \t")
    have = tk.count(main)
    if have >= target - 16:
        return main
    # Fill with other documents of the same domain and part: before the main one (and, unless the
    # context must end at the main document's cut, after it), each whole or trimmed.
    others = [d for d in pool if d.name != doc.name]
    rng.shuffle(others)
    before, after = [], []
    for d in others:
        if have >= target - 16:
            break
        place_after = (not end_exact) and rng.random() < 0.5
        room = target - have
        piece = _header(d, False) + d.text.strip() + "\n\n"
        n = tk.count(piece)
        if n > room:
            offs = tk.offsets(piece)
            if room < 32:
                break
            piece = piece[: offs[room - 1][1]] + "\n\n" if place_after else piece[offs[-room][0] :]
            piece = piece if place_after else _header(d, True) + piece.split("\n", 1)[-1]
            n = tk.count(piece)
        (after if place_after else before).append(piece)
        have += n
    return "".join(before) + main + ("\n\n" + "".join(after) if after else "")


# --- samples -------------------------------------------------------------------------------------


def _qa(tk, docs, domain, target, rng) -> Sample | None:
    cands = [d for d in docs]
    rng.shuffle(cands)
    for doc in cands[:200]:
        facts = _FACTS[domain](doc)
        if not facts:
            continue
        q, a, lo, hi = rng.choice(facts)
        ctx = _compose(tk, doc, lo, hi, target, docs, rng)
        if a not in ctx:
            continue
        return Sample("", "qa", domain, doc.name, ctx, q, a, METRIC_OF["qa"], MAX_TOKENS["qa"])
    return None


def _statement_lines(text: str) -> set[int]:
    """1-based numbers of the lines where a Python statement starts (none if it does not parse)."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    return {n.lineno for n in ast.walk(tree) if isinstance(n, ast.stmt)}


def _line_starts(text: str) -> list[int]:
    return [m.end() for m in re.finditer(r"\n", text)]


def _continuation(tk, docs, domain, kind, target, rng) -> Sample | None:
    cands = list(docs)
    rng.shuffle(cands)
    for doc in cands[:200]:
        text = doc.text
        cuts = []
        stmt_lines = _statement_lines(text) if kind == "code" else set()
        for i, c in enumerate(_line_starts(text)):
            if c < len(text) * 0.3:
                continue
            rest = text[c:]
            if kind == "code":
                line = rest.split("\n", 1)[0]
                s = line.strip()
                if i + 2 in stmt_lines and len(s) >= 12 and not s.startswith(("#", '"', "'")):
                    cuts.append((c, s))
            else:
                # the next 1-3 non-blank lines, 60-200 characters
                lines = [l for l in rest.split("\n")[:6] if l.strip()][:3]
                ref = " ".join(l.strip() for l in lines)
                if 60 <= len(ref) <= 200 and re.search(r"[A-Za-z]{3}", ref):
                    cuts.append((c, ref))
        if not cuts:
            continue
        c, ref = rng.choice(cuts)
        ctx = _compose(tk, doc, c, c, target, docs, rng, end_exact=True)
        q = QUESTIONS[kind]
        return Sample("", kind, domain, doc.name, ctx, q, ref, METRIC_OF[kind], MAX_TOKENS[kind])
    return None


def build(
    tok,
    kind: str = "mixed",
    split: str = "profile",
    n: int = 8,
    *,
    context_tokens: tuple[int, int] | int = DEFAULT_CONTEXT_TOKENS,
    seed: int = 0,
    domains: tuple[str, ...] | None = None,
) -> list[Sample]:
    """`n` samples of `kind` ("mixed" cycles qa/code/summary over the domains) from corpus part
    `split`, contexts of context_tokens (lo, hi) tokens by `tok` (an HF tokenizer); `domains`
    keeps only tasks over those corpus domains (a variant judged on what it was tuned for)."""
    if kind not in DATASET_KINDS:
        raise KvRelayError(f"unknown task kind {kind!r}; known: {', '.join(DATASET_KINDS)}")
    if split not in SPLITS:
        raise KvRelayError(
            f"evaluation data comes from the {' or '.join(SPLITS)} part, not {split!r} (train is the fine-tuning data)"
        )
    lo, hi = (context_tokens, context_tokens) if isinstance(context_tokens, int) else tuple(context_tokens)
    if not (32 <= lo <= hi):
        raise KvRelayError(f"context_tokens must satisfy 32 <= lo <= hi, got {context_tokens!r}")
    if n < 1:
        raise KvRelayError(f"need at least 1 sample, got {n}")
    order = list(MIXED_ORDER) if kind == "mixed" else [(kind, d) for d in DOMAINS_OF[kind]]
    if domains:
        unknown = sorted(set(domains) - {d for ds in DOMAINS_OF.values() for d in ds})
        if unknown:
            raise KvRelayError(f"unknown task domain(s) {', '.join(unknown)}; known: legal, docs, code, changelog")
        order = [(k, d) for k, d in order if d in domains]
        if not order and kind == "mixed":  # a domain outside the fixed mixed order: each kind it has
            order = [(k, d) for k in KINDS for d in DOMAINS_OF[k] if d in domains]
        if not order:
            raise KvRelayError(f"no {kind} task over domain(s) {', '.join(domains)}")
    tk = _Tok(tok)
    out: list[Sample] = []
    used: set[str] = set()
    attempts = 0
    while len(out) < n and attempts < 4 * n + 20:
        k, domain = order[attempts % len(order)]
        rng = random.Random(f"kvrelay-evaldata:{seed}:{split}:{attempts}")
        attempts += 1
        docs = corpora.load_split(domain, split)
        fresh = [d for d in docs if d.name not in used] or docs
        target = rng.randint(lo, hi)
        s = _qa(tk, fresh, domain, target, rng) if k == "qa" else _continuation(tk, fresh, domain, k, target, rng)
        if s is None:
            continue
        used.add(s.doc)
        sid = f"{split}/{k}/{s.doc}/{len(out)}"
        out.append(
            Sample(
                sid,
                *[
                    getattr(s, f)
                    for f in ("kind", "domain", "doc", "context", "question", "answer", "metric", "max_tokens")
                ],
            )
        )
    if len(out) < n:
        raise KvRelayError(f"could only build {len(out)} of {n} {kind} samples from the {split} part")
    return out
