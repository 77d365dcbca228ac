"""Prompt-chunk matrix products: cairn's 4-bit kernel with int16 activations against PyTorch's fp32 matmul.

A prompt chunk of M rows times each projection of the default model (SmolLM2-135M: qkv 576 -> 960, gate/up
576 -> 3072, down 1536 -> 576), side by side in one run: ``F.linear`` on the fp32 weights (what a prompt chunk ran
before the int4 engine took it) and ``Q4Linear.fused(x, wide=True)`` on the same weights as 4-bit codes, the path
int4 "auto" takes for chunks of up to ``PROMPT_Q4_ROWS`` rows. Random weights: the speed does not depend on them.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_kernels.py [--threads 2] [--rows 1,16,42,128,512,2048]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (576, 960), "gate_up": (576, 3072), "down": (1536, 576)}


def best_of(fn, reps: int, rounds: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def main() -> None:
    from cairn.weights.quant import PROMPT_Q4_ROWS, Q4Linear

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="1,16,42,128,256,512,1024,2048")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}; int4 'auto' prompt chunks of up to {PROMPT_Q4_ROWS} rows take the 4-bit kernel")
    print("| matrix (K -> N) | rows | fp32 F.linear, G multiply-adds/s | 4-bit, int16 activations | ratio |")
    print("|---|---:|---:|---:|---:|")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.02
        q4 = Q4Linear.from_float(w)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, k, generator=gen)
            reps = max(3, int(2e8 // (m * n * k)))
            dense = best_of(lambda: F.linear(x, w), reps)  # noqa: B023
            tiled = best_of(lambda: q4.fused(x, wide=True), reps)  # noqa: B023
            madds = m * n * k / 1e9
            print(f"| {name} ({k} -> {n}) | {m} | {madds / dense:.1f} | {madds / tiled:.1f} | {dense / tiled:.2f}x |")


if __name__ == "__main__":
    main()
