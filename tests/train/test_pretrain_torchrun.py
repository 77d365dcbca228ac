"""``torchrun --nproc-per-node 2 -m cairn train pretrain --parallel ddp|fsdp|tp|pp``, end to end through the CLI:
each run's loss and validation trajectory equals the one-process run's on the same global batches, its exported
model equals the one-process model, and a 2-process run resumed from its distributed checkpoint continues
bit-identically. (Gradient-level equality per parallelism is in test_distributed.py.)"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cairn.config import ModelConfig
from cairn.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# 4 layers so the pipeline has 2 per stage; heads and d_ff divide by the tensor-parallel size.
TINY = dict(d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64, tie_embeddings=True,
            arch="llama", name="tiny")
STEPS = 4
# fp32 and eager everywhere: --dtype/--compile auto pick per machine (bf16 where its matmuls measure faster,
# Inductor where a compiler exists), which would compare a compiled one-process run with eager TP/PP stages.
# Compiled and bf16 training are checked against eager fp32 in test_loop.py.


def _args(prepared, cfg_file: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "pretrain", "--data", str(prepared.path), "--config", str(cfg_file), "--out", str(out),
            "--steps", str(STEPS), "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--lr", "1e-2",
            "--warmup", "2", "--val-every", "2", "--val-tokens", "512", "--ckpt-every", "2", "--no-progress",
            "--pg-timeout", "60", "--dtype", "fp32", "--compile", "off", *extra]


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])}... failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def _torchrun(args: list[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
          "--master-port", str(port), "-m", "cairn", *args])


def _trajectory(out: Path) -> list[tuple]:
    return [(r["step"], r["loss"], r["lr"], r.get("val_loss"), r.get("val_bpb"), r["tokens"])
            for r in read_metrics(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def single(prepared, tmp_path_factory):
    """The one-process reference run."""
    root = tmp_path_factory.mktemp("single")
    cfg_file = root / "tiny.json"
    cfg_file.write_text(json.dumps(ModelConfig(vocab_size=prepared.vocab_size, **TINY).to_dict()))
    out = root / "run"
    _run([sys.executable, "-m", "cairn", *_args(prepared, cfg_file, out, "--threads", "1")])
    return cfg_file, out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp", "tp", "pp"])
def test_two_process_run_matches_one_process(prepared, single, tmp_path, parallel):
    cfg_file, ref = single
    out = tmp_path / parallel
    _torchrun(_args(prepared, cfg_file, out, "--parallel", parallel))
    want, got = _trajectory(ref), _trajectory(out)
    assert [r[0] for r in got] == list(range(1, STEPS + 1))
    for w, g in zip(want, got, strict=True):
        assert g[0] == w[0] and g[5] == w[5] and g[2] == pytest.approx(w[2], rel=1e-12)
        assert g[1] == pytest.approx(w[1], rel=1e-5)  # train loss: same global batch, same weights
        if w[3] is not None:
            assert g[3] == pytest.approx(w[3], rel=1e-5) and g[4] == pytest.approx(w[4], rel=1e-5)
    # the last step also scores the whole validation split, in windows of any size (a pipeline pads them)
    (w_all,), (g_all,) = ([read_metrics(d / "metrics.jsonl")[-1]["val_loss_all"]] for d in (ref, out))
    assert g_all == pytest.approx(w_all, rel=1e-5)
    # the exported best model (gathered from shards / stages) is the one-process model
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        # Adam at lr 1e-2 moves near-zero gradients by ~lr whatever their size: float noise shows at 1e-5
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)
    ckpts = sorted((out / "checkpoints").iterdir())
    assert [d.name for d in ckpts] == ["step-00000002", "step-00000004"]
    assert all((d / "complete").is_file() for d in ckpts)


def test_two_process_distributed_checkpoint_resumes_bit_identically(prepared, single, tmp_path):
    cfg_file, _ = single
    ref = tmp_path / "ref"
    _torchrun(_args(prepared, cfg_file, ref, "--parallel", "fsdp"))
    # the same run stopped after its step-2 checkpoint: drop what came after, then --resume
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "checkpoints" / "step-00000004")
    (out / "checkpoints" / "step-00000004.tmp-deadbeef").mkdir()  # a save killed half way: cleaned, never read
    _torchrun(_args(prepared, cfg_file, out, "--parallel", "fsdp", "--resume"))
    assert _trajectory(out) == _trajectory(ref)
    assert not (out / "checkpoints" / "step-00000004.tmp-deadbeef").exists()
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
