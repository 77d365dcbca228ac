"""Load time and batch-1 decode speed of the default model: cairn against HF transformers, in one run.

    .venv/bin/python benchmarks/bench_foundation.py [--new-tokens 128] [--threads 2] [--skip-cold]

Load: a fresh process each (import included, as a user sees it): cairn with a warm converted-model cache, cairn
converting the GGUF from scratch (empty cache), and transformers' GGUF path; and, in the same processes, the
load call alone (``load_model`` vs ``from_pretrained``, after the imports). Decode: greedy, 128 new tokens after
the chat prompt, EOS ignored; the figure is new tokens / (total time − time to first token). cairn decodes in fp32,
bf16, and with the engine's int8 and int4 weights (int4 = the file's own Q4_1 codes, read by cairn's kernel).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]

CAIRN_LOAD = """
import time, json, sys
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from cairn.weights import load_model
t1 = time.perf_counter()
lm = load_model(None)
t2 = time.perf_counter()
print(json.dumps({{"load_s": t2 - t0, "call_s": t2 - t1}}))
"""

HF_LOAD = """
import time, json
t0 = time.perf_counter()
import torch
torch.set_num_threads({threads})
from transformers import AutoModelForCausalLM
from cairn.weights import default_model_path
p = default_model_path()
t1 = time.perf_counter()
m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
t2 = time.perf_counter()
print(json.dumps({{"load_s": t2 - t0, "call_s": t2 - t1}}))
"""


def run_py(code: str, env: dict | None = None) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_cairn(n: int, dtype: str = "fp32", quantize: str = "none") -> dict:
    import torch

    from cairn.engine import Engine, Request, SamplingParams, TokenEvent
    from cairn.weights import load_model

    lm = load_model(None, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype])
    engine = Engine(lm, quantize=quantize)
    ids = lm.tokenizer.encode_chat(PROMPT)
    engine.generate(Request(ids, SamplingParams(max_tokens=8, temperature=0)))  # warm-up
    t0 = time.perf_counter()
    first = None
    count = 0
    for ev in engine.events(Request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))):
        if isinstance(ev, TokenEvent):
            count += len(ev.token_ids)
            if first is None:
                first = time.perf_counter()
    total = time.perf_counter() - t0
    engine.close()
    return {"tok_s": (count - 1) / (total - (first - t0)), "ttft_s": first - t0, "tokens": count}


def decode_hf(n: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cairn.weights import default_model_path

    p = default_model_path()
    tok = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    model = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32).eval()
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    x = ids["input_ids"]
    kw = dict(do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(x, max_new_tokens=8, **kw)  # warm-up
        t0 = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
        total = time.perf_counter() - t0
    count = out.shape[1] - x.shape[1]
    return {"tok_s": (count - 1) / (total - ttft), "ttft_s": ttft, "tokens": count}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-cold", action="store_true", help="skip the from-scratch GGUF conversion timing")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    run_py(CAIRN_LOAD.format(threads=args.threads))  # make sure the cache is warm
    warm_runs = [run_py(CAIRN_LOAD.format(threads=args.threads)) for _ in range(3)]
    warm = min(r["load_s"] for r in warm_runs)
    warm_call = min(r["call_s"] for r in warm_runs)
    rows.append(("load, cairn (cached): process", f"{warm:.2f} s"))
    rows.append(("load, cairn (cached): load_model call", f"{warm_call:.2f} s"))
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as d:
            env = dict(os.environ, CAIRN_CACHE_DIR=d)
            cold = run_py(CAIRN_LOAD.format(threads=args.threads), env)["load_s"]
        rows.append(("load, cairn (first time: convert): process", f"{cold:.2f} s"))
    hf = run_py(HF_LOAD.format(threads=args.threads))
    rows.append(("load, transformers GGUF: process", f"{hf['load_s']:.2f} s"))
    rows.append(("load, transformers GGUF: from_pretrained call", f"{hf['call_s']:.2f} s"))
    rows.append(("load speed-up, process (HF / cairn cached)", f"{hf['load_s'] / warm:.1f}x"))
    rows.append(("load speed-up, load call (HF / cairn cached)", f"{hf['call_s'] / warm_call:.1f}x"))
    h = decode_hf(args.new_tokens)
    rows.append((f"decode tok/s, transformers generate fp32 ({args.new_tokens} new)", f"{h['tok_s']:.1f}"))
    for name, kw in (("fp32", {}), ("bf16", {"dtype": "bf16"}), ("int8", {"quantize": "int8"}),
                     ("int4", {"quantize": "int4"})):
        c = decode_cairn(args.new_tokens, **kw)
        rows.append((f"decode tok/s, cairn {name} ({args.new_tokens} new)", f"{c['tok_s']:.1f}"))
        rows.append((f"decode speed-up (cairn {name} / HF)", f"{c['tok_s'] / h['tok_s']:.2f}x"))
    width = max(len(r[0]) for r in rows)
    print(f"threads={args.threads}  torch={torch.__version__}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
