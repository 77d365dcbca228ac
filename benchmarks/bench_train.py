"""Training throughput: cairn's training loop against a plain HF ``transformers`` ``LlamaForCausalLM`` loop.

Both train the default ``cairn train pretrain`` model (the same config, built as cairn's Transformer and as HF's
LlamaForCausalLM) on the same packed windows of the prepared default corpus (random tokens when it is absent),
with the same batch and sequence length and the same optimizer (AdamW, no decay on norms and embeddings,
gradient clipping at 1). One row per way of running each; steps alternate between the rows' rounds so that a
slow moment of the machine falls on all of them. MFU is measured tokens/s × training FLOPs per token (cairn's
accounting: 6·N matmuls plus causal attention) against the matmul peak measured here for the row's compute
dtype (a 1536² matmul, best of 3) — not a datasheet's.

Rows:
  hf fp32               the plain HF loop (fp32, eager): the peer the target ratio is against
  hf bf16               the HF loop under bf16 autocast
  hf bf16+compile       the HF loop under bf16 autocast with each decoder layer torch.compile'd (the strongest HF
                        variant built here; what a user gets by writing what cairn does by default)
  cairn fp32            cairn's loop, fp32, eager
  cairn default         cairn's loop as `cairn train pretrain` runs it by default: --dtype auto, --compile auto

    PYTHONPATH=src python benchmarks/bench_train.py [--steps 8] [--rounds 2] [--threads 2] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cairn.accounting import account
from cairn.config import ModelConfig
from cairn.data.loader import PackedBatches
from cairn.model import build_model
from cairn.train.loop import TrainConfig, Trainer, cpu_bf16_speedup, matmul_peak_flops
from cairn.train.objectives import LanguageModeling
from cairn.train.optim import build_optimizer
from cairn.train.pretrain import DEFAULT_MODEL

SEQ, BATCH, LR = 256, 16, 3e-3


def tokens(data: str | None, vocab: int) -> tuple[np.ndarray, str]:
    from cairn.data.shards import is_prepared, load_prepared

    for d in [data, "out/pretrain/data", ".data/prepared"]:
        if d and is_prepared(Path(d)):
            p = load_prepared(Path(d))
            return np.asarray(p.tokens("train")), f"prepared corpus {d} (vocab {p.vocab_size})"
    rng = np.random.default_rng(0)
    return rng.integers(0, vocab, 400_000, dtype=np.int64), "random tokens"


class HFRun:
    """The plain loop a transformers user writes: forward, CE, backward, clip, AdamW step."""

    def __init__(self, cfg: ModelConfig, data: np.ndarray, dtype: torch.dtype, compile_layers: bool):
        import transformers

        hf = {k: v for k, v in cfg.to_hf().items()
              if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
        config = transformers.LlamaConfig(**hf)
        config._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.model = transformers.LlamaForCausalLM(config).train()
        if compile_layers:
            for layer in self.model.model.layers:
                layer.compile()
        self.opt = build_optimizer(self.model, LR)
        self.dtype = dtype
        self.data = PackedBatches(data, SEQ, BATCH, 1, seed=0)

    def step(self) -> None:
        b = self.data.next_window()[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16):
            logits = self.model(input_ids=b.inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), b.targets.flatten(), ignore_index=-100,
                               reduction="sum") / b.n_targets()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


class CairnRun:
    """cairn's loop itself: ``Trainer.train_step`` (schedule, accumulation bookkeeping, clipping, AdamW)."""

    def __init__(self, cfg: ModelConfig, data: np.ndarray, dtype: str, compile: str, out: Path):
        tc = TrainConfig(out=str(out), steps=10_000, seq_len=SEQ, batch_size=BATCH, lr=LR, warmup=0, dtype=dtype,
                         compile=compile, progress=False)
        model = build_model(cfg).init_weights(seed=0)
        self.trainer = Trainer(tc, model, cfg, LanguageModeling(), data, log=lambda *a, **k: None)
        self.dtype = self.trainer.compute_dtype

    def step(self) -> None:
        self.trainer.train_step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="timed steps per row and round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all rows (steps alternate between rows)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row first (compilation included)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=4096, help="vocabulary when no prepared corpus is found")
    ap.add_argument("--data", default=None, help="a `cairn data prepare` directory")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    from cairn.data.shards import is_prepared, load_prepared

    vocab = args.vocab
    for d in [args.data, "out/pretrain/data", ".data/prepared"]:
        if d and is_prepared(Path(d)):
            vocab = load_prepared(Path(d)).vocab_size
            break
    data, source = tokens(args.data, vocab)
    cfg = ModelConfig(vocab_size=vocab, **DEFAULT_MODEL)
    fpt = account(cfg).train_flops_per_token(SEQ)
    peaks = {torch.float32: matmul_peak_flops(torch.device("cpu"), torch.float32),
             torch.bfloat16: matmul_peak_flops(torch.device("cpu"), torch.bfloat16)}
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}; "
          f"data: {source}; model {sum(p.numel() for p in build_model(cfg).parameters()) / 1e6:.2f}M params, "
          f"batch {BATCH}x{SEQ}; matmul peak fp32 {peaks[torch.float32] / 1e9:.0f} GFLOP/s, bf16 "
          f"{peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s (bf16/fp32 matmul speed-up {cpu_bf16_speedup():.2f}x)")
    tmp = Path(tempfile.mkdtemp(prefix="bench_train-"))
    builders = {
        "hf fp32": lambda: HFRun(cfg, data, torch.float32, False),
        "hf bf16": lambda: HFRun(cfg, data, torch.bfloat16, False),
        "hf bf16+compile": lambda: HFRun(cfg, data, torch.bfloat16, True),
        "cairn fp32": lambda: CairnRun(cfg, data, "fp32", "off", tmp / "a"),
        "cairn default": lambda: CairnRun(cfg, data, "auto", "auto", tmp / "b"),
    }
    runs, times = {}, {name: [] for name in builders}
    for name, build in builders.items():
        t = time.perf_counter()
        runs[name] = build()
        for _ in range(args.warmup):
            runs[name].step()
        print(f"  {name}: built and warmed up in {time.perf_counter() - t:.1f} s", flush=True)
    for _ in range(args.rounds):
        for name, run in runs.items():
            for _ in range(args.steps):
                t = time.perf_counter()
                run.step()
                times[name].append(time.perf_counter() - t)
    rows = {}
    for name, ts in times.items():
        dt = statistics.median(ts)
        tok_s = BATCH * SEQ / dt
        dtype = runs[name].dtype
        rows[name] = {"s_per_step": dt, "tok_per_s": tok_s, "dtype": str(dtype).removeprefix("torch."),
                      "mfu": tok_s * fpt / peaks[dtype], "mfu_vs_fp32_peak": tok_s * fpt / peaks[torch.float32]}
    base = rows["hf fp32"]["tok_per_s"]
    print(f"\n{'row':<18}{'dtype':>10}{'s/step':>9}{'tok/s':>9}{'MFU':>8}{'vs hf fp32':>12}")
    for name, r in rows.items():
        print(f"{name:<18}{r['dtype']:>10}{r['s_per_step']:>9.3f}{r['tok_per_s']:>9.0f}{r['mfu']:>8.1%}"
              f"{r['tok_per_s'] / base:>11.2f}x")
    ratios = {
        "cairn default / hf fp32 (target >= 1.3)": rows["cairn default"]["tok_per_s"] / base,
        "cairn fp32 / hf fp32 (same precision, both eager)": rows["cairn fp32"]["tok_per_s"] / base,
        "cairn default / hf bf16": rows["cairn default"]["tok_per_s"] / rows["hf bf16"]["tok_per_s"],
        "cairn default / hf bf16+compile": rows["cairn default"]["tok_per_s"] / rows["hf bf16+compile"]["tok_per_s"],
    }
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ratios": ratios, "source": source,
                                               "flops_per_token": fpt, "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
