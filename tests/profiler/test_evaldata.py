"""Offline evaluation tasks: deterministic, from the profile/heldout parts only, answers extractable."""

import pytest

from kvrelay.families import corpora
from kvrelay.profiler import evaldata
from kvrelay.errors import KvRelayError

CTX = (96, 160)


@pytest.fixture(scope="module")
def tok(tiny_family):
    from kvrelay.model import tokenizer as tk

    return tk.load(tiny_family.model_dir("base"))


@pytest.fixture(scope="module")
def mixed(tok):
    return {split: evaldata.build(tok, "mixed", split, 6, context_tokens=CTX, seed=0) for split in evaldata.SPLITS}


def test_mixed_covers_every_kind_with_its_metric(mixed):
    for samples in mixed.values():
        assert {s.kind for s in samples} == {"qa", "summary", "code"}
        assert {s.domain for s in samples} == {"legal", "docs", "code"}
        for s in samples:
            assert s.metric == evaldata.METRIC_OF[s.kind] and s.max_tokens == evaldata.MAX_TOKENS[s.kind]
            assert s.context.strip() and s.question.strip() and s.answer.strip()


def test_samples_come_only_from_their_part(mixed):
    for split, samples in mixed.items():
        for s in samples:
            assert corpora.part_of(s.doc) == split
    assert not {s.doc for s in mixed["profile"]} & {s.doc for s in mixed["heldout"]}


def test_deterministic_given_seed(tok, mixed):
    again = evaldata.build(tok, "mixed", "profile", 6, context_tokens=CTX, seed=0)
    assert again == mixed["profile"]
    other = evaldata.build(tok, "mixed", "profile", 6, context_tokens=CTX, seed=1)
    assert [s.doc for s in other] != [s.doc for s in again]


def test_context_lengths_follow_the_parameter(tok, mixed):
    for s in mixed["heldout"]:
        n = len(tok.encode(s.context, add_special_tokens=False))
        assert CTX[0] - 40 <= n <= CTX[1] + 8, (s.id, n)


def test_answers_are_extractable(mixed):
    docs = {d.name: d.text for dom in corpora.DOMAINS for d in corpora.load_documents(dom)}
    for s in mixed["profile"] + mixed["heldout"]:
        if s.kind == "qa":
            assert s.answer in s.context  # extractive: a span of the context
        else:
            # continuation: the context is the text right before the reference, which it does not hold
            text = docs[s.doc]
            tail = s.context.rstrip()[-40:]
            at = text.find(tail)
            assert at != -1
            nxt = " ".join(text[at + len(tail) :].split())
            assert nxt.startswith(" ".join(s.answer.split()[:3]))


def test_postprocess_takes_first_line_for_qa_and_code(mixed):
    qa = next(s for s in mixed["profile"] if s.kind == "qa")
    assert qa.postprocess("\n  foo bar \nmore") == "foo bar"
    summ = next(s for s in mixed["profile"] if s.kind == "summary")
    assert summ.postprocess(" a\nb ") == "a\nb"


def test_single_kinds_and_bad_arguments(tok):
    code = evaldata.build(tok, "code", "heldout", 2, context_tokens=CTX, seed=0)
    assert {s.kind for s in code} == {"code"}
    with pytest.raises(KvRelayError, match="train is the fine-tuning data"):
        evaldata.build(tok, "qa", "train", 1)
    with pytest.raises(KvRelayError, match="unknown task kind"):
        evaldata.build(tok, "poetry", "profile", 1)
    with pytest.raises(KvRelayError, match="context_tokens"):
        evaldata.build(tok, "qa", "profile", 1, context_tokens=(200, 100))


def test_domains_keep_only_tasks_over_those_corpora(tok):
    legal = evaldata.build(tok, "mixed", "heldout", 4, context_tokens=CTX, domains=("legal",))
    assert {s.domain for s in legal} == {"legal"} and {s.kind for s in legal} == {"qa", "summary"}
    code = evaldata.build(tok, "mixed", "heldout", 4, context_tokens=CTX, domains=("code",))
    assert {s.domain for s in code} == {"code"} and {s.kind for s in code} == {"qa", "code"}
    with pytest.raises(KvRelayError, match="unknown task domain"):
        evaldata.build(tok, "mixed", "heldout", 2, context_tokens=CTX, domains=("medical",))
    with pytest.raises(KvRelayError, match="no summary task over domain"):
        evaldata.build(tok, "summary", "heldout", 2, context_tokens=CTX, domains=("code",))


CHANGELOG = """foo (1.2-1) unstable; urgency=medium

  * New upstream release.

 -- Ada Lovelace <ada@example.org>  Mon, 01 Mar 2021 10:00:00 +0100

foo (1.1-2) unstable; urgency=low

  * Fix the build.

 -- Charles Babbage <cb@example.org>  Tue, 02 Feb 2021 09:00:00 +0000
"""


def test_changelog_facts_are_who_signed_which_version_and_when():
    facts = evaldata._changelog_facts(corpora.Document("changelog:foo/changelog.Debian.gz", CHANGELOG))
    qa = {q: a for q, a, _, _ in facts}
    assert qa["In the changelog of foo, who signed the entry for version 1.2-1?"] == "Ada Lovelace"
    assert (
        qa["In the changelog of foo, on what date was the entry for version 1.1-2 signed?"]
        == "Tue, 02 Feb 2021 09:00:00 +0000"
    )
    for _, a, lo, hi in facts:
        assert a in CHANGELOG[lo:hi]  # the span the context window keeps contains the answer


def test_changelog_tasks_from_the_installed_changelogs(tok):
    for kind in ("qa", "summary"):
        samples = evaldata.build(tok, kind, "heldout", 3, context_tokens=CTX, seed=0, domains=("changelog",))
        assert {s.domain for s in samples} == {"changelog"}
        for s in samples:
            assert corpora.part_of(s.doc) == "heldout"
            if kind == "qa":
                assert s.answer in s.context


def test_mixed_over_a_domain_outside_the_mixed_order_takes_each_kind_it_has(tok):
    samples = evaldata.build(tok, "mixed", "heldout", 4, context_tokens=CTX, seed=0, domains=("changelog",))
    assert {s.domain for s in samples} == {"changelog"} and {s.kind for s in samples} == {"qa", "summary"}
