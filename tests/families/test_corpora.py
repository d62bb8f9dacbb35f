import subprocess
import sys

import pytest

from kvrelay.families import corpora
from kvrelay.families.corpora import Document
from kvrelay.errors import KvRelayError, SourceMissing


@pytest.mark.parametrize("domain", corpora.DOMAINS)
def test_load_documents(domain):
    docs = corpora.load_documents(domain)
    assert len(docs) >= 50
    names = [d.name for d in docs]
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    assert all(n.startswith(domain + ":") for n in names)
    assert all(d.domain == domain for d in docs)
    assert all(len(d.text.strip()) >= corpora.MIN_CHARS for d in docs)
    assert corpora.load_documents(domain) == docs  # deterministic


def test_code_corpus_is_the_stdlib_only():
    names = {d.name for d in corpora.load_documents("code")}
    assert "code:json/decoder.py" in names
    assert not any("site-packages" in n for n in names)


@pytest.mark.parametrize("domain", corpora.DOMAINS)
def test_split_disjoint_covering_deterministic(domain):
    docs = corpora.load_documents(domain)
    parts = {p: corpora.split(docs, p) for p in corpora.PARTS}
    names = {p: {d.name for d in ds} for p, ds in parts.items()}
    assert not names["train"] & names["profile"]
    assert not names["train"] & names["heldout"]
    assert not names["profile"] & names["heldout"]
    assert sum(len(v) for v in names.values()) == len(docs)
    assert all(parts[p] for p in corpora.PARTS)
    assert len(parts["train"]) > len(parts["heldout"]) > len(parts["profile"]) * 0.8
    for p in corpora.PARTS:
        assert corpora.split(docs, p) == parts[p]
        assert corpora.load_split(domain, p) == parts[p]


def test_split_depends_only_on_the_name():
    docs = [Document(f"x:{i}", "t" * 300) for i in range(1000)]
    train = corpora.split(docs, "train")
    assert [d.name for d in train] == [d.name for d in docs if corpora.part_of(d.name) == "train"]
    # order of the input does not change membership
    rev = corpora.split(list(reversed(docs)), "train")
    assert {d.name for d in rev} == {d.name for d in train}
    # roughly 70/10/20
    counts = {p: len(corpora.split(docs, p)) for p in corpora.PARTS}
    assert 620 < counts["train"] < 780 and 50 < counts["profile"] < 150 and 140 < counts["heldout"] < 260


def test_split_is_stable_across_processes():
    # No use of Python's salted hash(): another process with another hash seed agrees.
    names = [f"code:mod{i}.py" for i in range(50)]
    here = [corpora.part_of(n) for n in names]
    code = f"from kvrelay.families.corpora import part_of; print(','.join(part_of(n) for n in {names!r}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": "/usr/bin:/bin"},
    ).stdout.strip()
    assert out.split(",") == here


def test_unknown_part_and_domain():
    with pytest.raises(KvRelayError, match="heldout"):
        corpora.split([], "test")
    with pytest.raises(KvRelayError, match="code, docs, legal"):
        corpora.load_documents("poetry")


def test_missing_docs_source(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "DOCS_SOURCES", tmp_path / "nowhere")
    with pytest.raises(SourceMissing, match="apt-get install python3.11-doc"):
        corpora.load_documents("docs")
    with pytest.raises(SourceMissing):
        corpora.check_source("docs")


def test_missing_legal_source(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "LEGAL_GLOB", str(tmp_path / "*" / "copyright"))
    with pytest.raises(SourceMissing, match="copyright"):
        corpora.load_documents("legal")


def test_missing_code_source(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "code_root", lambda: tmp_path / "nowhere")
    with pytest.raises(SourceMissing, match="standard library"):
        corpora.load_documents("code")


def test_short_and_duplicate_files_skipped(monkeypatch, tmp_path):
    root = tmp_path / "_sources"
    (root / "sub").mkdir(parents=True)
    (root / "a.rst.txt").write_text("x" * 500)
    (root / "sub" / "b.rst.txt").write_text("x" * 500)  # duplicate of a
    (root / "c.rst.txt").write_text("tiny")
    (root / "d.rst.txt").write_text("y" * 500)
    monkeypatch.setattr(corpora, "DOCS_SOURCES", root)
    assert [d.name for d in corpora.load_documents("docs")] == ["docs:a.rst.txt", "docs:d.rst.txt"]
