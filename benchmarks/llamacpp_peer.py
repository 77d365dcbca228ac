"""llama.cpp on a GGUF, as a peer for bench_engine.py: batch-1 greedy decode, or many sequences decoded together.

Runs in the benchmark's own environment (the one with ``llama-cpp-python``), never the project's:

    <bench-venv>/bin/python benchmarks/llamacpp_peer.py MODEL.gguf --threads 2 --new-tokens 128 --prompt-ids 1,2,3
    <bench-venv>/bin/python benchmarks/llamacpp_peer.py MODEL.gguf --threads 2 --new-tokens 64 --prompts-json P.json

Prints one JSON line. Batch-1: decode tok/s = (new tokens − 1) / (time after the first new token), time to first
token. ``--prompts-json`` (a list of token-id lists): aggregate tok/s of greedy decoding all of them at once with
llama.cpp's own batch API: every prompt in one ``llama_decode`` call (one sequence id each), then one call per step
with one token of every sequence; tok/s = new tokens of all sequences / the whole time, prefill included (the peer's
best case: all requests present from the start, no scheduler).
"""

from __future__ import annotations

import argparse
import json
import time


def batch1(llm, prompt: list[int], n_new: int, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        llm.reset()
        t0 = time.perf_counter()
        first = None
        n = 0
        for _tok in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            n += 1
            if first is None:
                first = time.perf_counter()
            if n >= n_new:
                break
        end = time.perf_counter()
        r = {"decode_tok_s": (n - 1) / (end - first), "ttft_s": first - t0, "new_tokens": n}
        if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
            best = r
    return best


def batched(llm, prompts: list[list[int]], n_new: int, threads: int, repeats: int) -> dict:
    import llama_cpp
    import numpy as np

    n_seq = len(prompts)
    total_prompt = sum(map(len, prompts))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = n_seq * (max(map(len, prompts)) + n_new + 16)  # each sequence may get an equal share
    params.n_batch = params.n_ubatch = max(total_prompt, n_seq)
    params.n_seq_max = n_seq
    params.n_threads = params.n_threads_batch = threads
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
    batch = llama_cpp.llama_batch_init(max(total_prompt, n_seq), 0, n_seq)

    def run(items: list[tuple[int, int, int, bool]]) -> None:  # (token, position, sequence, wants logits)
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, out
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def greedy(i: int) -> int:
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    best = None
    try:
        for _ in range(repeats):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            t0 = time.perf_counter()
            items = [(t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)]
            run(items)
            nxt = [greedy(i) for i, it in enumerate(items) if it[3]]  # each prompt's last row, in sequence order
            first = [nxt[0]]
            made = n_seq
            for step in range(1, n_new):
                run([(nxt[s], len(prompts[s]) + step - 1, s, True) for s in range(n_seq)])
                nxt = [greedy(s) for s in range(n_seq)]
                first.append(nxt[0])
                made += n_seq
            wall = time.perf_counter() - t0
            # the first sequence's tokens, to check against a batch-1 run of the same prompt
            r = {"sequences": n_seq, "tokens": made, "wall_s": wall, "tok_s": made / wall, "first_sequence": first}
            if best is None or r["tok_s"] > best["tok_s"]:
                best = r
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-ids", help="comma-separated token ids (the same prompt cairn gets)")
    ap.add_argument("--prompts-json", help="a JSON file with a list of prompts (token-id lists) to decode together")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    if bool(args.prompt_ids) == bool(args.prompts_json):
        ap.error("give exactly one of --prompt-ids and --prompts-json")

    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=2048,
                n_batch=512, verbose=False)
    if args.prompt_ids:
        print(json.dumps(batch1(llm, [int(t) for t in args.prompt_ids.split(",")], args.new_tokens, args.repeats)))
    else:
        with open(args.prompts_json) as f:
            prompts = json.load(f)
        print(json.dumps(batched(llm, prompts, args.new_tokens, args.threads, args.repeats)))


if __name__ == "__main__":
    main()
