"""How fast does ``cairn serve`` start, and how much memory does it hold, next to llama.cpp's ``llama-server``?

Each server is started on the same GGUF file as a fresh process; ``/health`` is polled every 10 ms from the moment
the process is launched until it answers 200 (llama-server answers 503 while it loads): that is the time to ready.
The CPU time the server used until then (user + system, its own and its finished child processes': a first start's
conversion runs in one) is read from ``/proc/PID/stat`` at that moment: on a shared machine it is the steadier
figure. Then one short chat request (8 new tokens, greedy) is sent, and the resident memory of the process is read
from ``/proc/PID/status`` (``VmRSS``; ``VmHWM``, the peak, and ``RssAnon``, the process's own share, beside it).
cairn is started three ways:

- ``cold``: an empty cache directory (``CAIRN_CACHE_DIR``): the GGUF is converted into the cache and cairn's C
  kernels are compiled, as on a machine's very first start;
- ``new file``: the kernels already built, no converted entry for this file (the first start of another model);
- ``warm``: both cached (every later start).

The medians of ``--runs`` starts of each are printed as a markdown table (the table in ``docs/benchmarks.md``):

    PYTHONPATH=src python benchmarks/bench_startup.py [MODEL.gguf] [--llama-server PATH] [--llama-arg=ARG ...]
        [--runs 3] [--threads 2] [--baseline-src DIR] [--json FILE]

MODEL defaults to the bundled SmolLM2-135M-Instruct Q4_1 file; without ``--llama-server`` only cairn is measured.
``--baseline-src DIR`` (another checkout's ``src/``, e.g. ``git archive HEAD src | tar -x -C DIR``) starts that
code too, each of its starts right after the same kind of start of this one, so that both meet the same load.

Python's bytecode: the servers run as an installed package does, from compiled ``.pyc`` files (written, on the
first of them, under the bench's own temporary ``PYTHONPYCACHEPREFIX``; an untimed start of each source tree
comes first), even where the environment sets ``PYTHONDONTWRITEBYTECODE`` (which would compile cairn's sources
anew at every start, ~0.3 s of CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` and of its children it has waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> tuple[float, float, float]:
    """(VmRSS, VmHWM, RssAnon) of ``pid`` in MiB. RssAnon is the process's own memory; the rest of VmRSS is mapped
    files (libraries, the model), whose resident share depends on the page cache (how much of a shared library the
    kernel maps around each fault), so it moves from machine to machine with no change in the program."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"], fields["RssAnon"]


def get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def chat(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=10) as r:
        model = json.loads(r.read())["data"][0]["id"]
    body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                       "messages": [{"role": "user", "content": "What is the capital of France?"}]}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                 {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())["choices"][0]["message"]["content"]


def start(cmd: list[str], port: int, env: dict, limit: float = 300.0) -> dict:
    """Launch ``cmd``, wait for ``/health`` to answer 200, send one request; the timings and memory."""
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            try:
                if get(f"http://127.0.0.1:{port}/health", timeout=1.0) == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.perf_counter() - t0 > limit:
                raise RuntimeError(f"{cmd[0]} not ready after {limit:.0f} s")
            time.sleep(0.01)
        ready = time.perf_counter() - t0
        cpu = cpu_s(proc.pid)
        rss_ready, _, _ = memory_mb(proc.pid)
        text = chat(port)
        rss, peak, anon = memory_mb(proc.pid)
        return {"ready_s": ready, "cpu_s": cpu, "rss_ready_mb": rss_ready, "rss_mb": rss, "peak_mb": peak,
                "anon_mb": anon, "reply": text}
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def cairn_cmd(model: str, port: int, threads: int) -> list[str]:
    return [sys.executable, "-m", "cairn", "serve", model, "--port", str(port), "--log-level", "warning",
            "--engine-option", f"threads={threads}"]


def run_cairn(model: str, runs: int, threads: int, trees: dict[str, Path], tmp: Path) -> dict[str, list[dict]]:
    """``runs`` cold, new-file and warm starts of each source tree in ``trees`` ({label: src dir}), the trees'
    starts of a kind one after another (so both meet the same load)."""
    envs = {}
    for label, src in trees.items():
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        envs[label] = {**env, "PYTHONPATH": str(src), "PYTHONPYCACHEPREFIX": str(tmp / "pycache" / label)}
        # untimed: compiles the bytecode (and brings the files into the page cache)
        start(cairn_cmd(model, p := free_port(), threads), p, {**envs[label], "CAIRN_CACHE_DIR": str(tmp / label)})
    out: dict[str, list[dict]] = {f"{label}{kind}": [] for kind in ("cold", "new file", "warm") for label in trees}
    for i in range(runs):
        for label in trees:
            cache = tmp / label / f"cold{i}"  # empty: conversion and kernel builds
            out[f"{label}cold"].append(start(cairn_cmd(model, p := free_port(), threads), p,
                                              {**envs[label], "CAIRN_CACHE_DIR": str(cache)}))
    for i in range(runs):
        for label in trees:
            cache = tmp / label / f"new{i}"  # the kernels built, no converted model
            shutil.copytree(tmp / label / "cold0" / "kernels", cache / "kernels")
            out[f"{label}new file"].append(start(cairn_cmd(model, p := free_port(), threads), p,
                                                  {**envs[label], "CAIRN_CACHE_DIR": str(cache)}))
    for _ in range(runs):
        for label in trees:
            out[f"{label}warm"].append(start(cairn_cmd(model, p := free_port(), threads), p,
                                              {**envs[label], "CAIRN_CACHE_DIR": str(tmp / label / "new0")}))
    return out


def run_llama(server: str, model: str, runs: int, threads: int, extra: list[str]) -> list[dict]:
    results = []
    for _ in range(runs):
        port = free_port()
        cmd = [server, "-m", model, "--port", str(port), "--host", "127.0.0.1", "-t", str(threads), *extra]
        results.append(start(cmd, port, dict(os.environ)))
    return results


def import_torch_s(runs: int) -> tuple[float, float]:
    """Median wall and CPU time of a fresh ``python -c "import torch"``: the floor under any cairn start."""
    import resource

    times, cpus = [], []
    for _ in range(runs):
        t, r = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        times.append(time.perf_counter() - t)
        r2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(r2.ru_utime + r2.ru_stime - r.ru_utime - r.ru_stime)
    return statistics.median(times), statistics.median(cpus)


def summary(name: str, rows: list[dict]) -> str:
    med = {k: statistics.median(r[k] for r in rows)
           for k in ("ready_s", "cpu_s", "rss_ready_mb", "rss_mb", "peak_mb", "anon_mb")}
    return (f"| {name} | {med['ready_s']:.2f} s | {min(r['ready_s'] for r in rows):.2f}–"
            f"{max(r['ready_s'] for r in rows):.2f} s | {med['cpu_s']:.2f} s | {med['rss_ready_mb']:.0f} MiB | "
            f"{med['rss_mb']:.0f} MiB | {med['peak_mb']:.0f} MiB | {med['anon_mb']:.0f} MiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="a GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--llama-server", default=None, metavar="PATH", help="llama.cpp's llama-server binary")
    ap.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                    help="an extra llama-server argument (repeatable; else its defaults), e.g. --llama-arg=--no-repack "
                         "where its AMX weight repacking crashes")
    ap.add_argument("--runs", type=int, default=3, help="starts of each kind (medians reported)")
    ap.add_argument("--threads", type=int, default=2, help="compute threads for both servers")
    ap.add_argument("--json", default=None, metavar="FILE", help="also write every run's figures here")
    ap.add_argument("--cairn-src", default=None, metavar="DIR",
                    help="run cairn from this source tree (default: this checkout's src/)")
    ap.add_argument("--baseline-src", default=None, metavar="DIR",
                    help="also run cairn from this source tree (e.g. an older checkout's src/), each start beside the "
                         "same kind of start of the other, for a before/after in the same conditions")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from cairn.weights import default_model_path

    model = str(Path(args.model or default_model_path()).resolve())
    src = Path(args.cairn_src or Path(__file__).resolve().parents[1] / "src").resolve()
    trees = {"": src} if args.baseline_src is None else {"": src, "baseline ": Path(args.baseline_src).resolve()}
    with tempfile.TemporaryDirectory(prefix="cairn-startup-") as tmp:
        runs = run_cairn(model, args.runs, args.threads, trees, Path(tmp))
    results = {}
    for key, rows in runs.items():
        label, kind = ("baseline ", key[9:]) if key.startswith("baseline ") else ("", key)
        results[f"cairn serve{', ' + label.strip() if label else ''} ({kind})"] = rows
    if args.llama_server:
        results["llama-server"] = run_llama(args.llama_server, model, args.runs, args.threads, args.llama_arg)
    load = os.getloadavg()[0]
    print(f"{Path(model).name} ({Path(model).stat().st_size / 2**20:.0f} MiB), {args.runs} starts each, "
          f"{args.threads} threads; medians\n")
    print("| server | /health ready | range | CPU to ready | RSS when ready | RSS after one request | peak RSS | "
          "of it private (RssAnon) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        print(summary(name, rows))
    wall, cpu = import_torch_s(args.runs)
    print(f"\n`python -c 'import torch'` alone (the floor of any cairn start): {wall:.2f} s, {cpu:.2f} s of CPU; "
          f"load average {load:.1f} after the servers, {os.getloadavg()[0]:.1f} now, on {os.cpu_count()} CPUs")
    replies = {name: rows[0]["reply"] for name, rows in results.items()}
    print(f"\nreplies to 'What is the capital of France?' (8 tokens): {json.dumps(replies)}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
