"""``cairn data instructions``: offline SFT conversations whose answers are computed or looked up, checked here
against independent recomputation (arithmetic re-parsed from the question text, capitals against a few
well-known facts and the table, letters counted again)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from cairn.cli import main
from cairn.data import instructions as ins
from cairn.data.chat import read_conversations
from cairn.errors import CairnError

ROOT = Path(__file__).resolve().parents[2]
HELDOUT = ROOT / "examples" / "cai" / "helpful_heldout.jsonl"


def recompute(question: str) -> int:
    """The answer of a generated arithmetic question, parsed from its text on its own (not with the module's
    parser): two integers and the operation word or symbol."""
    a, b = (int(n) for n in re.findall(r"\d+", question))
    q = question.lower()
    if q.startswith("subtract"):  # "Subtract b from a."
        return b - a
    if "+" in q or "plus" in q or q.startswith("add") or "when you add" in q:
        return a + b
    if " - " in q or "minus" in q:
        return a - b
    if "×" in q or "*" in q or "times" in q or "multipl" in q:
        return a * b
    if "÷" in q or "/" in q or "divide" in q:
        assert a % b == 0, question
        return a // b
    raise AssertionError(f"no operation in {question!r}")


def records(n=400, seed=0, **kw):
    return ins.generate(n, seed, **kw)


def test_arithmetic_answers_are_correct_and_in_the_reply():
    rows = records(kinds="arithmetic")
    assert len(rows) == 400 and {r["kind"] for r in rows} == {"arithmetic"}
    ops = Counter()
    for r in rows:
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["answer"] == str(recompute(q)), q
        assert int(r["answer"]) >= 0
        assert re.search(rf"\b{r['answer']}\b", a), (q, a)
        ops[ins.arithmetic_signature(q)[1]] += 1
    assert set(ops) == {"+", "-", "*", "/"}


KNOWN = {"France": "Paris", "Japan": "Tokyo", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
         "Brazil": "Brasília", "Germany": "Berlin", "India": "New Delhi"}


def test_capitals_come_from_the_table_and_the_table_is_right_where_checked():
    for country, city in KNOWN.items():
        assert ins.CAPITALS[country] == city
    assert len(ins.CAPITALS) >= 50
    for r in records(kinds=["capitals"]):
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        country = next(c for c in ins.CAPITALS if re.search(rf"\b{re.escape(c)}\b", q))
        assert r["answer"] == ins.CAPITALS[country] and r["answer"] in a and country in a


def test_word_and_identity_answers():
    seen = Counter()
    for r in records(n=300, kinds="words,identity", name="Pebble"):
        q, a = r["messages"][0]["content"], r["messages"][1]["content"]
        assert r["answer"].lower() in a.lower(), (q, a)
        if r["kind"] == "identity":
            assert r["answer"] == "Pebble" and q in ins.IDENTITY_QUESTIONS
            seen["identity"] += 1
            continue
        quoted = re.findall(r"'([a-z]+)'", q)
        if "letters" in q:
            assert r["answer"] == str(len(quoted[0]))
            seen["letters"] += 1
        elif "opposite" in q or "antonym" in q:
            w = quoted[0] if quoted else q.rstrip("?").split()[-1]
            assert ins.ANTONYMS[w] == r["answer"]
            seen["antonym"] += 1
        elif "plural" in q or "more than one" in q:
            w = quoted[0] if quoted else q.rstrip("?").split()[-1]
            assert ins.PLURALS[w] == r["answer"]
            seen["plural"] += 1
        else:
            assert ins.DEFINITIONS[r["answer"]] in q
            seen["definition"] += 1
    assert set(seen) == {"identity", "letters", "antonym", "plural", "definition"}


def test_deterministic_by_seed_balanced_and_readable_by_sft(tmp_path):
    a, b, c = records(seed=5), records(seed=5), records(seed=6)
    assert a == b and a != c
    assert Counter(r["kind"] for r in a) == {k: 100 for k in ins.KINDS}
    assert Counter(r["kind"] for r in records(n=10)) == {"arithmetic": 3, "capitals": 3, "identity": 2, "words": 2}
    path = ins.write_jsonl(tmp_path / "sub" / "out.jsonl", a)
    convs = read_conversations(path)
    assert [c.messages for c in convs] == [r["messages"] for r in a]
    assert not list((tmp_path / "sub").glob(".*tmp"))


def test_arithmetic_signature():
    assert ins.arithmetic_signature("What is 17 + 26?") == ((17, 26), "+")
    assert ins.arithmetic_signature("What is 26 plus 17?") == ((17, 26), "+")
    assert ins.arithmetic_signature("Subtract 5 from 12.") == ((12, 5), "-")
    assert ins.arithmetic_signature("What is 50 - 18?") == ((50, 18), "-")
    assert ins.arithmetic_signature("What is 6 x 7?") == ((6, 7), "*")
    assert ins.arithmetic_signature("What is 84 ÷ 7?") == ((84, 7), "/")
    assert ins.arithmetic_signature("What is half of 30?") is None
    assert ins.arithmetic_signature("What is the capital of Peru?") is None


def test_exclude_drops_the_same_questions(tmp_path):
    ex_file = tmp_path / "ex.jsonl"
    ex_file.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "What is the capital of France?", "answer": "Paris"},
        {"prompt": "What is 3 + 4?", "answer": "7"},
        {"prompt": "What is the opposite of hot?", "answer": "cold"},
        {"prompt": "How many letters are in the word 'banana'?", "answer": 6},
    ]) + "\n")
    ex = ins.read_exclusions([ex_file])
    assert ((3, 4), "+") in ex.arith
    rows = records(n=3000, seed=1, exclusions=ex)
    for r in rows:
        q = r["messages"][0]["content"]
        assert "France" not in q and r["answer"] != "Paris"
        assert "'hot'" not in q and " hot?" not in q and "banana" not in q
        if r["kind"] == "arithmetic":
            assert ins.arithmetic_signature(q) != ((3, 4), "+")
    # the shipped held-out set: no capital, word or sum of it is generated from it
    held = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    ex = ins.read_exclusions([HELDOUT])
    sigs = {ins.arithmetic_signature(h["prompt"]) for h in held} - {None}
    for r in records(n=2000, seed=2, exclusions=ex):
        q = r["messages"][0]["content"]
        assert ins.arithmetic_signature(q) not in sigs
        assert not any(ins.contains_phrase(h["prompt"], q) for h in held)


def test_held_out_capitals_and_words_are_not_in_the_tables():
    held = [json.loads(line) for line in HELDOUT.read_text().splitlines()]
    for h in held:
        answers = h["answer"] if isinstance(h["answer"], list) else [h["answer"]]
        if h["kind"] == "capitals":
            assert not any(ins.contains_phrase(h["prompt"], c) for c in ins.CAPITALS), h
            assert not set(answers) & set(ins.CAPITALS.values())
        if h["kind"] == "words":
            # neither the word asked about (a table key) nor the answer (a table value or defined word) is there
            asked = {*ins.ANTONYMS, *ins.PLURALS, *ins.LETTER_WORDS}
            answered = {*ins.ANTONYMS.values(), *ins.PLURALS.values(), *ins.DEFINITIONS}
            assert not any(ins.contains_phrase(h["prompt"], w) for w in asked), h
            assert not set(answers) & answered, h


def test_normalize():
    assert ins.normalize("Brasília!") == "brasilia"
    assert ins.normalize("It is 1,000 grams.") == "it is 1000 grams"
    assert ins.normalize("Pi is 3.14. Done") == "pi is 3.14 done"
    assert ins.contains_phrase("The answer is 12.", "12")
    assert not ins.contains_phrase("The answer is 120.", "12")
    assert ins.contains_phrase("It's New  Delhi.", "new delhi")


def test_cli(tmp_path, capsys):
    out = tmp_path / "d.jsonl"
    assert main(["data", "instructions", "--out", str(out), "--n", "20", "--seed", "3", "--kinds",
                 "arithmetic,identity", "--name", "Pebble", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"out": str(out), "n": 20, "kinds": {"arithmetic": 10, "identity": 10}, "seed": 3}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == ins.generate(20, 3, "arithmetic,identity", "Pebble")
    assert main(["data", "instructions", "--out", str(out), "--n", "8", "--exclude", str(HELDOUT)]) == 0
    assert "wrote 8 conversations" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--kinds", "arithmetic,poems"], "unknown kind(s) poems"),
    (["--kinds", ","], "unknown kind(s) (none given)"),
    (["--n", "0"], "--n must be a positive number"),
    (["--name", " "], "--name must be a non-empty name"),
    (["--exclude", "/nonexistent/held.jsonl"], "--exclude /nonexistent/held.jsonl: no such file"),
])
def test_cli_errors(argv, message, tmp_path, capsys):
    assert main(["data", "instructions", "--out", str(tmp_path / "o.jsonl"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_exclude_file_and_out_dir(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "What is 2 + 2?"}\n{"answer": 3}\n')
    assert main(["data", "instructions", "--out", str(tmp_path / "o.jsonl"), "--exclude", str(bad)]) == 2
    assert f'{bad}:2: no "prompt" string' in capsys.readouterr().err
    assert main(["data", "instructions", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    every = tmp_path / "every.jsonl"
    every.write_text("".join(json.dumps({"prompt": f"capital of {c}?"}) + "\n" for c in ins.CAPITALS))
    with pytest.raises(CairnError, match="removes every country"):
        ins.generate(5, 0, "capitals", exclusions=ins.read_exclusions([every]))
