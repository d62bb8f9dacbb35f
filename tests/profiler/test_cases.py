"""Teacher-forced cases: a user's JSONL (every malformed line named), the seeded split, domain text."""

import json

import pytest

from kvrelay.cli import main
from kvrelay.profiler import cases as cs


def _write(tmp_path, lines, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return p


GOOD = {"context": "some context text", "question": "what?", "answer": "that"}


def test_reads_context_question_and_optional_answer(tmp_path):
    p = _write(
        tmp_path, [GOOD, "", {"context": "c2", "question": "q2"}, {"context": "c3", "question": "q3", "answer": None}]
    )
    got = cs.read_jsonl(p)
    assert [c.context for c in got] == ["some context text", "c2", "c3"]
    assert got[0].reference == got[0].answer == "that"
    assert got[1].reference == "" and got[1].answer == ""  # the receiver's own output becomes the reference
    assert got[1].id == "line3"  # ids name the file's line numbers


@pytest.mark.parametrize(
    "bad, msg",
    [
        ("{not json", r"line 2: not a JSON object"),
        ('["a list"]', r"line 2: expected a JSON object"),
        ({"question": "q"}, r"line 2: field 'context' is missing"),
        ({"context": "c"}, r"line 2: field 'question' is missing"),
        ({"context": "", "question": "q"}, r"line 2: field 'context' must be a non-empty string"),
        ({"context": 3, "question": "q"}, r"line 2: field 'context' must be a non-empty string"),
        ({"context": "c", "question": "q", "answer": 7}, r"line 2: field 'answer' must be a string"),
        ({"context": "c", "question": "q", "ctx": "x"}, r"line 2: unknown field\(s\) ctx"),
    ],
)
def test_a_malformed_line_is_named(tmp_path, bad, msg):
    p = _write(tmp_path, [GOOD, bad])
    with pytest.raises(cs.DataError, match=msg):
        cs.read_jsonl(p)


def test_missing_empty_and_binary_files(tmp_path):
    with pytest.raises(cs.DataError, match="no such file"):
        cs.read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(cs.DataError, match="no cases"):
        cs.read_jsonl(_write(tmp_path, ["", "  "]))
    b = tmp_path / "b.jsonl"
    b.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(cs.DataError, match="UTF-8"):
        cs.read_jsonl(b)


def test_cli_names_the_line_and_exits_2(tmp_path, tiny_family, capsys):
    p = _write(tmp_path, [GOOD, GOOD, {"context": "c"}])
    assert main(["eval", "--family", "tiny", "--sender", "base", "--receiver", "code", "--data", str(p), "--json"]) == 2
    assert "line 3: field 'question' is missing" in capsys.readouterr().err


def test_split_is_seeded_disjoint_and_stable_when_lines_are_added(tmp_path):
    base = [{"context": f"context {i}", "question": "q"} for i in range(40)]
    got = cs.read_jsonl(_write(tmp_path, base))
    prof, held = cs.split_cases(got, "profile", 0), cs.split_cases(got, "heldout", 0)
    assert {c.context for c in prof}.isdisjoint({c.context for c in held}) and len(prof) + len(held) == 40
    assert 8 <= len(held) <= 32
    more = cs.read_jsonl(_write(tmp_path, base + [{"context": "new one", "question": "q"}], "more.jsonl"))
    assert {c.context for c in held} <= {c.context for c in cs.split_cases(more, "heldout", 0)}
    assert {c.context for c in cs.split_cases(got, "heldout", 1)} != {c.context for c in held}


def test_domain_cases_are_the_documents_own_next_tokens(tiny_family):
    from kvrelay.model import tokenizer as tk

    tok = tk.load(tiny_family.model_dir("base"))
    got = cs.domain_cases(tok, ("code",), "heldout", 3, (64, 96), ref_tokens=16, seed=0)
    assert len(got) == 3 and len({c.id for c in got}) == 3
    for c in got:
        assert 64 <= len(tk.encode(tok, c.context)) <= 100 and c.question == cs.CONTINUE
        assert 12 <= len(tk.encode(tok, c.reference)) <= 20
    assert [c.id for c in cs.domain_cases(tok, ("code",), "heldout", 3, (64, 96), 16, 0)] == [c.id for c in got]
    assert not {c.id for c in got} & {c.id for c in cs.domain_cases(tok, ("code",), "profile", 3, (64, 96), 16, 0)}
