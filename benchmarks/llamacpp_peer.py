"""llama.cpp's batch-1 greedy decode of a GGUF, as a peer for bench_engine.py.

Runs in the benchmark's own environment (the one with ``llama-cpp-python``), never the project's:

    <bench-venv>/bin/python benchmarks/llamacpp_peer.py MODEL.gguf --threads 2 --new-tokens 128 --prompt-ids 1,2,3

Prints one JSON line: decode tok/s = (new tokens − 1) / (time after the first new token), time to first token.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-ids", required=True, help="comma-separated token ids (the same prompt cairn gets)")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                n_batch=512, verbose=False)
    prompt = [int(t) for t in args.prompt_ids.split(",")]
    best = None
    for _ in range(args.repeats):
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= args.new_tokens:
                break
        end = time.perf_counter()
        r = {"decode_tok_s": (n - 1) / (end - first), "ttft_s": first - t0, "new_tokens": n}
        if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
            best = r
    print(json.dumps(best))


if __name__ == "__main__":
    main()
