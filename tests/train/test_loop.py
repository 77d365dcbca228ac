"""The training loop: learning, token-normalised accumulation, validation in bits per byte, checkpoints that a
kill at any moment cannot corrupt, bit-exact resume, and a trained model that generates and exports to HF."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.train import checkpoint
from cairn.train.loop import TrainConfig, Trainer
from cairn.train.metrics import read_metrics
from cairn.train.objectives import LanguageModeling, token_cross_entropy
from cairn.train.pretrain import token_byte_lengths

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=True,
            arch="llama", name="tiny")


def tiny_cfg(prepared, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=prepared.vocab_size, **{**TINY, **kw})


def trainer(prepared, tokenizer, out, cfg=None, seed=0, **kw) -> Trainer:
    cfg = cfg or tiny_cfg(prepared)
    settings = dict(progress=False, seq_len=32, batch_size=4, warmup=5, lr=1e-2, val_every=0, ckpt_every=0,
                    dtype="fp32")
    tc = TrainConfig(out=str(out), seed=seed, **{**settings, **kw})
    torch.manual_seed(seed)
    model = build_model(cfg).init_weights(seed=seed)
    aux = 0.01 if cfg.n_experts else 0.0
    return Trainer(tc, model, cfg, LanguageModeling(aux), prepared.tokens("train"), prepared.tokens("val"),
                   token_byte_lengths(tokenizer), tokenizer, log=lambda *a, **k: None)


def test_loss_falls_well_below_its_start(prepared, tokenizer, tmp_path):
    t = trainer(prepared, tokenizer, tmp_path, steps=80, val_tokens=256)
    summary = t.run()
    last = read_metrics(tmp_path / "metrics.jsonl")[-1]
    # validations see the first 256 tokens; the last step also reports the whole split
    assert (last["val_loss"], last["val_bpb"]) == pytest.approx(t.validate())
    assert (last["val_loss_all"], last["val_bpb_all"]) == pytest.approx(t.validate(whole=True))
    assert last["val_loss_all"] != pytest.approx(last["val_loss"])
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert len(losses) == 80
    assert losses[0] > 0.9 * math.log(prepared.vocab_size)  # starts near uniform
    # The text is random words: a model that only learned token frequencies would sit at the unigram entropy;
    # falling below it means the model uses its context.
    counts = np.bincount(np.asarray(prepared.tokens("train"))).astype(float)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    final = sum(losses[-5:]) / 5
    assert final < 0.8 * losses[0] and final < unigram - 0.1, (final, unigram)
    assert summary["val_loss"] < 0.85 * losses[0]
    # the best model is exported to OUT/ and loads like any model
    from cairn.weights import load_model

    lm = load_model(tmp_path)
    assert lm.config.vocab_size == prepared.vocab_size and lm.tokenizer is not None
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("extra", [
    dict(n_experts=4, experts_per_token=2, router_aux_loss_coef=0.01),
    dict(ffn_share_group=2),
    dict(sliding_window=8),
    dict(tie_embeddings=False, n_kv_heads=1),
])
def test_any_model_config_trains(prepared, tokenizer, tmp_path, extra):
    cfg = tiny_cfg(prepared, **extra)
    t = trainer(prepared, tokenizer, tmp_path, cfg=cfg, steps=40)
    t.run()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0]
    if cfg.n_experts:  # the load-balancing loss reaches the gradients of the router
        assert t.model.layers[0].mlp.router.weight.grad is None  # zeroed after the step
        assert t.model.aux_loss.item() > 0


def test_accumulation_is_normalised_by_the_window_tokens(prepared, tokenizer, tmp_path):
    """One step of batch 4 equals one step of 2 micro-batches of 2 (the same 4 sequences), and the gradient is
    the mean per-token loss's, computed here by hand."""
    a = trainer(prepared, tokenizer, tmp_path / "a", steps=1, batch_size=4, grad_accum=1)
    b = trainer(prepared, tokenizer, tmp_path / "b", steps=1, batch_size=2, grad_accum=2)
    # the same rows: the data order depends only on the seed and the window count
    wa = a.data.next_window()
    wb = b.data.next_window()
    assert torch.equal(wa[0].inputs, torch.cat([wb[0].inputs, wb[1].inputs]))
    a.data.load_state_dict({**a.data.state_dict(), "pos": 0})
    b.data.load_state_dict({**b.data.state_dict(), "pos": 0})
    ref = build_model(tiny_cfg(prepared)).init_weights(seed=0)
    loss = token_cross_entropy(ref(wa[0].inputs), wa[0].targets) / wa[0].targets.numel()
    loss.backward()
    clip = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    for t in (a, b):
        t.opt.step = lambda: None  # keep the gradients to compare them
        t.opt.zero_grad = lambda set_to_none=True: None
        rec = t.train_step()
        assert rec["loss"] == pytest.approx(loss.item(), rel=1e-5)
        assert rec["grad_norm"] == pytest.approx(clip.item(), rel=1e-4)
        for (name, p), q in zip(t.model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_compiled_blocks_and_bf16_autocast_train_like_eager_fp32(prepared, tokenizer, tmp_path):
    runs = {}
    for name, kw in {"eager": {}, "compiled": dict(compile="on"), "bf16": dict(dtype="bf16", compile="on")}.items():
        t = trainer(prepared, tokenizer, tmp_path / name, steps=8, **kw)
        assert t.compiled == ("compile" in kw)
        t.run()
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl")]
    # Inductor's fused kernels reorder float sums: equal to float noise; bf16 matmuls: to bf16's precision
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=1e-4)
    assert runs["bf16"] == pytest.approx(runs["eager"], rel=2e-2)
    # compiling keeps the module names: the checkpoint loads in the plain model
    from cairn.weights import load_model

    assert load_model(tmp_path / "compiled").config.n_layers == 2


def test_auto_dtype_is_measured_and_kept_on_resume(prepared, tokenizer, tmp_path, monkeypatch):
    from cairn.train import loop

    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: 3.0)
    t = trainer(prepared, tokenizer, tmp_path, steps=2, ckpt_every=1, dtype="auto")
    assert t.compute_dtype == torch.bfloat16
    t.run()
    assert json.loads((tmp_path / "run.json").read_text())["compute_dtype"] == "bf16"
    monkeypatch.setattr(loop, "cpu_bf16_speedup", lambda: 0.2)  # another machine: bf16 emulated, slow
    assert trainer(prepared, tokenizer, tmp_path / "new", steps=2, dtype="auto").compute_dtype == torch.float32
    resumed = trainer(prepared, tokenizer, tmp_path, steps=3, dtype="auto")
    assert resumed.compute_dtype == torch.bfloat16  # the run's own dtype, not this machine's pick
    with pytest.raises(CairnError, match="--compile"):
        trainer(prepared, tokenizer, tmp_path / "x", compile="sometimes")


def test_validation_bits_per_byte_by_hand(prepared, tokenizer, tmp_path):
    t = trainer(prepared, tokenizer, tmp_path, steps=1, val_tokens=0)
    loss, bpb = t.validate()
    val = torch.from_numpy(prepared.tokens("val").astype("int64"))
    n = (len(val) - 1) // 32
    x, y = val[: n * 32].view(n, 32), val[1: n * 32 + 1].view(n, 32)
    with torch.no_grad():
        nats = float(token_cross_entropy(t.model(x), y))
    text_bytes = sum(len(tokenizer.decode([i], skip_special=True).encode()) for i in y.flatten().tolist())
    assert loss == pytest.approx(nats / y.numel(), rel=1e-5)
    assert bpb == pytest.approx(nats / math.log(2) / text_bytes, rel=1e-5)


def test_checkpoint_interrupted_mid_write_is_never_taken(prepared, tokenizer, tmp_path, monkeypatch):
    t = trainer(prepared, tokenizer, tmp_path, steps=4, ckpt_every=2)
    t.run()
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 4]

    def dies(tmp, final):
        raise KeyboardInterrupt  # as if killed after the files were written, before the rename

    monkeypatch.setattr(checkpoint, "publish", dies)
    t.tc.steps = 6
    with pytest.raises(KeyboardInterrupt):
        t.run(resume=True)
    assert checkpoint.latest(tmp_path).name == "step-00000004"
    assert list((tmp_path / "checkpoints").glob(".tmp-*"))  # the half-made one is there, hidden
    monkeypatch.undo()
    t2 = trainer(prepared, tokenizer, tmp_path, steps=6, ckpt_every=2)
    t2.run(resume=True)
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert [s for s, _ in checkpoint.complete_checkpoints(tmp_path)] == [2, 4, 6]


def test_resume_guards(prepared, tokenizer, tmp_path):
    trainer(prepared, tokenizer, tmp_path, steps=2, ckpt_every=2).run()
    with pytest.raises(CairnError, match="--resume"):
        trainer(prepared, tokenizer, tmp_path, steps=4).run()
    with pytest.raises(CairnError, match="lr"):
        trainer(prepared, tokenizer, tmp_path, steps=4, lr=5e-3).run(resume=True)


# ------------------------------------------------------------------ the command, killed and resumed
def _cli(prepared, cfg_file, out, steps, *extra) -> list[str]:
    return [sys.executable, "-m", "cairn", "train", "pretrain", "--data", str(prepared.path), "--config",
            str(cfg_file), "--out", str(out), "--steps", str(steps), "--seq-len", "32", "--batch-size", "4",
            "--lr", "1e-2", "--warmup", "3", "--val-every", "5", "--val-tokens", "256", "--ckpt-every", "1",
            "--keep", "2", "--threads", "1", "--no-progress", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _trajectory(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r.get("val_loss"), r["tokens"])
            for r in read_metrics(out / "metrics.jsonl")]


def test_sigkill_then_resume_gives_a_bit_identical_trajectory(prepared, tmp_path):
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(tiny_cfg(prepared).to_dict()))
    steps = 16
    ref = tmp_path / "ref"
    subprocess.run(_cli(prepared, cfg_file, ref, steps), check=True, env=_env(), timeout=300,
                   capture_output=True)
    want = _trajectory(ref)
    assert [s for s, *_ in want] == list(range(1, steps + 1))

    out = tmp_path / "killed"
    rng = random.Random(3)
    kills = 0
    for attempt in range(6):  # kill at random moments (steps checkpoint every step: many kills land mid-save)
        args = _cli(prepared, cfg_file, out, steps, *(["--resume"] if attempt else []))
        proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        at = rng.randint(3, steps - 3)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            done = len(read_metrics(out / "metrics.jsonl")) if (out / "metrics.jsonl").exists() else 0
            if done >= at:
                time.sleep(rng.random() * 0.3)
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.01)
        proc.wait(timeout=60)
        # whatever the moment, every checkpoint --resume could take is whole
        for _, d in checkpoint.complete_checkpoints(out):
            torch.load(d / "trainer.pt", weights_only=True)
            from safetensors.torch import load_file

            load_file(str(d / "model.safetensors"))
        if proc.returncode == 0:
            break
    assert kills >= 2
    if proc.returncode != 0:
        subprocess.run(_cli(prepared, cfg_file, out, steps, "--resume"), check=True, env=_env(), timeout=300,
                       capture_output=True)
    assert _trajectory(out) == want  # bit-identical: exact float equality, step by step
    from safetensors.torch import load_file

    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_trained_model_generates_and_exports_to_hf(prepared, tokenizer, tmp_path):
    out = tmp_path / "run"
    trainer(prepared, tokenizer, out, steps=30).run()
    from cairn.cli import main
    from cairn.engine import Engine, Request, SamplingParams
    from cairn.weights import load_model

    lm = load_model(out)
    engine = Engine(lm, quantize="none")
    ids = lm.tokenizer.encode("The king")
    res = engine.generate(Request(ids, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)))
    engine.close()
    # greedy through the engine equals greedy through the plain model
    x = torch.tensor([ids])
    want = []
    with torch.no_grad():
        for _ in range(8):
            nxt = int(lm.model(x)[0, -1].argmax())
            want.append(nxt)
            x = torch.cat([x, torch.tensor([[nxt]])], dim=1)
    assert res.token_ids[: len(want)] == want[: len(res.token_ids)] and len(res.token_ids) >= 1
    assert main(["generate", str(out), "-p", "The king", "--max-tokens", "4", "--json"]) == 0

    hf_dir = tmp_path / "hf"
    assert main(["convert", str(out), "--to", "hf", "-o", str(hf_dir)]) == 0
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    toks = torch.tensor([lm.tokenizer.encode("The king spoke to the queen.")])
    with torch.no_grad():
        torch.testing.assert_close(hf(toks).logits, lm.model(toks), rtol=1e-4, atol=1e-4)


def test_bad_flags_are_clear_errors(prepared, tokenizer, tmp_path, capsys):
    from cairn.cli import main
    from cairn.data.loader import PackedBatches

    cfg = tiny_cfg(prepared)
    with pytest.raises(CairnError, match="multiple"):
        PackedBatches(prepared.tokens("train"), 32, 3, dp_size=2)
    with pytest.raises(CairnError, match="seq-len 32 exceeds"):
        trainer(prepared, tokenizer, tmp_path, steps=1, cfg=replace(cfg, max_seq_len=16))
    with pytest.raises(CairnError, match="--lr must be a positive number; --keep must be at least 1"):
        TrainConfig(lr=0, keep=0)
    assert main(["train", "pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["train", "pretrain", "--data", str(prepared.path), "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert "--steps must be at least 1" in capsys.readouterr().err
    assert not list((tmp_path / "o").glob("checkpoints/*"))
