"""Text corpora read from what this machine already has installed: no downloads.

Domains:
  code   the running interpreter's standard library sources (``sysconfig`` "stdlib", ``*.py``)
  docs   the Python documentation sources of Debian's ``python3.11-doc`` (``*.rst.txt``)
  legal  Debian package copyright files (``/usr/share/doc/*/copyright``)
  changelog  Debian package changelogs (``/usr/share/doc/*/changelog.Debian.gz``): release notes, the
         fourth domain of the ``smol-lora`` family

``load_documents(domain)`` gives the documents in a deterministic order; ``split(docs, part)``
assigns each document to exactly one of "train" (fine-tuning), "profile" and "heldout"
(evaluation) by a stable hash of its name, so a document never moves between parts from one run,
process or machine to the next.
"""

from __future__ import annotations

import functools
import glob
import gzip
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kvrelay.errors import KvRelayError, SourceMissing

DOMAINS: tuple[str, ...] = ("code", "docs", "legal", "changelog")
# The domains the first families (tiny, smol, smol-quick) were built and evaluated on: their builds stay as they were.
FIRST_DOMAINS: tuple[str, ...] = ("code", "docs", "legal")
PARTS: tuple[str, ...] = ("train", "profile", "heldout")
# Percent of documents in each part, in PARTS order.
SPLIT_PERCENT: tuple[int, ...] = (70, 10, 20)
# Documents shorter than this (after stripping whitespace) are skipped as empty / trivial.
MIN_CHARS = 200

# Source locations, module-level so tests (and unusual machines) can point them elsewhere.
DOCS_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
LEGAL_GLOB = "/usr/share/doc/*/copyright"
CHANGELOG_GLOB = "/usr/share/doc/*/changelog.Debian.gz"


def code_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass(frozen=True)
class Document:
    name: str  # "<domain>:<path relative to the source root>", stable across machines
    text: str

    @property
    def domain(self) -> str:
        return self.name.split(":", 1)[0]


def _read(path: Path) -> str | None:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        return path.read_text(encoding="utf-8", errors="replace")
    except (OSError, EOFError):
        return None


def _collect(domain: str, paths: list[tuple[str, Path]]) -> list[Document]:
    """Documents from (relative name, path) pairs: sorted by name, short ones and exact duplicates
    (same text under another name, kept once under the first name) dropped."""
    docs, seen = [], set()
    for rel, path in sorted(paths):
        text = _read(path)
        if text is None or len(text.strip()) < MIN_CHARS:
            continue
        digest = hashlib.sha1(text.encode("utf-8", "replace")).digest()
        if digest in seen:
            continue
        seen.add(digest)
        docs.append(Document(f"{domain}:{rel}", text))
    return docs


def _code_paths() -> list[tuple[str, Path]]:
    root = code_root()
    if not root.is_dir():
        raise SourceMissing(
            f"corpus 'code': the Python standard library sources are not at {root} "
            "(reinstall Python with its .py sources, e.g. apt-get install libpython3.11-stdlib)"
        )
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Third-party packages installed into the interpreter are not the standard library.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for f in filenames:
            if f.endswith(".py"):
                p = Path(dirpath) / f
                out.append((p.relative_to(root).as_posix(), p))
    if not out:
        raise SourceMissing(
            f"corpus 'code': no *.py files under {root} (the interpreter ships without its standard library sources)"
        )
    return out


def _docs_paths() -> list[tuple[str, Path]]:
    root = Path(DOCS_SOURCES)
    files = sorted(root.rglob("*.rst.txt")) if root.is_dir() else []
    if not files:
        raise SourceMissing(
            f"corpus 'docs': no Python documentation sources (*.rst.txt) under {root}; "
            "run: apt-get install python3.11-doc"
        )
    return [(p.relative_to(root).as_posix(), p) for p in files]


def _package_doc_paths(domain: str, pattern: str, what: str) -> list[tuple[str, Path]]:
    """Per-package files under /usr/share/doc, named "<package>/<file>"."""
    files = [Path(p) for p in sorted(glob.glob(pattern))]
    files = [p for p in files if p.is_file()]
    if not files:
        raise SourceMissing(
            f"corpus {domain!r}: no package {what} match {pattern} "
            "(the system image strips /usr/share/doc; on Debian/Ubuntu remove the "
            "path-exclude for /usr/share/doc in /etc/dpkg/dpkg.cfg.d/ and reinstall packages)"
        )
    return [(f"{p.parent.name}/{p.name}", p) for p in files]


def _legal_paths() -> list[tuple[str, Path]]:
    return _package_doc_paths("legal", LEGAL_GLOB, "copyright files")


def _changelog_paths() -> list[tuple[str, Path]]:
    return _package_doc_paths("changelog", CHANGELOG_GLOB, "changelogs")


_PATHS = {"code": _code_paths, "docs": _docs_paths, "legal": _legal_paths, "changelog": _changelog_paths}


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise KvRelayError(f"unknown corpus domain {domain!r}; known domains: {', '.join(DOMAINS)}")


def check_source(domain: str) -> None:
    """Raise SourceMissing (naming the fix) if the domain's source files are not installed."""
    _check_domain(domain)
    _PATHS[domain]()


@functools.lru_cache(maxsize=None)
def _load_cached(domain: str, key: tuple) -> tuple[Document, ...]:
    docs = _collect(domain, _PATHS[domain]())
    if not docs:
        raise SourceMissing(f"corpus {domain!r}: every source file is empty or shorter than {MIN_CHARS} characters")
    return tuple(docs)


def _source_key(domain: str) -> tuple:
    # The cache is keyed by where the sources are, so pointing a source elsewhere (tests) re-reads.
    return {
        "code": lambda: (str(code_root()),),
        "docs": lambda: (str(DOCS_SOURCES),),
        "legal": lambda: (LEGAL_GLOB,),
        "changelog": lambda: (CHANGELOG_GLOB,),
    }[domain]()


def load_documents(domain: str) -> list[Document]:
    """All documents of a domain, sorted by name; SourceMissing if its sources are not installed."""
    _check_domain(domain)
    return list(_load_cached(domain, _source_key(domain)))


def part_of(name: str) -> str:
    """The part ("train", "profile", "heldout") a document name belongs to: stable hash, no state."""
    bucket = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") % 100
    edge = 0
    for part, pct in zip(PARTS, SPLIT_PERCENT):
        edge += pct
        if bucket < edge:
            return part
    raise AssertionError("SPLIT_PERCENT must sum to 100")


def split(docs: list[Document], part: str) -> list[Document]:
    """The documents of one part, in their given order. Parts are disjoint and cover all documents."""
    if part not in PARTS:
        raise KvRelayError(f"unknown corpus part {part!r}; known parts: {', '.join(PARTS)}")
    return [d for d in docs if part_of(d.name) == part]


def load_split(domain: str, part: str) -> list[Document]:
    return split(load_documents(domain), part)
