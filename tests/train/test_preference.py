"""Reward model and DPO: preference data (format, chat-template tokenisation, reply mask, batching), the losses and
their gradients against hand computations, learning a planted preference, the commands (validation accuracy,
exports, a bit-exact resume) and clear errors for bad data."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cairn.config import ModelConfig
from cairn.data.preference import (
    PairBatches,
    PairEval,
    collate,
    encode_pair,
    encode_pairs,
    parse_pair,
    read_preferences,
)
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.train.loop import TrainConfig, Trainer
from cairn.train.metrics import read_metrics
from cairn.train.objectives import IGNORE
from cairn.train.preference import (
    DPO,
    RewardModel,
    RewardObjective,
    load_reward_model,
    preference_loss,
    reference_logps,
    reference_tables,
    save_reward_model,
)

ROOT = Path(__file__).resolve().parents[2]
TOY = ROOT / "examples" / "preferences" / "toy.jsonl"
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256, tie_embeddings=True,
            arch="llama", name="tiny")


def tiny(tokenizer, seed=0, std=0.02):
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, **TINY)
    return build_model(cfg).init_weights(std=std, seed=seed), cfg


# A planted preference: the chosen reply is courteous, the rejected one rude; the wording, topic and where the
# courtesy sits vary, so a model has to notice which words occur, not memorise strings.
POLITE = ["thank you", "happy to help", "gladly", "of course", "my pleasure", "you are welcome"]
RUDE = ["whatever", "go away", "not my problem", "stop asking", "ugh, fine", "leave me alone"]
TOPICS = ["the river", "a red apple", "the old king", "seven stones", "the night sky", "a small boat", "the garden",
          "warm bread", "the castle", "a letter", "the market", "green hills"]


def planted(n: int, seed: int) -> list:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic, other = rng.sample(TOPICS, 2)
        body = f"{topic} is near {other}"

        replies = []
        for word in (rng.choice(POLITE), rng.choice(RUDE)):
            front = rng.random() < 0.5
            replies.append(f"{word.capitalize()}! {body}." if front else f"{body.capitalize()}, {word}.")
        rec = {"prompt": f"Tell me about {topic}.", "chosen": replies[0], "rejected": replies[1]}
        pairs.append(parse_pair(rec, f"planted:{i}"))
    return pairs


def settings(out, **kw) -> TrainConfig:
    base = dict(out=str(out), steps=40, seq_len=TINY["max_seq_len"], batch_size=8, lr=3e-3, warmup=3, val_every=10,
                ckpt_every=0, dtype="fp32", progress=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------------------- data
def test_pairs_render_with_the_chat_template_and_only_replies_are_targets(tokenizer):
    pair = parse_pair({"prompt": "Hi there", "chosen": "Hello! Nice to meet you.", "rejected": "Go away."}, "t:1")
    enc = encode_pair(tokenizer, pair)
    msgs = [{"role": "user", "content": "Hi there"}]
    assert tokenizer.decode(list(enc.prompt), skip_special=False) == tokenizer.apply_chat_template(msgs)
    full = tokenizer.apply_chat_template([*msgs, {"role": "assistant", "content": "Go away."}],
                                         add_generation_prompt=False)
    # the reply runs through the end-of-turn token; the template's trailing newline belongs to no turn
    assert tokenizer.decode(list(enc.prompt + enc.rejected), skip_special=False) + "\n" == full
    im_end = tokenizer.tok.token_to_id("<|im_end|>")
    assert enc.chosen[-1] == im_end and enc.rejected[-1] == im_end
    assert tokenizer.decode(list(enc.chosen)) == "Hello! Nice to meet you."
    # the message-list form is the same pair
    same = parse_pair({"prompt": msgs, "chosen": [{"role": "assistant", "content": "Hello! Nice to meet you."}],
                       "rejected": "Go away."}, "t:2")
    assert encode_pair(tokenizer, same) == enc

    other = encode_pair(tokenizer, parse_pair({"prompt": "A much longer question than the first one?",
                                               "chosen": "Yes.", "rejected": "No.", "p_chosen": 0.25}, "t:3"))
    b = collate([enc, other], [0, 1], pad_id=7)
    assert b.inputs.shape == (4, max(len(enc), len(other)))
    rows = [(enc.prompt, enc.chosen), (enc.prompt, enc.rejected), (other.prompt, other.chosen),
            (other.prompt, other.rejected)]
    for r, (prompt, reply) in enumerate(rows):
        n = len(prompt) + len(reply)
        assert b.lengths[r] == n and b.inputs[r, :n].tolist() == list(prompt + reply)
        assert (b.inputs[r, n:] == 7).all()
        want = torch.full((b.inputs.shape[1],), IGNORE)
        want[len(prompt) - 1:n - 1] = torch.tensor(reply)  # position t predicts token t + 1
        assert torch.equal(b.targets[r], want)
    assert b.p_chosen.tolist() == [1.0, 0.25] and b.n_pairs == 2


def test_pair_batches_resume_exactly_and_split_pairs_across_ranks(tokenizer):
    enc, _ = encode_pairs(tokenizer, planted(13, seed=1))
    one = PairBatches(enc, batch_size=4, grad_accum=2, seed=5)
    first = one.next_window()
    assert len(first) == 2 and all(b.n_pairs == 4 for b in first)
    state = one.state_dict()
    after = [one.next_window() for _ in range(4)]  # crosses epochs (13 pairs, 8 per step)
    assert one.epochs_done == pytest.approx(40 / 13)
    again = PairBatches(enc, batch_size=4, grad_accum=2, seed=5)
    again.load_state_dict(state)
    for w1, w2 in zip(after, [again.next_window() for _ in range(4)], strict=True):
        for a, b in zip(w1, w2, strict=True):
            assert torch.equal(a.inputs, b.inputs) and torch.equal(a.pair_ids, b.pair_ids)
    with pytest.raises(CairnError, match="other preference data"):
        PairBatches(enc[:-1], batch_size=4, seed=5).load_state_dict(state)
    # two data-parallel ranks take alternate pairs of each micro-batch; together they are the one-process batch
    ranks = [PairBatches(enc, batch_size=4, grad_accum=2, seed=5, dp_rank=r, dp_size=2) for r in (0, 1)]
    whole = PairBatches(enc, batch_size=4, grad_accum=2, seed=5).next_window()
    parts = [rk.next_window() for rk in ranks]
    for m, b in enumerate(whole):
        assert b.pair_ids[0::2].tolist() == parts[0][m].pair_ids.tolist()
        assert b.pair_ids[1::2].tolist() == parts[1][m].pair_ids.tolist()
        chosen_of_rank1 = parts[1][m].inputs[0, :int(parts[1][m].lengths[0])]
        assert torch.equal(chosen_of_rank1, b.inputs[2, :int(b.lengths[2])])
    with pytest.raises(CairnError, match="multiple of the 2"):
        PairBatches(enc, batch_size=3, dp_size=2)
    val = PairEval(enc, batch_size=4)
    assert sum(b.n_pairs for b in val.batches(None)) == 13
    capped = list(val.batches(len(enc[0].chosen) + len(enc[0].rejected)))
    assert sum(b.n_pairs for b in capped) == 1


# ------------------------------------------------------------------------------------------- the losses
def _hand_logp(model, prompt, reply) -> torch.Tensor:
    """Summed log-probability of ``reply`` after ``prompt``: one unpadded sequence, plain torch ops."""
    ids = list(prompt) + list(reply)
    logits = model(torch.tensor([ids]))[0]
    logp = torch.log(torch.softmax(logits.double(), dim=-1))
    return sum(logp[t, ids[t + 1]] for t in range(len(prompt) - 1, len(ids) - 1))


def test_dpo_loss_and_gradients_equal_a_hand_computation(tokenizer):
    raw = [{"prompt": "Tell me a story.", "chosen": "Once upon a time a king lived by the sea.", "rejected": "No."},
           {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"}],
            "chosen": "Four.", "rejected": "Five, I think, or maybe six.", "p_chosen": 0.7},
           {"prompt": "Hello", "chosen": "Hi! How can I help?", "rejected": "What do you want?", "p_chosen": 0.2}]
    enc = [encode_pair(tokenizer, parse_pair(r, f"h:{i}")) for i, r in enumerate(raw)]
    policy, _ = tiny(tokenizer, seed=0, std=0.2)
    ref, _ = tiny(tokenizer, seed=1, std=0.2)  # a reference unlike the policy, so both terms matter
    ref.requires_grad_(False)
    beta = 0.5
    table = reference_logps(ref, PairEval(enc, 2).ordered(2), len(enc), torch.device("cpu"))
    batch = collate(enc, [0, 1, 2], pad_id=tokenizer.eos_id, ref=table)

    out = DPO(beta).loss(policy, batch)
    out.loss_sum.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()

    loss = torch.zeros((), dtype=torch.float64)
    zs = []
    for i, e in enumerate(enc):
        with torch.no_grad():
            ref_c, ref_r = _hand_logp(ref, e.prompt, e.chosen), _hand_logp(ref, e.prompt, e.rejected)
        assert table[i].tolist() == pytest.approx([float(ref_c), float(ref_r)], abs=1e-4)
        z = beta * ((_hand_logp(policy, e.prompt, e.chosen) - ref_c) - (_hand_logp(policy, e.prompt, e.rejected)
                                                                         - ref_r))
        p = e.p_chosen
        loss = loss - (p * torch.log(torch.sigmoid(z)) + (1 - p) * torch.log(torch.sigmoid(-z)))
        zs.append(float(z.detach()))
    loss.backward()
    assert float(out.loss_sum.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert out.n_tokens == 3
    for n, p in policy.named_parameters():
        scale = float(p.grad.abs().max())  # float32 rounding: relative to the tensor's largest gradient
        torch.testing.assert_close(got[n], p.grad.float(), rtol=1e-3, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}")
    assert abs(sum(zs)) > 0.05 and float(out.metrics["margin"]) == pytest.approx(sum(zs), rel=1e-4)
    agree = sum((z > 0) if e.p_chosen >= 0.5 else (z < 0) for z, e in zip(zs, enc, strict=True))
    assert float(out.metrics["accuracy"]) == agree

    # a frozen reference copy instead of precomputed numbers gives the same loss
    batch.ref_logps = None
    copy_mode = DPO(beta, ref_model=ref).loss(policy, batch)
    assert float(copy_mode.loss_sum.detach()) == pytest.approx(float(out.loss_sum.detach()), rel=1e-5)


def test_soft_labels_follow_their_formula():
    z = torch.tensor([-2.0, -0.3, 0.0, 0.4, 3.0], dtype=torch.float64)
    for p in (1.0, 0.9, 0.5, 0.2, 0.0):
        want = [-(p * math.log(1 / (1 + math.exp(-v))) + (1 - p) * math.log(1 / (1 + math.exp(v)))) for v in
                z.tolist()]
        got = preference_loss(z, torch.full_like(z, p))
        assert got.tolist() == pytest.approx(want, rel=1e-12)
        # swapping chosen and rejected is the same as flipping the label
        assert preference_loss(-z, torch.full_like(z, 1 - p)).tolist() == pytest.approx(want, rel=1e-12)
    # a hard label is DPO's / Bradley-Terry's -log sigma(z)
    assert preference_loss(z, torch.ones_like(z)).tolist() == pytest.approx((-torch.log(torch.sigmoid(z))).tolist())


def test_reward_loss_and_gradients_equal_bradley_terry_by_hand(tokenizer):
    enc = [encode_pair(tokenizer, p) for p in planted(3, seed=2)]
    enc[1] = type(enc[1])(enc[1].prompt, enc[1].chosen, enc[1].rejected, 0.3)
    transformer, _ = tiny(tokenizer, seed=3, std=0.2)
    rm = RewardModel(transformer, seed=4)
    out = RewardObjective().loss(rm, collate(enc, [0, 1, 2], pad_id=0))
    out.loss_sum.backward()
    got = {n: p.grad.clone() for n, p in rm.named_parameters()}
    rm.zero_grad()

    def r(prompt, reply):  # the head on the final normed hidden state of the sequence's last token
        h = transformer.hidden(torch.tensor([list(prompt + reply)]))[0, -1]
        return (h.double() * rm.head.weight[0].double()).sum()

    loss, margins = 0.0, []
    for e in enc:
        d = r(e.prompt, e.chosen) - r(e.prompt, e.rejected)
        loss = loss - (e.p_chosen * torch.log(torch.sigmoid(d)) + (1 - e.p_chosen) * torch.log(torch.sigmoid(-d)))
        margins.append(float(d.detach()))
    loss.backward()
    assert float(out.loss_sum.detach()) == pytest.approx(float(loss.detach()), rel=1e-5)
    assert float(out.metrics["margin"]) == pytest.approx(sum(margins), rel=1e-4, abs=1e-6)
    for n, p in rm.named_parameters():
        scale = float(p.grad.abs().max())  # float32 rounding: relative to the tensor's largest gradient
        torch.testing.assert_close(got[n], p.grad.float(), rtol=1e-3, atol=1e-4 * scale, msg=lambda m, n=n: f"{n}: {m}")


# ------------------------------------------------------------------------------------------- learning
def test_reward_model_learns_a_planted_preference(tokenizer, tmp_path):
    train, _ = encode_pairs(tokenizer, planted(96, seed=10))
    held, _ = encode_pairs(tokenizer, planted(40, seed=11))
    transformer, cfg = tiny(tokenizer, seed=0)
    rm = RewardModel(transformer, tokenizer=tokenizer, seed=0)
    tc = settings(tmp_path, steps=30, val_every=10)
    t = Trainer(tc, rm, cfg, RewardObjective(), train=PairBatches(train, 8, seed=0), val=PairEval(held, 8),
                tokenizer=tokenizer, log=lambda *a, **k: None,
                exporter=lambda m, o, info: save_reward_model(o, m, cfg, tokenizer, info))
    before, _ = t.validate()
    assert abs(before - math.log(2)) < 0.1  # untrained: about chance on the held-out pairs
    t.run()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    vals = [r for r in recs if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [10, 20, 30]
    assert vals[-1]["val_accuracy"] >= 0.95 and vals[-1]["val_loss"] < 0.1 * before, vals
    assert vals[-1]["val_reward_chosen"] > vals[-1]["val_reward_rejected"]

    # the export reloads as the same function and scores text as training saw it
    best = min(vals, key=lambda r: r["val_loss"])
    loaded = load_reward_model(tmp_path)
    assert json.loads((tmp_path / "cairn_extra.json").read_text())["step"] == best["step"]
    pairs = planted(40, seed=11)
    chosen = loaded.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected = loaded.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / len(pairs)
    assert acc == pytest.approx(best["val_accuracy"])
    one = loaded.score(pairs[0].prompt[0]["content"], pairs[0].chosen)
    assert one == pytest.approx(chosen[0], abs=1e-5)
    assert loaded.score_ids([list(held[0].prompt + held[0].chosen)])[0] == pytest.approx(chosen[0], abs=1e-5)


def test_dpo_raises_the_chosen_margin(tokenizer, tmp_path):
    train, _ = encode_pairs(tokenizer, planted(120, seed=20))
    held, _ = encode_pairs(tokenizer, planted(30, seed=21))
    policy, cfg = tiny(tokenizer, seed=0)
    data, val = PairBatches(train, 8, seed=0), PairEval(held, 8)
    t = Trainer(settings(tmp_path, steps=30, lr=3e-3, val_every=10), policy, cfg, DPO(beta=0.1), train=data,
                val=val, tokenizer=tokenizer, log=lambda *a, **k: None)
    reference_tables(t, data, val, tmp_path, resume=False, progress=False, log=lambda *a: None)
    t.run()
    recs = read_metrics(tmp_path / "metrics.jsonl")
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy = reference: z = 0
    assert abs(recs[0]["margin"]) < 1e-4
    vals = [r for r in recs if "val_margin" in r]
    margins = [r["val_margin"] for r in vals]
    assert margins == sorted(margins) and margins[-1] > 0.5, margins
    assert vals[-1]["val_accuracy"] >= 0.9
    # the implicit rewards: chosen replies became likelier relative to the reference, rejected ones less likely
    assert vals[-1]["val_reward_chosen"] > 0 > vals[-1]["val_reward_rejected"]


# ------------------------------------------------------------------------------------------- commands
@pytest.fixture
def model_dir(tokenizer, tmp_path):
    from cairn.weights.native import save_checkpoint

    model, cfg = tiny(tokenizer, seed=0)
    return save_checkpoint(tmp_path / "tiny-model", model, cfg, tokenizer)


LOOP = ["--seq-len", "256", "--batch-size", "4", "--warmup", "2", "--dtype", "fp32", "--compile", "off",
        "--no-progress"]


def test_reward_command_reports_held_out_accuracy_and_exports(model_dir, tmp_path, capsys):
    from cairn.cli import main

    out = tmp_path / "reward"
    assert main(["train", "reward", str(model_dir), "--data", str(TOY), "--val-fraction", "0.2", "--out", str(out),
                 "--steps", "4", "--val-every", "2", "--lr", "1e-3", *LOOP]) == 0
    assert "held-out pairwise accuracy" in capsys.readouterr().out
    vals = [r for r in read_metrics(out / "metrics.jsonl") if "val_accuracy" in r]
    assert [r["step"] for r in vals] == [2, 4] and all(0 <= r["val_accuracy"] <= 1 for r in vals)
    assert json.loads((out / "reward_model.json").read_text())["kind"] == "reward_model"
    rm = load_reward_model(out)
    assert isinstance(rm.score("Hello?", "Hi!"), float)
    with pytest.raises(CairnError, match="not a reward model"):
        load_reward_model(model_dir)


def _dpo(model_dir, out, *extra):
    return [sys.executable, "-m", "cairn", "train", "dpo", str(model_dir), "--data", str(TOY), "--out", str(out),
            "--steps", "6", "--ckpt-every", "2", "--val-every", "3", "--lr", "1e-3", "--beta", "0.2",
            "--threads", "1", *LOOP, *extra]


def test_dpo_resume_is_bit_exact(model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    a = tmp_path / "a"
    subprocess.run(_dpo(model_dir, a), check=True, env=env, timeout=300, capture_output=True)
    # resume a copy from its step-2 checkpoint (later ones removed): the rest must replay exactly
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for step in (4, 6):
        shutil.rmtree(b / "checkpoints" / f"step-{step:08d}")
    res = subprocess.run(_dpo(model_dir, b, "--resume"), check=True, env=env, timeout=300, capture_output=True,
                         text=True)
    assert "resumed from" in res.stdout and "reference log-probs from" in res.stdout

    def trajectory(out):
        return [(r["step"], r["loss"], r["grad_norm"], r["margin"], r.get("val_loss"), r.get("val_accuracy"))
                for r in read_metrics(out / "metrics.jsonl")]

    want = trajectory(a)
    assert [s for s, *_ in want] == list(range(1, 7))
    assert trajectory(b) == want  # exact float equality, step by step
    from safetensors.torch import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    # changing the objective's settings on resume is refused
    r = subprocess.run(_dpo(model_dir, b, "--resume", "--beta", "0.3"), env=env, timeout=300, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "beta" in r.stderr


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "a", "chosen": "b", "rejected": "c"}', "not json"], ":2: not valid JSON"),
    (['{"prompt": "a", "chosen": "b"}'], ":1: missing 'rejected'"),
    (['{"chosen": [{"role": "user", "content": "x"}], "rejected": "y"}'], "missing 'prompt'"),
    (['{"prompt": "a", "chosen": "b", "rejected": "c", "p_chosen": 1.5}'], '"p_chosen" must be a number from 0'),
    (['{"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"}'], '"chosen" must be a string'),
    (['{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "chosen": "c", '
      '"rejected": "d"}'], "must end with the user turn"),
    (['{"prompt": "a", "chosen": "", "rejected": "c"}'], 'the "chosen" reply has empty content'),
    (['{"prompt": [{"role": "robot", "content": "a"}], "chosen": "b", "rejected": "c"}'], "prompt message 0"),
    (["[1, 2]"], ":1: not a JSON object"),
    ([""], "no preference pairs"),
])
def test_bad_data_is_a_clear_error(model_dir, tmp_path, capsys, lines, message):
    from cairn.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    assert main(["train", "dpo", str(model_dir), "--data", str(bad), "--out", str(tmp_path / "o"), *LOOP]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(bad) in err and message in err, err
    with pytest.raises(CairnError, match="bad.jsonl"):
        read_preferences(bad)


def test_bad_flags_are_clear_errors(model_dir, tmp_path, capsys):
    from cairn.cli import main

    cases = [
        ("reward", ["--data", str(tmp_path / "missing.jsonl")], "no such preference file"),
        ("dpo", ["--beta", "0"], "--beta 0"),
        ("reward", ["--val-fraction", "1.5"], "--val-fraction 1.5"),
        ("dpo", ["--parallel", "ddp"], "one process"),
        ("dpo", ["--seq-len", "16"], "longer than --seq-len 16"),
        ("reward", ["--seq-len", "4096"], "--seq-len 4096 exceeds the model's max_seq_len 256"),
    ]
    for kind, flags, message in cases:
        argv = ["train", kind, str(model_dir), "--data", str(TOY), "--out", str(tmp_path / "o"), *LOOP, *flags]
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_lora_runs_export_an_adapter_for_dpo_and_a_whole_reward_model(model_dir, tmp_path):
    from cairn.cli import main
    from cairn.train.lora import is_adapter_dir

    common = ["--data", str(TOY), "--steps", "2", "--val-every", "2", "--lr", "1e-2", "--lora", "--lora-rank", "4",
              *LOOP]
    dpo = tmp_path / "dpo"
    assert main(["train", "dpo", str(model_dir), "--out", str(dpo), *common]) == 0
    assert is_adapter_dir(dpo) and not (dpo / "model.safetensors").exists()
    first = read_metrics(dpo / "metrics.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)  # a fresh adapter changes nothing: z = 0

    rw = tmp_path / "reward"
    assert main(["train", "reward", str(model_dir), "--out", str(rw), *common]) == 0
    rm = load_reward_model(rw)  # the adapters merged in: a whole model with its head
    from cairn.weights import load_model

    base = load_model(model_dir).model.state_dict()
    changed = [k for k, v in rm.transformer.state_dict().items() if not torch.equal(v, base[k])]
    assert changed and all(".attn." in k or ".mlp." in k for k in changed)
    pairs = planted(3, seed=5)
    enc = [encode_pair(rm.tokenizer, p) for p in pairs]
    with torch.no_grad():
        want = rm(collate(enc, [0, 1, 2]).inputs, collate(enc, [0, 1, 2]).lengths)[0::2].tolist()
    assert rm.score([p.prompt for p in pairs], [p.chosen for p in pairs]) == pytest.approx(want, abs=1e-5)
