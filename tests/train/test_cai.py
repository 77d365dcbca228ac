"""Constitutional AI: the constitution's errors, critique-and-revision data that `cairn train sft` reads, AI
preference labels equal to the (A)/(B) probabilities of an independent forward pass and accepted by `cairn train
dpo`, violation scores equal to independent Yes/No logit differences, and L_viol / R equal to their formulas."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cairn.config import ModelConfig
from cairn.data.tokenizer_train import train_tokenizer
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.train.cai import (
    CHOICE_PREFILL,
    Constitution,
    choice_messages,
    constitution_reward,
    critique_messages,
    label_pairs,
    load_constitution,
    next_token_logits,
    option_token_ids,
    revise,
    revision_messages,
    violation_messages,
    violation_penalty,
    violation_scores,
)
from cairn.weights import LoadedModel

PROMPTS = ["How do I boil an egg?", "Tell me a secret about my neighbour.", "What is two plus two?"]
REPLIES = ["Put it in boiling water for eight minutes.", "I will not share that.", "Two plus two is four."]


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """A small byte-level BPE with ChatML: trained on the constitution and a few answers, so that "Yes" and
    "No" are single tokens (as in SmolLM2's vocabulary); "A" and "B" are bytes, always single tokens."""
    d = tmp_path_factory.mktemp("cai-tok")
    con = load_constitution()
    words = " ".join(f"{p.principle} {p.critique} {p.revision}" for p in con)
    text = "\n".join([words, *PROMPTS, *REPLIES] + ["Yes. No. Yes, No, Yes! No! (A) (B)"] * 40) * 3
    (d / "text.txt").write_text(text)
    tok = train_tokenizer([d / "text.txt"], 420, d / "tok", progress=False)
    assert len(tok.encode("Yes", add_bos=False)) == 1 and len(tok.encode("No", add_bos=False)) == 1
    return tok


def tiny(tok, seed=0) -> LoadedModel:
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=1024, tie_embeddings=True, arch="llama", name="tiny")
    torch.manual_seed(seed)
    model = build_model(cfg).init_weights(std=0.5, seed=seed).eval().requires_grad_(False)
    return LoadedModel(model, tok, cfg, Path("tiny"), "tiny")


@pytest.fixture(scope="module")
def judge(tok):
    return tiny(tok)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    from cairn.weights.native import save_checkpoint

    lm = tiny(tok)
    return save_checkpoint(tmp_path_factory.mktemp("cai-model") / "tiny", lm.model, lm.config, tok)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def reference_next_logits(lm: LoadedModel, messages: list[dict], prefill: str) -> tuple[str, torch.Tensor]:
    """The test's own forward pass: the prompt string built here, tokenised whole, one unpadded sequence."""
    tok = lm.tokenizer
    text = tok.apply_chat_template(messages, add_generation_prompt=True) + prefill
    ids = tok.encode(text, add_bos=False)
    with torch.no_grad():
        return text, lm.model(torch.tensor([ids]), last_only=True)[0, -1].double()


def reference_choice(lm, prompt, first, second, principle) -> tuple[float, float, float]:
    """P(first better) shown as (A), shown as (B), and their average, from this test's own forward passes."""
    a_id, b_id = lm.tokenizer.tok.token_to_id("A"), lm.tokenizer.tok.token_to_id("B")
    out = []
    for msgs in (choice_messages(prompt, first, second, principle), choice_messages(prompt, second, first, principle)):
        text, logits = reference_next_logits(lm, msgs, "The better reply is (")
        assert text.endswith("<|im_start|>assistant\nThe better reply is (")
        la, lb = logits[a_id].item(), logits[b_id].item()
        out.append(math.exp(la) / (math.exp(la) + math.exp(lb)))
    as_a, as_b = out[0], 1 - out[1]
    return as_a, as_b, (as_a + as_b) / 2


def reference_violation(lm, prompt, reply, principle) -> float:
    yes, no = lm.tokenizer.tok.token_to_id("Yes"), lm.tokenizer.tok.token_to_id("No")
    text, logits = reference_next_logits(lm, violation_messages(prompt, reply, principle), "")
    assert text.endswith("Answer Yes or No.<|im_end|>\n<|im_start|>assistant\n")
    lp = torch.log_softmax(logits, 0)
    return (lp[yes] - lp[no]).item()


# ------------------------------------------------------------------------------------------ constitution
def test_default_constitution_and_loading_errors(tmp_path):
    con = load_constitution()
    assert len(con) == 8 and len({p.id for p in con}) == 8 and con.get("harm").id == "harm"
    good = "principles:\n  - id: a\n    principle: Be kind.\n    critique: Is it unkind?\n    revision: Be kinder.\n"
    path = tmp_path / "c.yaml"
    path.write_text(good)
    assert [p.id for p in load_constitution(path)] == ["a"]
    cases = [
        ("principles: [unclosed\n", "not valid YAML"),
        ("rules: []\n", "needs a non-empty list under 'principles:'"),
        ("principles: []\n", "needs a non-empty list"),
        ("principles:\n  - just a string\n", "principle 1 is a str"),
        (good.replace("    revision: Be kinder.\n", ""), "principle 1 needs a non-empty string 'revision'"),
        (good.replace("Be kind.", "''"), "needs a non-empty string 'principle'"),
        (good + "    weight: 2\n", "unknown field(s) weight"),
        (good + good.replace("principles:\n", ""), "principle 2: id 'a' is used twice"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(CairnError, match=re_escape(message)) as e:
            load_constitution(path)
        assert str(path) in str(e.value)
    with pytest.raises(CairnError, match="no such file"):
        load_constitution(tmp_path / "missing.yaml")
    with pytest.raises(CairnError, match="no principle 'nope'"):
        con.get("nope")


def re_escape(s: str) -> str:
    import re

    return re.escape(s)


# --------------------------------------------------------------------------------------- reading logits
def test_batched_next_token_logits_equal_one_by_one(judge, tok):
    seqs = [tok.encode(t) for t in ["Yes.", "How do I boil an egg? Put it in water.", "No", "(A) (B) Yes No" * 3]]
    got = next_token_logits(judge.model, seqs, max_batch_tokens=40)  # several batches, padded rows
    for s, row in zip(seqs, got, strict=True):
        with torch.no_grad():
            ref = judge.model(torch.tensor([s]))[0, -1]
        torch.testing.assert_close(row, ref, atol=1e-5, rtol=1e-5)


def test_options_must_be_single_next_tokens(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}]) + CHOICE_PREFILL
    ids = tok.encode(text)
    assert option_token_ids(tok, text, ids, ("A", "B")) == [tok.tok.token_to_id("A"), tok.tok.token_to_id("B")]
    with pytest.raises(CairnError, match="does not write 'Zebrafish' as one token"):
        option_token_ids(tok, text, ids, ("A", "Zebrafish"))
    with pytest.raises(CairnError, match="chat template"):
        from cairn.tokenizer import Tokenizer

        plain = Tokenizer(tok.tok, chat_template=None)
        violation_scores(_with_tok(plain), load_constitution(), ["q"], ["a"])


def _with_tok(tok):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=64, tie_embeddings=True, arch="llama", name="x")
    return LoadedModel(build_model(cfg).init_weights(seed=0).eval(), tok, cfg, Path("x"), "x")


# --------------------------------------------------------------------------------------- violation scores
def test_violation_scores_equal_independent_yes_no_logits(judge):
    con = load_constitution()
    scores = violation_scores(judge, con, PROMPTS, REPLIES, max_batch_tokens=700)
    assert len(scores) == len(PROMPTS)
    for prompt, reply, s in zip(PROMPTS, REPLIES, scores, strict=True):
        assert list(s) == [p.id for p in con]
        for p in con:
            assert s[p.id] == pytest.approx(reference_violation(judge, prompt, reply, p), abs=1e-4)
    flat = [v for s in scores for v in s.values()]
    assert max(flat) - min(flat) > 0.05  # the random judge's scores differ: a wrong pairing would show
    assert any(v > 0 for v in flat) and any(v < 0 for v in flat)
    with pytest.raises(CairnError, match="3 prompts but 2 replies"):
        violation_scores(judge, con, PROMPTS, REPLIES[:2])
    with pytest.raises(CairnError, match="loaded model"):
        violation_scores(object(), con, PROMPTS, REPLIES)


def test_penalty_and_reward_follow_their_formulas(judge):
    assert violation_penalty({"a": 0.5, "b": -2.0, "c": 0.0, "d": 3.0}) == pytest.approx(0.25 + 9.0)
    assert violation_penalty({"a": -1.0, "b": 0.0}) == 0.0
    assert violation_penalty({}) == 0.0
    con = load_constitution()
    scores = violation_scores(judge, con, PROMPTS, REPLIES)
    by_hand = [sum(r * r for r in s.values() if r > 0) for s in scores]
    assert any(x > 0 for x in by_hand)

    def human(prompts, completions):
        return [len(c) / 10 for c in completions]

    lam = 0.3
    got = constitution_reward(judge, con, human, lam)(PROMPTS, REPLIES)
    want = [len(c) / 10 - lam * pen for c, pen in zip(REPLIES, by_hand, strict=True)]
    assert got == pytest.approx(want, abs=1e-6)
    assert constitution_reward(judge, con, None, 2.0)(PROMPTS, REPLIES) == pytest.approx([-2 * p for p in by_hand])
    assert constitution_reward(judge, con, human, 0)(PROMPTS, REPLIES) == pytest.approx(human(PROMPTS, REPLIES))
    for bad in (-0.1, float("nan"), "0.2"):
        with pytest.raises(CairnError, match="lambda must be"):
            constitution_reward(judge, con, None, bad)
    with pytest.raises(CairnError, match="gave 1 scores for 3"):
        constitution_reward(judge, con, lambda p, c: [0.0], 0.1)(PROMPTS, REPLIES)


# --------------------------------------------------------------------------------------------- the labeller
def test_soft_labels_equal_the_option_probabilities(judge):
    con = load_constitution()
    pairs = list(zip(REPLIES, reversed(REPLIES), strict=True))
    out = label_pairs(judge, con, PROMPTS, pairs, seed=3, max_batch_tokens=600)
    rng = random.Random(3)
    drawn = [con.draw(rng) for _ in PROMPTS]
    assert [r["principle"] for r in out] == [p.id for p in drawn]
    for prompt, (a, b), p, rec in zip(PROMPTS, pairs, drawn, out, strict=True):
        as_a, as_b, p_first = reference_choice(judge, prompt, a, b, p)
        assert rec["p_first_as_a"] == pytest.approx(as_a, abs=1e-5)
        assert rec["p_first_as_b"] == pytest.approx(as_b, abs=1e-5)
        assert rec["p_first"] == pytest.approx(p_first, abs=1e-5)
        first_wins = p_first >= 0.5
        assert (rec["chosen"], rec["rejected"]) == ((a, b) if first_wins else (b, a))
        assert rec["p_chosen"] == pytest.approx(max(p_first, 1 - p_first), abs=1e-5) and rec["p_chosen"] >= 0.5
        assert all(0 < m <= 1 for m in rec["option_mass"])
    assert len({round(r["p_first"], 6) for r in out}) == len(out)  # not a constant
    # the same pair in the other order gets the complementary label: position bias cancels exactly
    swapped = label_pairs(judge, con, PROMPTS, [(b, a) for a, b in pairs], seed=3)
    for x, y in zip(out, swapped, strict=True):
        assert x["p_first"] == pytest.approx(1 - y["p_first"], abs=1e-6)


def test_labels_and_scores_on_the_default_model():
    """The real tokenizer: "A"/"B" after "(" and "Yes"/"No" after the assistant header are single tokens, and the
    numbers equal this test's own forward passes through SmolLM2-135M-Instruct."""
    from cairn.weights import default_model_path_or_none, load_model

    if default_model_path_or_none() is None:
        pytest.skip("the bundled SmolLM2-135M-Instruct is not installed")
    lm = load_model(None)
    full = load_constitution()
    con = Constitution((full.get("helpful"),), "one of the default principles")
    tok = lm.tokenizer
    assert tok.encode(CHOICE_PREFILL + "A", add_bos=False)[-1] == tok.tok.token_to_id("A")
    prompt, first, second = "What is the capital of France?", "Paris is the capital of France.", "Go away."
    rec = label_pairs(lm, con, [prompt], [(first, second)], seed=1)[0]
    _, _, p_first = reference_choice(lm, prompt, first, second, con.get(rec["principle"]))
    assert rec["p_first"] == pytest.approx(p_first, abs=1e-4)
    assert min(rec["option_mass"]) > 0.5  # the model answers in the asked form
    s = violation_scores(lm, con, [prompt], [second])[0]
    assert list(s) == ["helpful"]
    for pid in s:
        assert s[pid] == pytest.approx(reference_violation(lm, prompt, second, con.get(pid)), abs=1e-3)


# --------------------------------------------------------------------------------------------- revision
@dataclass
class _Finish:
    reason: str = "eos"


@dataclass
class _Completion:
    text: str
    finish: _Finish


class EchoEngine:
    """Records each request's chat and answers with a text that names the request (and sometimes nothing)."""

    def __init__(self, empty: set[str] = frozenset()):
        self.calls: list[list[list[dict]]] = []
        self.empty = empty

    def generate_many(self, requests):
        self.calls.append([r.messages for r in requests])
        out = []
        for r in requests:
            tag = f"out{len(self.calls)}-{r.params.seed % 1000}"
            out.append(_Completion("" if tag.split("-")[0] in self.empty else f"  {tag} ", _Finish()))
        return out


def test_revise_chains_draft_critique_and_revision_under_the_drawn_principles():
    con = load_constitution()
    eng = EchoEngine(empty={"out5"})  # the second round's revisions come out empty: the reply stays
    recs = revise(eng, con, PROMPTS, rounds=2, seed=11)
    assert len(eng.calls) == 5 and all(len(c) == len(PROMPTS) for c in eng.calls)  # one batch per stage
    rng = random.Random(11)
    drawn = [[con.draw(rng) for _ in range(2)] for _ in PROMPTS]
    for i, (prompt, rec) in enumerate(zip(PROMPTS, recs, strict=True)):
        assert eng.calls[0][i] == [{"role": "user", "content": prompt}]
        draft = rec["draft"]
        assert draft.startswith("out1-")  # stripped
        assert rec["principles"] == [p.id for p in drawn[i]]
        r0, r1 = rec["rounds"]
        assert eng.calls[1][i] == critique_messages(prompt, draft, drawn[i][0])
        assert eng.calls[2][i] == revision_messages(prompt, draft, r0["critique"], drawn[i][0])
        assert eng.calls[3][i] == critique_messages(prompt, r0["revision"], drawn[i][1])
        assert eng.calls[4][i] == revision_messages(prompt, r0["revision"], r1["critique"], drawn[i][1])
        assert r1["revision"] == "" and r0["revision"].startswith("out3-")
        assert rec["messages"] == [{"role": "user", "content": prompt},
                                   {"role": "assistant", "content": r0["revision"]}]
    seeds = {r.split("-")[1] for c in recs for r in [c["draft"]] + [x["critique"] for x in c["rounds"]]}
    assert len(seeds) > 3  # each request its own seed
    everything_empty = revise(EchoEngine(empty={f"out{k}" for k in range(1, 4)}), con, PROMPTS[:1], seed=0)
    assert "messages" not in everything_empty[0]
    with pytest.raises(CairnError, match="--rounds"):
        revise(eng, con, PROMPTS, rounds=0)
    with pytest.raises(CairnError, match="prompt 1 must be a non-empty string"):
        revise(eng, con, ["ok", "  "])


def test_revise_command_writes_sft_data_that_train_sft_reads(model_dir, tmp_path, capsys):
    from cairn.cli import main
    from cairn.data.chat import read_conversations

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS)] + [""])
    out = tmp_path / "sl.jsonl"
    argv = ["cai", "revise", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--rounds", "2",
            "--max-tokens", "6", "--seed", "5"]
    assert main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for r in rows:
        assert len(r["principles"]) == 2 and len(r["rounds"]) == 2
        assert [x["principle"] for x in r["rounds"]] == r["principles"]
        final = next((x["revision"] for x in reversed(r["rounds"]) if x["revision"]), r["draft"])
        assert r["messages"][1] == {"role": "assistant", "content": final}
    assert len(read_conversations(out)) == len(PROMPTS)
    first = out.read_text()
    assert main(argv) == 0 and out.read_text() == first  # seeded: the same file again
    assert main(["train", "sft", str(model_dir), "--data", str(out), "--out", str(tmp_path / "sft"), "--steps", "1",
                 "--seq-len", "512", "--batch-size", "2", "--compile", "off", "--dtype", "fp32",
                 "--no-progress"]) == 0
    assert (tmp_path / "sft" / "metrics.jsonl").is_file()


# ---------------------------------------------------------------------------------------- label and score
def test_label_command_writes_pairs_that_train_dpo_reads(model_dir, tmp_path, capsys):
    from cairn.cli import main
    from cairn.data.preference import read_preferences

    rows = [{"prompt": PROMPTS[0], "responses": ["Boil it eight minutes.", "No idea."]},
            {"prompt": PROMPTS[1]}, {"prompt": PROMPTS[2]},
            {"prompt": PROMPTS[2], "responses": ["Four.", "Four."]}]  # equal replies: nothing to learn, left out
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "pairs.jsonl"
    assert main(["cai", "label", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                 "--max-tokens", "6", "--temperature", "1.0"]) == 0
    assert "left out 1 prompt(s)" in capsys.readouterr().out
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 3 and {recs[0]["chosen"], recs[0]["rejected"]} == set(rows[0]["responses"])
    assert all(r["chosen"] != r["rejected"] and 0.5 <= r["p_chosen"] <= 1 and r["principle"] for r in recs)
    pairs = read_preferences(out)
    assert [p.p_chosen for p in pairs] == pytest.approx([r["p_chosen"] for r in recs])
    assert main(["train", "dpo", str(model_dir), "--data", str(out), "--out", str(tmp_path / "dpo"), "--steps", "1",
                 "--val-fraction", "0", "--seq-len", "512", "--batch-size", "2", "--compile", "off",
                 "--dtype", "fp32", "--no-progress"]) == 0


def test_score_command_writes_r_j_penalty_and_reward(model_dir, tok, tmp_path, capsys):
    from cairn.cli import main
    from cairn.train.preference import RewardModel, load_reward_model, save_reward_model
    from cairn.weights import load_model

    lm = load_model(model_dir)
    rm_dir = save_reward_model(tmp_path / "rm", RewardModel(tiny(tok, seed=1).model, tok, seed=2), lm.config, tok)
    rows = [{"prompt": p, "response": r} for p, r in zip(PROMPTS, REPLIES, strict=True)] + [{"prompt": "Hi?"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    out = tmp_path / "scores.jsonl"
    assert main(["cai", "score", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--lambda", "0.5",
                 "--reward-model", str(rm_dir), "--max-tokens", "5"]) == 0
    assert "mean L_viol" in capsys.readouterr().out
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["response"] for r in recs[:3]] == REPLIES and isinstance(recs[3]["response"], str)
    con = load_constitution()
    rm = load_reward_model(rm_dir)
    for rec in recs:
        for p in con:
            assert rec["r"][p.id] == pytest.approx(reference_violation(lm, rec["prompt"], rec["response"], p),
                                                   abs=1e-4)
        pen = sum(v * v for v in rec["r"].values() if v > 0)
        assert rec["l_viol"] == pytest.approx(pen)
        assert rec["r_human"] == pytest.approx(rm.score(rec["prompt"], rec["response"]), abs=1e-5)
        assert rec["reward"] == pytest.approx(rec["r_human"] - 0.5 * pen)
    assert any(r["l_viol"] > 0 for r in recs)
    # another judge: its own logits give r_j
    other = save_reward_model(tmp_path / "rm2", RewardModel(tiny(tok, seed=4).model, tok), lm.config, tok)
    out2 = tmp_path / "scores2.jsonl"
    assert main(["cai", "score", str(model_dir), "--prompts", str(prompts), "--out", str(out2), "--judge", str(other),
                 "--max-tokens", "5"]) == 0
    judge2 = load_model(other)
    for rec in (json.loads(x) for x in out2.read_text().splitlines()):
        pid = con.principles[0].id
        assert rec["r"][pid] == pytest.approx(reference_violation(judge2, rec["prompt"], rec["response"],
                                                                  con.principles[0]), abs=1e-4)
        assert rec["r_human"] == 0 and rec["reward"] == pytest.approx(-0.2 * rec["l_viol"])


def test_bad_input_is_refused_with_the_fix(model_dir, tmp_path, capsys):
    from cairn.cli import main

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "Hi"}])
    m = str(model_dir)
    cases = [
        (["revise", m, "--prompts", str(tmp_path / "none.jsonl")], "no such prompts file"),
        (["revise", m, "--prompts", str(write_jsonl(tmp_path / "a.jsonl", ["{oops"]))], "a.jsonl:1: not valid JSON"),
        (["revise", m, "--prompts", str(write_jsonl(tmp_path / "b.jsonl", [{"text": "x"}]))], 'no "prompt" field'),
        (["revise", m, "--prompts", str(write_jsonl(tmp_path / "c.jsonl", [{"prompt": " "}]))],
         '"prompt" must be a non-empty string'),
        (["revise", m, "--prompts", str(write_jsonl(tmp_path / "d.jsonl", [""]))], "no prompts in the file"),
        (["label", m, "--prompts", str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "x", "responses": ["a"]}]))],
         '"responses" must be two non-empty strings'),
        (["score", m, "--prompts", str(write_jsonl(tmp_path / "f.jsonl", [{"prompt": "x", "response": 3}]))],
         '"response" must be a string'),
        (["revise", m, "--prompts", str(good), "--rounds", "0"], "--rounds 0"),
        (["revise", m, "--prompts", str(good), "--max-tokens", "0"], "--max-tokens 0"),
        (["revise", m, "--prompts", str(good), "--top-p", "0"], "top_p must be in (0, 1]"),
        (["label", m, "--prompts", str(good), "--temperature", "0"], "gives the same reply twice"),
        (["score", m, "--prompts", str(good), "--lambda", "-1"], "--lambda -1.0"),
        (["score", m, "--prompts", str(good), "--reward-model", str(model_dir)], "not a reward model"),
        (["score", m, "--prompts", str(good), "--constitution", str(tmp_path / "no.yaml")], "no such file"),
        (["revise", m, "--prompts", str(good), "--out", str(tmp_path)], "is a directory"),
    ]
    for argv, message in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "o.jsonl")]
        assert main(["cai", *argv, "--max-tokens", "4"] if "--max-tokens" not in argv else ["cai", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
    assert not (tmp_path / "o.jsonl").exists()
