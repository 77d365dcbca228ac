"""The inference engine on the default model (SmolLM2-135M-Instruct), side by side with its peers, in one run.

    .venv/bin/python benchmarks/bench_engine.py [--threads 2] [--new-tokens 128] [--bench-python PATH]
                                                [--skip-hf] [--out report.md]

1. Batch-1 greedy decode tok/s: cairn (fp32, int8, int4) vs llama.cpp (``llama-cpp-python`` from the
   benchmark's own environment, run as a subprocess: same GGUF, same thread count) vs HF ``transformers``
   (the same GGUF through ``from_pretrained(dir, gguf_file=...)``). Decode = (new − 1) / (time after the 1st token).
2. Aggregate tok/s with 1, 4 and 16 concurrent requests (continuous batching), and llama.cpp decoding the same
   prompts together through its batch API (the same GGUF and thread count; all requests present from the start).
3. Time to first token after a ~2,000-token shared prefix: prefix-cache miss vs hit.
4. KV memory and decode tok/s against context length (512 → 16k), full attention vs window + sinks. The KV of
   the context is written directly into the pool (random values: decode cost does not depend on them), so the
   sweep measures decode at that context without spending minutes on 16k-token prefills.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
DEFAULT_BENCH_PY = str(ROOT / ".venv-bench" / "bin" / "python")  # made by `make bench-venv`


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ batch-1 decode
def cairn_decode(lm, ids: list[int], n: int, **opts) -> dict:
    from cairn.engine import Engine, Request, SamplingParams

    # no prefix cache: each run computes the whole prompt, so TTFT is a cold prompt's, as llama.cpp's (reset before
    # each run) and HF's are; prefix_ttft() measures the cache
    with Engine(lm, kv_memory_mb=256, prefix_caching=False, **opts) as engine:
        engine.generate(Request(ids, SamplingParams(max_tokens=8, temperature=0)))  # warm-up
        best = None
        for _ in range(2):
            r = {**decode_once(engine, ids, n), "weight_mb": engine.stats()["weight_bytes"] / 2**20}
            if best is None or r["decode_tok_s"] > best["decode_tok_s"]:
                best = r
    return best


def decode_once(engine, ids: list[int], n: int) -> dict:
    """One greedy request of ``n`` new tokens (EOS ignored) through ``engine.events``: decode tok/s = (new − 1) /
    (time after the first token), TTFT."""
    from cairn.engine import Request, SamplingParams

    t0 = time.perf_counter()
    first, count = None, 0
    for ev in engine.events(Request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))):
        if getattr(ev, "token_ids", None):
            count += len(ev.token_ids)
            if first is None:
                first = time.perf_counter()
    end = time.perf_counter()
    return {"decode_tok_s": (count - 1) / (end - first), "ttft_s": first - t0, "tokens": count}


def llamacpp_peer(bench_py: str, gguf: Path, n: int, threads: int, *args: str) -> dict | None:
    """Run ``llamacpp_peer.py`` in the llama.cpp environment; its JSON line, or None (logged) if it cannot run."""
    if not Path(bench_py).is_file():
        log(f"llama.cpp peer skipped: {bench_py} not found")
        return None
    cmd = [bench_py, str(ROOT / "benchmarks" / "llamacpp_peer.py"), str(gguf), "--threads", str(threads),
           "--new-tokens", str(n), *args]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        log(f"llama.cpp peer failed: {out.stderr[-500:]}")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def llamacpp_decode(bench_py: str, gguf: Path, ids: list[int], n: int, threads: int) -> dict | None:
    return llamacpp_peer(bench_py, gguf, n, threads, "--prompt-ids", ",".join(map(str, ids)))


def hf_decode(gguf: Path, ids: list[int], n: int) -> dict:
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    load = time.perf_counter() - t0
    x = torch.tensor([ids])
    with torch.inference_mode():
        model.generate(x, max_new_tokens=4, do_sample=False)
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        total = time.perf_counter() - t0
    new = out.shape[1] - len(ids)
    return {"decode_tok_s": (new - 1) / (total - ttft), "ttft_s": ttft, "load_s": load}


# --------------------------------------------------------------- concurrency
def aggregate(lm, prompts: list[list[int]], n: int, **opts) -> dict:
    from cairn.engine import Engine, Request, SamplingParams

    with Engine(lm, kv_memory_mb=512, eager_kernels=True, **opts) as engine:
        engine.generate(Request(prompts[0], SamplingParams(max_tokens=4, temperature=0)))
        reqs = [Request(p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)) for p in prompts]
        done: dict = {}
        t0 = time.perf_counter()
        threads = [threading.Thread(target=lambda r=r: done.__setitem__(r.id, engine.generate(r))) for r in reqs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        tokens = sum(len(c.token_ids) for c in done.values())
    return {"concurrent": len(prompts), "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


# ------------------------------------------------------------------ prefix TTFT
def prefix_ttft(lm, prefix: list[int], suffixes: list[list[int]], **opts) -> dict:
    from cairn.engine import Engine, Request, SamplingParams

    def ttft(engine, ids) -> tuple[float, int]:
        t0 = time.perf_counter()
        for ev in engine.events(Request(ids, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))):
            if getattr(ev, "token_ids", None):
                dt = time.perf_counter() - t0
            else:
                cached = ev.usage.cached_prompt_tokens
        return dt, cached

    with Engine(lm, kv_memory_mb=512, **opts) as engine:
        miss, miss_cached = ttft(engine, prefix + suffixes[0])  # cold: computes the whole prompt
        hit, hit_cached = ttft(engine, prefix + suffixes[1])  # the shared prefix comes from the cache
    return {"prompt_tokens": len(prefix) + len(suffixes[1]), "miss_s": miss, "hit_s": hit,
            "hit_cached_tokens": hit_cached, "miss_cached_tokens": miss_cached, "ratio": hit / miss}


# --------------------------------------------------------------- context sweep
def context_sweep(lm, lengths: list[int], window: int | None, sinks: int, steps: int = 6, **opts) -> list[dict]:
    """Decode tok/s and KV bytes at each context length (KV filled directly; see the module doc)."""
    from cairn.engine.engine import resolve_kv_dtype
    from cairn.engine.kv import KVPool, SequenceKV
    from cairn.engine.runner import InferenceWeights, Runner, Segment

    cfg = lm.config
    dtype = resolve_kv_dtype("auto", opts.get("quantize", "none"), torch.float32)  # the engine's default pool
    bs = 16
    fill = 256  # tokens claimed per chunk while filling
    need = (max(lengths) + steps + bs) // bs + 4 if window is None else (window + sinks + fill + steps) // bs + 4
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, need, bs, dtype, prefix_caching=False)
    pool.k.normal_()
    pool.v.normal_()
    runner = Runner(InferenceWeights(lm.model, **opts), pool, window, sinks)
    rows = []
    for n in lengths:
        kv = SequenceKV(pool, window, sinks)
        tokens = [1] * n
        # claim blocks for n tokens chunk by chunk, freeing what leaves the window as a real prefill would
        done = 0
        while done < n:
            step = min(fill, n - done)
            kv.reserve(step)
            kv.commit(tokens, step)
            done += step
        times = []
        for _ in range(steps):
            slots = kv.reserve(1)
            t0 = time.perf_counter()
            runner.forward([Segment(kv, [1], kv.length, slots, True)])
            times.append(time.perf_counter() - t0)
            tokens.append(1)
            kv.commit(tokens, 1)
        rows.append({"context": n, "kv_mb": pool.n_used() * pool.block_bytes / 2**20,
                     "decode_tok_s": 1 / sorted(times)[len(times) // 2]})
        kv.release()
    pool.close()
    return rows


# ------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--bench-python", default=os.environ.get("CAIRN_BENCH_PYTHON", DEFAULT_BENCH_PY),
                    help="python of the environment with llama-cpp-python")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--sinks", type=int, default=16)
    ap.add_argument("--max-context", type=int, default=16384)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--sections", default="batch1,aggregate,prefix,context",
                    help="which of batch1,aggregate,prefix,context to run (the report has what ran)")
    ap.add_argument("--out", default=None, help="write a markdown report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from cairn.weights import default_model_path, load_model

    gguf = default_model_path()
    lm = load_model(None)
    tok = lm.tokenizer
    ids = tok.encode_chat(PROMPT)
    n = args.new_tokens
    results: dict = {"threads": args.threads, "new_tokens": n, "prompt_tokens": len(ids)}

    sections = set(args.sections.split(","))
    if "batch1" in sections:
        results["batch1"] = batch1(lm, gguf, ids, n, args)
    if "aggregate" in sections:
        results["aggregate"] = aggregate_all(lm, tok, args)
    if "prefix" in sections:
        log("3. prefix-cache TTFT")
        base = ("You are a careful assistant. Here is the reference manual you must follow. " * 200).strip()
        prefix = tok.encode(base)[:2000]
        suffixes = [tok.encode(" Question: what is the first rule?"), tok.encode(" Question: summarise section 2.")]
        results["prefix"] = {q.replace("none", "fp32"): prefix_ttft(lm, prefix, suffixes, quantize=q)
                             for q in QUANT_MODES}
        log(f"   {results['prefix']}")
    if "context" in sections:
        log("4. context sweep")
        lengths = [c for c in (512, 1024, 2048, 4096, 8192, 16384) if c <= args.max_context]
        results["context"] = {
            "full": context_sweep(lm, lengths, None, 0, quantize="int4"),
            f"window {args.window} + {args.sinks} sinks": context_sweep(lm, lengths, args.window, args.sinks,
                                                                       quantize="int4"),
        }
        log(f"   {results['context']}")
    report = render(results, " ".join(sys.argv[1:]))
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    print(json.dumps(results), file=sys.stderr)
    return 0


QUANT_MODES = ("none", "int8", "int4")


def batch1(lm, gguf: Path, ids: list[int], n: int, args) -> dict:
    log("1. batch-1 decode")
    b1 = {}
    for name, opts in (("cairn fp32", {"quantize": "none"}), ("cairn int8", {"quantize": "int8"}),
                       ("cairn int4 (G=32)", {"quantize": "int4"})):
        b1[name] = cairn_decode(lm, ids, n, **opts)
        log(f"   {name}: {b1[name]}")
    b1["llama.cpp"] = llamacpp_decode(args.bench_python, gguf, ids, n, args.threads)
    log(f"   llama.cpp: {b1['llama.cpp']}")
    if not args.skip_hf:
        b1["HF transformers fp32"] = hf_decode(gguf, ids, n)
        log(f"   HF: {b1['HF transformers fp32']}")
    return b1


def aggregate_all(lm, tok, args) -> dict:
    from cairn.weights import default_model_path

    log("2. aggregate throughput")
    stories = ["a lighthouse keeper", "a dragon who bakes bread", "the first city on Mars", "a lost violin",
               "two rival chess players", "a river that flows uphill", "a robot gardener", "an old map"]
    prompts = [tok.encode_chat([{"role": "user", "content": f"Write a story about {s} (version {i})."}])
               for i in range(2) for s in stories]
    agg = {}
    conc = [int(c) for c in args.concurrency.split(",")]
    for q in QUANT_MODES:
        key = q.replace("none", "fp32")
        agg[key] = [aggregate(lm, prompts[:c], 64, quantize=q) for c in conc]
        log(f"   {key}: {agg[key]}")
    peer = [llamacpp_batched(args.bench_python, default_model_path(), prompts[:c], 64, args.threads) for c in conc]
    if all(peer):
        agg["llama.cpp (Q4_1, all requests in one batch)"] = peer
        log(f"   llama.cpp: {peer}")
    return agg


def llamacpp_batched(bench_py: str, gguf: Path, prompts: list[list[int]], n: int, threads: int) -> dict | None:
    """llama.cpp decoding ``prompts`` together (its batch API, one sequence each), as the aggregate's peer."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
    try:
        r = llamacpp_peer(bench_py, gguf, n, threads, "--prompts-json", f.name)
    finally:
        os.unlink(f.name)
    if r is not None:
        r.pop("first_sequence", None)
    return r


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table under a ``###`` title; the first column left-aligned, the others right-aligned."""
    return ["", f"### {title}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1),
            *("| " + " | ".join(row) + " |" for row in rows)]


def render(r: dict, argv: str) -> str:
    lines = [f"Command: `PYTHONPATH=src .venv/bin/python benchmarks/bench_engine.py {argv}`".replace("  ", " "),
             "", f"threads = {r['threads']}, greedy, {r['new_tokens']} new tokens after a {r['prompt_tokens']}-token "
             "chat prompt, EOS ignored."]
    if "batch1" in r:
        b1 = {k: v for k, v in r["batch1"].items() if v is not None}
        ref_l = (b1.get("llama.cpp") or {}).get("decode_tok_s")
        ref_h = (b1.get("HF transformers fp32") or {}).get("decode_tok_s")

        def vs(v: dict, ref: float | None) -> str:
            return f"{v['decode_tok_s'] / ref:.2f}×" if ref else "–"

        lines += _table("Batch-1 decode", ["engine", "decode tok/s", "TTFT s", "vs llama.cpp", "vs HF"],
                        [[name, f"{v['decode_tok_s']:.1f}", f"{v['ttft_s']:.3f}", vs(v, ref_l), vs(v, ref_h)]
                         for name, v in b1.items()])
    if "aggregate" in r:
        rows = []
        for key, runs in r["aggregate"].items():
            t = [x["tok_s"] for x in runs] + [float("nan")] * 3
            rows.append([key, f"{t[0]:.1f}", f"{t[1]:.1f}", f"{t[2]:.1f}", f"{t[2] / t[0]:.1f}×"])
        lines += _table("Aggregate throughput (continuous batching, 64 new tokens per request)",
                        ["weights", "1 request tok/s", "4 requests tok/s", "16 requests tok/s", "16 vs 1"], rows)
    if "prefix" in r:
        lines += _table("Time to first token after a 2,000-token shared prefix",
                        ["weights", "prompt tokens", "miss s", "hit s (cached tokens)", "hit / miss"],
                        [[key, str(v["prompt_tokens"]), f"{v['miss_s']:.3f}",
                          f"{v['hit_s']:.3f} ({v['hit_cached_tokens']})", f"{v['ratio']:.3f}"]
                         for key, v in r["prefix"].items()])
    if "context" in r:
        kinds = list(r["context"])
        rows = [[str(row["context"])] + [f"{r['context'][k][i][f]:.1f}" for k in kinds for f in ("kv_mb",
                                                                                               "decode_tok_s")]
                for i, row in enumerate(r["context"][kinds[0]])]
        lines += _table("KV memory and decode speed vs context (int4 weights, fp16 KV)",
                        ["context", *(f"{k}: {c}" for k in kinds for c in ("KV MiB", "tok/s"))], rows)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
