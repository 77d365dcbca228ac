"""Supervised fine-tuning: conversations read and checked, the loss mask on exactly the assistant's tokens, packing
that keeps conversations apart, learning in the one loop, a bit-exact resume of ``cairn train sft``, clear errors."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cairn.config import ModelConfig
from cairn.data.chat import (
    SFTBatches,
    SFTValBatches,
    collate,
    pack,
    read_conversations,
    split_conversations,
    tokenize_conversation,
    tokenize_conversations,
)
from cairn.data.tokenizer_train import CHAT_TEMPLATE, IM_END, train_tokenizer
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.tokenizer import Tokenizer
from cairn.train.loop import TrainConfig, Trainer
from cairn.train.metrics import read_metrics
from cairn.train.objectives import IGNORE
from cairn.train.pretrain import token_byte_lengths
from cairn.train.sft import SFT

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = ROOT / "examples" / "sft" / "identity.jsonl"
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def arithmetic(n: int, seed: int = 0) -> list[dict]:
    """Conversations with a learnable answer: "What is a plus b?" -> "a plus b is c." (words), some multi-turn,
    some with a system message."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randrange(5), rng.randrange(5)
        msgs = [{"role": "user", "content": f"What is {NUMBERS[a]} plus {NUMBERS[b]}?"},
                {"role": "assistant", "content": f"{NUMBERS[a].capitalize()} plus {NUMBERS[b]} is {NUMBERS[a + b]}."}]
        if i % 3 == 0:
            msgs = [{"role": "system", "content": "You add numbers."}, *msgs]
        if i % 4 == 1:
            c = rng.randrange(10)
            msgs += [{"role": "user", "content": f"And {NUMBERS[c]} plus zero?"},
                     {"role": "assistant", "content": f"{NUMBERS[c].capitalize()} plus zero is {NUMBERS[c]}."}]
        out.append({"messages": msgs})
    return out


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    train = write_jsonl(d / "train.jsonl", arithmetic(96))
    text = "\n".join(m["content"] for line in [*IDENTITY.read_text().splitlines(), *train.read_text().splitlines()]
                     for m in json.loads(line)["messages"])
    (d / "text.txt").write_text(text * 3)
    tok = train_tokenizer([d / "text.txt"], 400, d / "tok", progress=False)
    return d, train, tok


@pytest.fixture(scope="module")
def tok(files):
    return files[2]


def tiny(tok, seed=0):
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=128, tie_embeddings=True, arch="llama", name="tiny")
    torch.manual_seed(seed)
    return cfg, build_model(cfg).init_weights(seed=seed)


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))


def check_mask(tok, messages, end_token=IM_END):
    ex = tokenize_conversation(tok, messages)
    assert ex.ids.tolist() == tok.encode_chat(messages, add_generation_prompt=False)  # tokenised once, whole
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    got = spans(ex.mask)
    assert len(got) == len(answers)
    for (a, b), content in zip(got, answers, strict=True):
        assert tok.decode(ex.ids[a:b].tolist(), skip_special=False) == content + end_token
        assert tok.decode(ex.ids[:a].tolist(), skip_special=False).endswith("<|im_start|>assistant\n")
    # everything outside the mask is the rest of the rendered text: system, user, headers, separators
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    rest = tok.decode(ex.ids[~ex.mask].tolist(), skip_special=False)
    for content in answers:
        text = text.replace(content + end_token, "", 1)
    assert rest == text
    return ex


# ------------------------------------------------------------------------------------------- the mask
def test_mask_covers_exactly_the_assistant_tokens(tok):
    convs = read_conversations(IDENTITY)
    assert len(convs) >= 20 and any(len(c.messages) > 2 for c in convs)
    for c in convs:
        check_mask(tok, c.messages)
    for row in arithmetic(12):
        check_mask(tok, row["messages"])


def test_mask_with_the_default_models_template():
    """SmolLM2's own template adds a system prompt when the conversation has none: still excluded."""
    from cairn.weights import default_model_path_or_none, load_model

    if default_model_path_or_none() is None:
        pytest.skip("the bundled SmolLM2-135M-Instruct is not installed")
    tok = load_model(None).tokenizer
    for c in read_conversations(IDENTITY):
        ex = check_mask(tok, c.messages)
        assert "SmolLM" in tok.decode(ex.ids.tolist()) or c.messages[0]["role"] == "system"


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    # the generation prompt opens the turn differently from how the finished turn is rendered
    bad = CHAT_TEMPLATE.replace("{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant:\n' }}")
    assert bad != CHAT_TEMPLATE
    other = Tokenizer(tok.tok, chat_template=bad, bos_token=tok.bos_token, eos_token=tok.eos_token, add_bos=True)
    with pytest.raises(CairnError, match=r"conv-7: .*message 2 \(assistant\).*not a prefix"):
        tokenize_conversation(other, arithmetic(1)[0]["messages"], "conv-7")


def test_overlong_conversations_are_truncated_or_dropped(files, tok):
    convs = read_conversations(files[1])
    lengths = [len(tokenize_conversation(tok, c.messages).ids) for c in convs]
    cut = sorted(lengths)[len(lengths) // 2]
    exs, rep = tokenize_conversations(tok, convs, cut, "truncate")
    assert rep["truncated"] + rep["dropped"] == sum(n > cut for n in lengths) > 0
    assert rep["kept"] == len(exs) == len(convs) - rep["dropped"] and max(len(e.ids) for e in exs) == cut
    assert all(e.n_targets() > 0 for e in exs)
    exs, rep = tokenize_conversations(tok, convs, cut, "drop")
    assert rep["dropped"] == sum(n > cut for n in lengths) and rep["truncated"] == 0
    assert len(exs) == sum(n <= cut for n in lengths)


# ------------------------------------------------------------------------------------------- packing
def test_packing_keeps_conversations_apart(files, tok):
    convs = read_conversations(files[1])[:24]
    exs, _ = tokenize_conversations(tok, convs, 128)
    rows = pack([len(e.ids) for e in exs], range(len(exs)), 128)
    assert sorted(i for r in rows for i in r) == list(range(len(exs)))
    assert max(len(r) for r in rows) >= 3 and all(sum(len(exs[i].ids) for i in r) <= 128 for r in rows)
    batch = collate(exs, rows, 128, pad_id=tok.eos_id)
    assert (batch.targets == IGNORE).any(dim=1).all()  # padding and prompts
    _, model = tiny(tok)
    sft = SFT()
    with torch.no_grad():
        packed = sft.loss(model, batch)
        alone = [sft.loss(model, collate([e], [[0]], len(e.ids), tok.eos_id)) for e in exs]
    assert packed.n_tokens == sum(a.n_tokens for a in alone) == sum(e.n_targets() for e in exs)
    torch.testing.assert_close(packed.loss_sum, sum(a.loss_sum for a in alone), rtol=1e-5, atol=1e-4)
    # the control: the same rows with attention across conversations give another loss
    with torch.no_grad():
        leaky = sft.loss(model, type(batch)(batch.inputs, batch.targets))
    assert abs(float(leaky.loss_sum) - float(packed.loss_sum)) > 1e-3


def test_batches_are_deterministic_resumable_and_split_by_rank(files, tok):
    exs, _ = tokenize_conversations(tok, read_conversations(files[1]), 96)
    a = SFTBatches(exs, 96, 4, grad_accum=2, seed=3)
    first = [a.next_window() for _ in range(3)]
    state = a.state_dict()
    later = [a.next_window() for _ in range(40)]  # crosses epochs
    assert a.epochs_done > 1 and a.rows_of(0) != a.rows_of(1)  # reshuffled per epoch
    b = SFTBatches(exs, 96, 4, grad_accum=2, seed=3)
    b.load_state_dict(state)
    for w1, w2 in zip(later, [b.next_window() for _ in range(40)], strict=True):
        assert all(torch.equal(x.inputs, y.inputs) and torch.equal(x.targets, y.targets)
                   and torch.equal(x.segments, y.segments) for x, y in zip(w1, w2, strict=True))
    r0, r1 = SFTBatches(exs, 96, 4, 2, 3, dp_rank=0, dp_size=2), SFTBatches(exs, 96, 4, 2, 3, dp_rank=1, dp_size=2)
    for whole, w0, w1 in zip(first, [r0.next_window() for _ in range(3)], [r1.next_window() for _ in range(3)],
                             strict=True):
        for m, m0, m1 in zip(whole, w0, w1, strict=True):
            assert torch.equal(m.inputs[0::2], m0.inputs) and torch.equal(m.inputs[1::2], m1.inputs)
    with pytest.raises(CairnError, match="original data"):
        SFTBatches(exs[1:], 96, 4, 2, 3).load_state_dict(state)
    with pytest.raises(CairnError, match="multiple"):
        SFTBatches(exs, 96, 3, dp_size=2)
    val = SFTValBatches(exs, 96, 4)
    capped = list(val.batches(50))
    n_rows, n = sum(len(b.inputs) for b in capped), sum(b.n_targets() for b in capped)
    assert n >= 50 > n - val.row_targets[n_rows - 1]  # the first rows that hold 50 target tokens
    per_rank = [list(SFTValBatches(exs, 96, 4, r, 2).batches(None)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])  # the same number of forward passes on every rank
    assert sum(b.n_targets() for bs in per_rank for b in bs) == sum(e.n_targets() for e in exs)


# ------------------------------------------------------------------------------------------- learning
def test_loss_falls_and_the_model_answers_in_chat(files, tok, tmp_path):
    convs = read_conversations(files[1])
    train_c, val_c = split_conversations(convs, 0.2, seed=0)
    exs, _ = tokenize_conversations(tok, train_c, 96)
    val_exs, _ = tokenize_conversations(tok, val_c, 96)
    cfg, model = tiny(tok)
    tc = TrainConfig(out=str(tmp_path / "run"), steps=40, seq_len=96, batch_size=4, lr=1e-2, warmup=4,
                     val_every=20, ckpt_every=0, dtype="fp32", progress=False)
    trainer = Trainer(tc, model, cfg, SFT(), SFTBatches(exs, 96, 4, seed=0), SFTValBatches(val_exs, 96, 4),
                      token_byte_lengths(tok), tok, log=lambda *a, **k: None)
    trainer.run()
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(recs) == 40 and all(r["tokens"] > 0 for r in recs)
    first, last = np.mean([r["loss"] for r in recs[:3]]), np.mean([r["loss"] for r in recs[-5:]])
    assert last < 0.5 * first, (first, last)
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < first
    from cairn.cli import main

    assert main(["generate", str(tmp_path / "run"), "--chat", "-p", "What is two plus two?", "--max-tokens", "6",
                 "--json"]) == 0


# ------------------------------------------------------------------------------------------- the command
def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cli(model_dir, data, out, *extra):
    return [sys.executable, "-m", "cairn", "train", "sft", str(model_dir), "--data", str(data), "--out", str(out),
            "--val-fraction", "0.2", "--steps", "6", "--seq-len", "96", "--batch-size", "2", "--lr", "1e-2",
            "--warmup", "2", "--val-every", "3", "--ckpt-every", "3", "--keep", "3", "--threads", "1",
            "--dtype", "fp32", "--compile", "off", "--no-progress", *extra]


def test_cli_resume_is_bit_exact(files, tok, tmp_path):
    from safetensors.torch import load_file

    from cairn.weights.native import save_checkpoint

    cfg, model = tiny(tok)
    model_dir = save_checkpoint(tmp_path / "base", model, cfg, tok)
    out = tmp_path / "run"
    subprocess.run(_cli(model_dir, IDENTITY, out), check=True, env=_env(), timeout=120, capture_output=True)
    want = read_metrics(out / "metrics.jsonl")
    last = out / "checkpoints" / "step-00000006"
    model_want = load_file(str(last / "model.safetensors"))
    assert [r["step"] for r in want] == [1, 2, 3, 4, 5, 6] and "val_loss" in want[2] and "val_loss" in want[5]
    # as if killed after step 3's checkpoint
    shutil.rmtree(last)
    res = subprocess.run(_cli(model_dir, IDENTITY, out, "--resume"), check=True, env=_env(), timeout=120,
                         capture_output=True, text=True)
    assert "resumed from" in res.stdout and "step 3" in res.stdout
    got = read_metrics(out / "metrics.jsonl")
    keys = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss", "val_bpb")
    assert [[r.get(k) for k in keys] for r in got] == [[r.get(k) for k in keys] for r in want]
    model_got = load_file(str(last / "model.safetensors"))
    assert all(torch.equal(model_want[k], model_got[k]) for k in model_want)
    # the other data, or the other seed, is refused
    res = subprocess.run(_cli(model_dir, files[1], out, "--resume"), env=_env(), timeout=120, capture_output=True,
                         text=True)
    assert res.returncode == 2 and "error: " in res.stderr


BAD = [
    ('{"messages": [', r"bad.jsonl:3: not valid JSON"),
    ('{"msgs": []}', r'bad.jsonl:3: no "messages" field'),
    ('{"messages": []}', r"bad.jsonl:3: \"messages\" must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', r"bad.jsonl:3: message 0 has role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}',
     r"bad.jsonl:3: message 1 \(assistant\) has empty content"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"bad.jsonl:3: no assistant message"),
    ('{"messages": [{"role": "assistant", "content": "hi"}]}', r"bad.jsonl:3: .*must start with a user message"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]}',
     r"bad.jsonl:3: message 1 is a system message"),
    ('{"messages": [{"role": "user", "content": ["a"]}]}', r"bad.jsonl:3: .*content of type list"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_conversations_are_clear_errors(line, message, tmp_path, capsys):
    from cairn.cli import main

    ok = json.dumps(arithmetic(1)[0])
    bad = write_jsonl(tmp_path / "bad.jsonl", [ok, "", line])
    with pytest.raises(CairnError, match=message):
        read_conversations(bad)
    assert main(["train", "sft", "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


def test_bad_flags_and_models_are_clear_errors(files, tok, tmp_path, capsys):
    from cairn.cli import main
    from cairn.weights.native import save_checkpoint

    data = str(files[1])
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--data", str(write_jsonl(tmp_path / "empty.jsonl", [""]))], "no conversations"),
        (["--data", data, "--val-fraction", "1.5"], "between 0 and 1"),
        (["--data", data, "--parallel", "pp"], "--parallel pp"),
    ]
    cfg, model = tiny(tok)
    plain = Tokenizer(tok.tok, chat_template=None, bos_token=tok.bos_token, eos_token=tok.eos_token)
    no_template = save_checkpoint(tmp_path / "nt", model, cfg, plain)
    cases.append(([str(no_template), "--data", data], "no chat template"))
    base = save_checkpoint(tmp_path / "base", model, cfg, tok)
    cases.append(([str(base), "--data", data, "--seq-len", "512"], "exceeds the model's max_seq_len"))
    for args, message in cases:
        assert main(["train", "sft", *args, "--out", str(tmp_path / "o"), "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (args, err)


def test_cli_lora_trains_only_an_adapter_that_generate_applies(tok, tmp_path, capsys):
    from safetensors.torch import load_file

    from cairn.cli import main
    from cairn.weights.native import save_checkpoint

    cfg, model = tiny(tok)
    model_dir = save_checkpoint(tmp_path / "base", model, cfg, tok)
    before = load_file(str(model_dir / "model.safetensors"))
    out = tmp_path / "run"
    assert main(_cli(model_dir, IDENTITY, out, "--lora", "--lora-rank", "4")[3:]) == 0
    said = capsys.readouterr().out
    assert "LoRA r=4" in said and f"--adapter {out}" in said
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()  # the adapter, not a full copy of the base
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero: it trained
    after = load_file(str(model_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base is untouched
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert main(["generate", str(model_dir), "--adapter", str(out), "--chat", "-p", "Who are you?",
                 "--max-tokens", "4", "--json"]) == 0
