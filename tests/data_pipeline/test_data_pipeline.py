"""cairn.data: tokenizer training, curation (dedup + quality filters), the split and the packed shards.

Small inputs are written by the tests themselves; one test runs on the real default corpus, which `make` fetches
(`make corpus`)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from cairn.data.corpus import default_corpus_dir, iter_documents, strip_gutenberg
from cairn.data.curate import prepare, split_documents
from cairn.data.shards import is_prepared, load_prepared
from cairn.data.tokenizer_train import BOS, IM_END, IM_START, PAD, train_tokenizer
from cairn.errors import CairnError
from cairn.tokenizer import Tokenizer

WORDS = (
    "the of and to in that with have be for on not by at from this but his her they she which their would there "
    "what about who will when make like time just know take people into year good some could them see other than "
    "then now look only come over think also back after use two how our work first well way even new want because "
    "any these give day most king queen castle river forest night morning letter sword crown garden winter summer "
    "stranger soldier merchant daughter brother music window mountain island harbour lantern mirror promise "
    "silver golden quiet bright ancient gentle bitter hollow honest strange weary eager proud humble swift "
    "walked spoke carried wondered followed answered remembered watched gathered whispered travelled waited"
).split()


def prose(rng: random.Random, n_words: int) -> str:
    """Readable-looking English-like text: sentences of random words, capitalised, with full stops and lines."""
    out, line = [], []
    while sum(len(s.split()) for s in out) < n_words:
        sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
        line.append(sent[0].upper() + sent[1:] + ".")
        if len(line) == 3:
            out.append(" ".join(line))
            line = []
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A corpus with planted duplicates and junk; which documents must survive is known."""
    rng = random.Random(1234)
    root = tmp_path_factory.mktemp("corpus")
    (root / "sub").mkdir()
    good = {}
    for i in range(8):
        path = root / ("sub" if i % 2 else ".") / f"a_good_{i}.txt"
        path.write_text(prose(rng, 300))
        good[str(path.resolve().relative_to(root.resolve()))] = path
    original = (root / "a_good_2.txt").read_text()
    (root / "z_exact_copy.txt").write_text((root / "sub" / "a_good_1.txt").read_text())
    words = original.split(" ")
    for i in (10, 60, 120, 180, 240):  # five words changed out of ~300
        words[i] = "zebra"
    (root / "z_near_copy.txt").write_text(" ".join(words))
    (root / "z_symbols.txt").write_text(
        "\n".join(" | ".join(str(rng.randint(1000, 99999)) for _ in range(8)) for _ in range(40)) + "\n")
    (root / "z_tiny.txt").write_text("Hello there, this is far too short.\n")
    line = "The quick brown foxes jumped over the sleeping dogs and ran to the river.\n"
    (root / "z_repetitive.txt").write_text(line * 60)
    with open(root / "b_lines.jsonl", "w") as f:
        for _ in range(2):
            f.write(json.dumps({"text": prose(rng, 200), "source": "test"}) + "\n")
        f.write(json.dumps({"text": ""}) + "\n")
    return {"root": root, "good": good}


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpus["root"]], 512, out)
    return out


@pytest.fixture(scope="module")
def prepared(corpus, tokenizer_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("prepared")
    report = prepare([corpus["root"]], tokenizer_dir, out, val_fraction=0.25, seed=3)
    return out, report


# ------------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trips_and_keeps_special_tokens_whole(tokenizer_dir):
    tok = Tokenizer.from_hf_dir(tokenizer_dir)
    assert [tok.tok.token_to_id(t) for t in (BOS, IM_START, IM_END, PAD)] == [0, 1, 2, 3]
    assert tok.vocab_size == 512 and tok.bos_id == 0 and tok.eos_ids == {0, 2}
    for text in ["The king walked.\n\n  Then  he spoke\ttwice.\r\n", "naïve café — Grüße, 東京, Ελλάδα",
                 "emoji 👩‍👩‍👧 🎭 and \u200b zero width", "x" * 300, "", " leading space", "a\n"]:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text
        assert BOS not in tok.decode(tok.encode(text), skip_special=True)
        assert tok.encode(text) == [0] + ids  # add_bos_token
    for text, special in [("<|im_start|>", 1), ("x<|im_start|>user", 1), ("word<|im_end|>\n", 2),
                          ("<|endoftext|>The", 0), ("a<|pad|>b", 3)]:
        ids = tok.encode(text, add_bos=False)
        assert ids.count(special) == 1, (text, ids)
        assert tok.decode(ids, skip_special=False) == text


def test_chat_template_renders_and_encodes_like_transformers(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = Tokenizer.from_hf_dir(tokenizer_dir)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the king?"},
                {"role": "assistant", "content": "The king is old."}, {"role": "user", "content": "Und? 👑"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == ("<|endoftext|><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWho is the king?"
                    "<|im_end|>\n<|im_start|>assistant\nThe king is old.<|im_end|>\n<|im_start|>user\nUnd? 👑"
                    "<|im_end|>\n<|im_start|>assistant\n")
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
    ids = tok.encode_chat(messages)
    assert ids[:2] == [0, 1] and ids.count(2) == 4 and ids.count(1) == 5
    hf_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert list(getattr(hf_ids, "input_ids", hf_ids)) == ids
    for s in ["The queen spoke.", "naïve 🎭\n\nx<|im_start|>y", "  two  spaces"]:
        assert hf(s, add_special_tokens=False).input_ids == tok.encode(s, add_bos=False)
        assert hf(s).input_ids == tok.encode(s)
        assert hf.decode(tok.encode(s), skip_special_tokens=True) == tok.decode(tok.encode(s))
    assert hf.eos_token == IM_END and hf.pad_token == PAD and hf.bos_token == BOS
    gen = json.loads((tokenizer_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2, 0]


def test_tokenizer_errors(tmp_path, corpus):
    with pytest.raises(CairnError, match="too small"):
        train_tokenizer([corpus["root"]], 100, tmp_path / "t")
    with pytest.raises(CairnError, match="no such file"):
        train_tokenizer([tmp_path / "missing"], 512, tmp_path / "t")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a .txt")
    with pytest.raises(CairnError, match=r"no \*\.txt or \*\.jsonl"):
        train_tokenizer([tmp_path / "empty"], 512, tmp_path / "t")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(CairnError, match=r"bad\.jsonl:2"):
        train_tokenizer([tmp_path / "bad.jsonl"], 512, tmp_path / "t")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CairnError, match="not UTF-8"):
        train_tokenizer([tmp_path / "latin1.txt"], 512, tmp_path / "t")


def test_default_corpus_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAIRN_CORPUS_DIR", str(tmp_path))
    with pytest.raises(CairnError, match="make corpus"):
        default_corpus_dir()
    (tmp_path / "sonnets_gut.txt").write_text("Shall I compare thee to a summer's day?\n")
    assert default_corpus_dir() == tmp_path


def test_strip_gutenberg():
    body = "HAMLET\n\nTo be, or not to be.\n"
    raw = ("The Project Gutenberg EBook of Hamlet\n\nLicence text...\n*** START OF THIS PROJECT GUTENBERG EBOOK "
           "HAMLET ***\n\n" + body + "\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore licence.\n")
    assert strip_gutenberg(raw) == body
    assert strip_gutenberg(body) == body


# --------------------------------------------------------------------------------------------------- curation
def _rel(corpus, doc_id: str) -> str:
    path, _, line = doc_id.partition(".jsonl:")
    if line:
        path += ".jsonl"
    rel = str(Path(path).resolve().relative_to(corpus["root"].resolve()))
    return f"{rel}:{line}" if line else rel


def test_curation_removes_planted_duplicates_and_junk(corpus, prepared):
    out, report = prepared
    removed = {_rel(corpus, k): v for k, v in report["removed_documents"].items()}
    assert removed.pop("z_exact_copy.txt") == "exact_duplicate"
    assert removed.pop("z_near_copy.txt") == "near_duplicate"
    assert removed.pop("z_symbols.txt") == "gopher_below_alpha_threshold"
    assert removed.pop("z_tiny.txt") == "gopher_short_doc"
    assert removed.pop("b_lines.jsonl:3") == "gopher_short_doc"  # the empty "text"
    assert removed.pop("z_repetitive.txt") == "gopher_repetition_dup_line_frac"
    assert removed == {}
    assert report["documents_in"] == 8 + 5 + 3
    assert report["documents_kept"] == 10  # the 8 good files and 2 good jsonl lines
    assert report["removed"]["exact_duplicate"] == 1 and report["removed"]["near_duplicate"] == 1
    assert report["removed"]["gopher_short_doc"] == 2 and report["removed"]["gopher_below_alpha_threshold"] == 1
    assert sum(report["removed"].values()) == report["documents_in"] - report["documents_kept"]
    docs = list(iter_documents([corpus["root"]]))
    assert report["bytes_in"] == sum(len(d.text.encode()) for d in docs)
    kept = [d for d in docs if d.id not in report["removed_documents"]]
    assert report["bytes_kept"] == sum(len(d.text.encode()) for d in kept)
    assert not any((out / name).exists() for name in out.iterdir() if name.name.startswith(".curate-"))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))


def test_split_is_by_document_and_seeded(corpus, tokenizer_dir, prepared, tmp_path):
    out, report = prepared
    assert report["documents"] == {"train": 8, "val": 2}  # round(10 * 0.25)
    again = prepare([corpus["root"]], tokenizer_dir, tmp_path / "again", val_fraction=0.25, seed=3)
    assert again["val_documents"] == report["val_documents"]
    for a, b in [("train.bin", "train.bin"), ("val.bin", "val.bin")]:
        assert (out / a).read_bytes() == (tmp_path / "again" / b).read_bytes()
    for n in range(0, 12):
        for frac in (0.0, 0.01, 0.1, 0.5, 0.9):
            train, val = split_documents(n, frac, seed=7)
            assert sorted(train + val) == list(range(n)) and not set(train) & set(val)
            assert (len(val) >= 1) == (frac > 0 and n >= 2)
            assert n == 0 or len(train) >= 1
            assert split_documents(n, frac, seed=7) == (train, val)
    assert {tuple(split_documents(20, 0.2, s)[1]) for s in range(5)}.__len__() > 1


def test_packed_shards_hold_each_document_at_its_offset(corpus, prepared):
    out, report = prepared
    assert is_prepared(out)
    data = load_prepared(out)
    tok = Tokenizer.from_hf_dir(data.tokenizer_dir)
    meta = data.meta
    assert meta["format"] == 1 and meta["dtype"] == "uint16" and meta["vocab_size"] == 512 and meta["bos_id"] == 0
    docs = {d.id: d.text for d in iter_documents([corpus["root"]])}
    kept = [i for i in docs if i not in report["removed_documents"]]
    split_ids = {"val": [i for i in kept if i in report["val_documents"]],
                 "train": [i for i in kept if i not in report["val_documents"]]}
    for split, ids in split_ids.items():
        tokens, starts = data.tokens(split), data.doc_starts(split)
        assert starts.dtype == np.int64 and len(starts) == len(ids) == meta["splits"][split]["documents"]
        ends = list(starts[1:]) + [len(tokens)]
        for doc_id, s, e in zip(ids, starts, ends, strict=True):
            assert tokens[s] == data.bos_id
            assert tokens[s:e].tolist() == [0] + tok.encode(docs[doc_id], add_bos=False)
        assert int((np.asarray(tokens) == data.bos_id).sum()) == len(ids)
        assert meta["splits"][split]["tokens"] == len(tokens) == report["tokens"][split]
        assert meta["splits"][split]["bytes"] == sum(len(docs[i].encode()) for i in ids)
    assert sorted(p.name for p in (out / "tokenizer").iterdir()) == \
        ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def test_prepare_and_load_errors(corpus, tokenizer_dir, prepared, tmp_path, monkeypatch):
    with pytest.raises(CairnError, match="no tokenizer.json"):
        prepare([corpus["root"]], tmp_path / "nowhere", tmp_path / "o")
    with pytest.raises(CairnError, match="val-fraction"):
        prepare([corpus["root"]], tokenizer_dir, tmp_path / "o", val_fraction=1.0)
    with pytest.raises(CairnError, match="no such file"):
        prepare([tmp_path / "missing.txt"], tokenizer_dir, tmp_path / "o")
    (tmp_path / "junk.txt").write_text("%% $$ ^^\n")
    with pytest.raises(CairnError, match="removed every document"):
        prepare([tmp_path / "junk.txt"], tokenizer_dir, tmp_path / "o")
    assert not is_prepared(tmp_path / "o")
    out, _ = prepared
    again = tmp_path / "again"
    shutil.copytree(out, again)
    with pytest.raises(CairnError, match="removed every document"):  # a failed curation leaves it as it was
        prepare([tmp_path / "junk.txt"], tokenizer_dir, again)
    assert load_prepared(again).meta == load_prepared(out).meta

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("cairn.data.curate._copy_tokenizer", crash)  # interrupted while writing
    with pytest.raises(KeyboardInterrupt):
        prepare([corpus["root"]], tokenizer_dir, again)
    assert not is_prepared(again)
    with pytest.raises(CairnError, match="not a prepared data directory"):
        load_prepared(again)

    with pytest.raises(CairnError, match="no such directory"):
        load_prepared(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(CairnError, match="not a prepared data directory.*cairn data prepare"):
        load_prepared(tmp_path / "half")
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    with open(broken / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(CairnError, match="train.bin.*truncated"):
        load_prepared(broken)
    (broken / "meta.json").write_text("{not json")
    assert not is_prepared(broken)
    with pytest.raises(CairnError, match="corrupt"):
        load_prepared(broken)


def test_cli_prepare_and_tokenizer(corpus, tmp_path, capsys):
    import argparse

    from cairn.data import cli

    parser = argparse.ArgumentParser(prog="cairn")
    sub = parser.add_subparsers(dest="verb")
    cli.add_parser(sub)
    train_sub = sub.add_parser("train").add_subparsers(dest="train_cmd")
    cli.add_tokenizer_parser(train_sub)
    args = parser.parse_args(["train", "tokenizer", "--data", str(corpus["root"]), "--vocab-size", "400",
                              "--out", str(tmp_path / "tok"), "--json"])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["vocab_size"] == 400 and summary["special_tokens"] == {BOS: 0, IM_START: 1, IM_END: 2, PAD: 3}
    args = parser.parse_args(["data", "prepare", "--data", str(corpus["root"]), "--tokenizer", str(tmp_path / "tok"),
                              "--out", str(tmp_path / "prep"), "--seed", "1"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "near_duplicate" in table and "gopher_short_doc" in table and "train" in table
    assert load_prepared(tmp_path / "prep").meta["vocab_size"] == 400


# ----------------------------------------------------------------------------------------- the default corpus
def test_default_corpus_prepares_whole(tmp_path):
    try:
        corpus_dir = default_corpus_dir()
    except CairnError as e:
        pytest.fail(f"the default corpus is missing; run `make corpus` ({e})")
    files = sorted(corpus_dir.glob("*_gut.txt"))
    assert len(files) == 42
    train_tokenizer([corpus_dir], 4096, tmp_path / "tok")
    report = prepare([corpus_dir], tmp_path / "tok", tmp_path / "prep")
    assert report["documents_in"] == 42 and report["documents_kept"] == 42  # every play and poem is kept
    assert set(report["removed"].values()) == {0}
    assert report["documents"] == {"train": 38, "val": 4}
    assert 3.2 < report["bytes_per_token"] < 3.6  # measured 3.39 at 4096
    data = load_prepared(tmp_path / "prep")
    assert data.meta["dtype"] == "uint16"
    assert report["tokens"]["train"] + report["tokens"]["val"] > 1_400_000
    hamlet = next(d for d in iter_documents([corpus_dir]) if d.id.endswith("hamlet_gut.txt"))
    assert hamlet.text.startswith("HAMLET, PRINCE OF DENMARK")
