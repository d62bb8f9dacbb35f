"""Teacher-forced evaluation cases: a shared context, the request's question, a reference continuation.

Two sources, one type:
  - built-in (`domain_cases`): a held-out document of the receiver's own domain is cut at a line
    start; the context is the text before the cut, the reference the document's next `ref_tokens`
    tokens ("Continue the text above."): the text a fine-tune was tuned to predict;
  - a user's JSONL file (`read_jsonl`): one object per line, `context` and `question` (strings,
    required), `answer` (optional). The reference is the answer when given, else the receiver's
    own greedy full-prefill output (filled in by the scorer).
`split_cases` splits a user's file into profile and held-out parts by a seeded hash of each line's
context, so the same file and seed always give the same parts and adding lines moves no old one.
No torch import here.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import KvRelayError
from kvrelay.families import corpora

CONTINUE = "Continue the text above."
HELDOUT_SHARE = 0.5  # of a user's file: the rest profiles
DEFAULT_REF_TOKENS = 64


class DataError(KvRelayError):
    """A user's data file that cannot be read as cases (the message names the file and line)."""


@dataclass(frozen=True)
class Case:
    id: str
    domain: str  # corpus domain, or "user" for a user's file
    context: str  # what the donor's KV covers
    question: str  # the request's own part
    reference: str  # the continuation scored position by position ("": the receiver's own output)
    answer: str = ""  # a task answer (user data), scored with token F1 when given


# --- a user's JSONL ---------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[Case]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"--data {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"--data {path}: cannot read it as UTF-8 text ({e})") from None
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {no}"
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise DataError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"{where}: expected a JSON object with context, question and optional answer, got {type(obj).__name__}"
            )
        for key in ("context", "question"):
            if key not in obj:
                raise DataError(f"{where}: field {key!r} is missing")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string")
        answer = obj.get("answer", "")
        if answer is None:
            answer = ""
        if not isinstance(answer, str):
            raise DataError(f"{where}: field 'answer' must be a string when given, got {type(answer).__name__}")
        unknown = sorted(set(obj) - {"context", "question", "answer", "id"})
        if unknown:
            raise DataError(f"{where}: unknown field(s) {', '.join(unknown)} (expected context, question, answer)")
        out.append(Case(str(obj.get("id", f"line{no}")), "user", obj["context"], obj["question"], answer, answer))
    if not out:
        raise DataError(f"--data {path}: no cases (one JSON object per line: context, question, optional answer)")
    return out


def split_cases(cases: list[Case], part: str, seed: int = 0) -> list[Case]:
    """The `part` ("profile" or "heldout") of a user's cases: a seeded hash of each context decides."""
    if part not in ("profile", "heldout"):
        raise KvRelayError(f"a part is profile or heldout, not {part!r}")

    def heldout(c: Case) -> bool:
        h = hashlib.sha256(f"{seed}\x00{c.context}".encode()).digest()
        return int.from_bytes(h[:8], "big") / 2**64 < HELDOUT_SHARE

    return [c for c in cases if heldout(c) == (part == "heldout")]


# --- built-in: the receiver's own domain text -------------------------------------------------------


def domain_cases(
    tok,
    domains: tuple[str, ...],
    split: str,
    n: int,
    context_tokens: tuple[int, int],
    ref_tokens: int = DEFAULT_REF_TOKENS,
    seed: int = 0,
) -> list[Case]:
    """n cases from held-out/profile documents of `domains` (cycled), each a context of
    context_tokens (lo, hi) tokens by `tok` ending at a line start and the next ref_tokens tokens."""
    if split not in ("profile", "heldout"):
        raise KvRelayError(f"cases come from the profile or heldout part, not {split!r}")
    lo, hi = context_tokens
    out: list[Case] = []
    used: set[str] = set()
    for attempt in range(8 * n + 20):
        if len(out) == n:
            break
        domain = domains[attempt % len(domains)]
        rng = random.Random(f"kvrelay-cases:{seed}:{split}:{attempt}")
        docs = [d for d in corpora.load_split(domain, split) if d.name not in used]
        rng.shuffle(docs)
        target = rng.randint(lo, hi)
        for doc in docs[:50]:
            ids = tok(doc.text, add_special_tokens=False, return_offsets_mapping=True)
            offs = ids["offset_mapping"]
            if len(offs) < target + ref_tokens + 8:
                continue
            # cut at a line start with a full context before it and a full reference after it
            starts = [
                i for i in range(target, len(offs) - ref_tokens) if offs[i][0] > 0 and doc.text[offs[i][0] - 1] == "\n"
            ]
            if not starts:
                continue
            i = rng.choice(starts)
            c0, cut, end = offs[i - target][0], offs[i][0], offs[i + ref_tokens - 1][1]
            used.add(doc.name)
            out.append(
                Case(f"{split}/{domain}/{doc.name}/{len(out)}", domain, doc.text[c0:cut], CONTINUE, doc.text[cut:end])
            )
            break
    if len(out) < n:
        raise KvRelayError(
            f"could only build {len(out)} of {n} cases over {', '.join(domains)} from the {split} part "
            f"with {lo}-{hi}-token contexts and {ref_tokens}-token references"
        )
    return out
