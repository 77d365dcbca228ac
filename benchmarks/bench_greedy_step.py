"""The greedy token found inside the decode step against ``torch.argmax`` after it, in one process, alternating.

    .venv/bin/python benchmarks/bench_greedy_step.py [--threads 2] [--new-tokens 256] [--pairs 10] [--serve]

A greedy batch-1 decode step (``step.c``) finds each row's argmax beside its head, so the engine needs no second
parallel region after the step (``torch.argmax`` over the 49,152 logits opens one, which wakes the OpenMP thread
that went to sleep when the step ended). This measures what that is worth: in one process (the same memory layout
for both, which on a shared host matters more than the difference measured), greedy requests alternate between the
step's argmax and ``torch.argmax`` on the step's logits; decode tok/s = (new − 1) / (time after the first token),
and the ratio per pair of requests made seconds apart, whose median is reported.

``--serve``: the same in one ``cairn serve`` process streaming to one client (``bench_http.stream_chat``): the
server is started with ``hooks/`` on its ``PYTHONPATH``, whose ``sitecustomize`` makes SIGUSR1 switch its engine
between the two (benchmark-only: nothing in cairn reads it).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOOKS = Path(__file__).resolve().parent / "hooks"
MODES = ("step argmax", "torch.argmax")


def report(rates: dict[str, list[float]], where: str) -> dict:
    ratios = [a / b for a, b in zip(rates[MODES[0]], rates[MODES[1]], strict=True)]
    out = {"where": where, **{m: statistics.median(v) for m, v in rates.items()},
           "ratio_median": statistics.median(ratios), "ratios": [round(r, 3) for r in ratios]}
    print(f"{where}: step argmax {out[MODES[0]]:.1f} tok/s, torch.argmax {out[MODES[1]]:.1f} tok/s (medians); "
          f"step / torch per pair: median {out['ratio_median']:.3f} ({', '.join(map(str, out['ratios']))})")
    return out


def in_process(threads: int, n: int, pairs: int) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from cairn.openmp import tune_for_decoding

    tune_for_decoding()  # as cairn generate and chat do, before torch's import
    import torch
    from bench_engine import decode_once
    from bench_http import messages

    from cairn.engine import Engine, Request, SamplingParams
    from cairn.weights import load_model

    torch.set_num_threads(threads)
    lm = load_model(None, quantized=True)
    ids = lm.tokenizer.encode_chat(messages(0))
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    with Engine(lm, kv_memory_mb=256, prefix_caching=False) as engine:
        engine.generate(Request(ids, SamplingParams(max_tokens=32, temperature=0)))  # warm-up
        forward = engine.runner.forward

        def without(segments, *args, **kw):  # the step's logits only: sample() takes torch.argmax of them
            return forward(segments, *args, **{**kw, "greedy": False})

        for r in range(pairs):
            for mode in (MODES if r % 2 == 0 else MODES[::-1]):
                engine.runner.forward = forward if mode == MODES[0] else without
                rates[mode].append(decode_once(engine, ids, n)["decode_tok_s"])
        engine.runner.forward = forward
    return report(rates, "in process")


def served(threads: int, n: int, pairs: int) -> dict:
    import bench_http as B

    path = os.pathsep.join([str(HOOKS), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
    server = B.cairn_server(None, threads, {"PYTHONPATH": path, "CAIRN_BENCH_ARGMAX_SWITCH": "1"})
    port = server.port
    rates: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        B.stream_chat(port, B.messages(999), 32)  # warm-up
        mode = MODES[0]  # the server starts with the step's argmax
        for r in range(pairs):
            for want in (MODES if r % 2 == 0 else MODES[::-1]):
                if want != mode:
                    os.kill(server.proc.pid, signal.SIGUSR1)
                    mode = want
                    time.sleep(0.05)
                rates[mode].append(B.stream_chat(port, B.messages(300 + 2 * r + (mode == MODES[0])), n)
                                   ["decode_tok_s"])
    finally:
        server.close()
    return report(rates, "cairn serve, one client")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--serve", action="store_true", help="measure one cairn serve process instead")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    out = (served if args.serve else in_process)(args.threads, args.new_tokens, args.pairs)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
