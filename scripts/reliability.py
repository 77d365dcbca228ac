"""Try `cairn serve` as an attacker and an unlucky user would, and print what held (docs/reliability.md).

    .venv/bin/python scripts/reliability.py [--port 8791] [--soak 400] [--json out.json]

Starts `cairn serve` on the default model (a subprocess, 2 threads, --max-queue 64, --read-timeout 5) and runs:

1. disconnects: 64 streaming clients at once over both APIs, every other one leaving after a few events; then the
   KV blocks in use must be back to where they started, and no request may get a 5xx;
2. queue limit: 128 requests at once against --max-queue 64: the rest get 529 with retry-after, no other 5xx;
3. slow clients: 100 connections sending their headers a byte every 2 s (slowloris) and 20 sending a body shorter
   than its Content-Length: every one must be closed by the server (408) within the read timeout plus a margin,
   while /health keeps answering;
4. a 20 MiB count_tokens body while a reply streams: the longest gap between the stream's events and /health's
   worst latency meanwhile;
5. soak: N short requests from 8 clients; errors, and the server's resident memory at the start, middle and end.

Figures depend on the machine and on what else runs on it; the counts (errors, 5xx, blocks, closed connections)
do not.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

KEY = "sk-reliability"
H = {"x-api-key": KEY}
MODEL = "default"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def stream_one(c: httpx.AsyncClient, i: int, leave_after: int | None) -> int:
    """One streaming request; returns its HTTP status (0 for a transport error)."""
    if i % 2:
        path, body = "/v1/messages", {"model": MODEL, "max_tokens": 48, "stream": True,
                                      "messages": [{"role": "user", "content": f"Tell me fact number {i}."}]}
    else:
        path, body = "/v1/chat/completions", {"model": MODEL, "max_tokens": 48, "stream": True,
                                              "messages": [{"role": "user", "content": f"Name {i} colours."}]}
    try:
        async with c.stream("POST", path, json=body, headers=H) as r:
            n = 0
            async for _ in r.aiter_lines():
                n += 1
                if leave_after is not None and n >= leave_after:
                    break
            return r.status_code
    except httpx.HTTPError:
        return 0


async def disconnects(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        before = metric((await c.get("/metrics", headers=H)).text, "cairn_kv_blocks_used")
        statuses = await asyncio.gather(*(stream_one(c, i, 6 if i % 2 else None) for i in range(64)))
        await asyncio.sleep(1.0)
        m = (await c.get("/metrics", headers=H)).text
    return {"clients": 64, "left_midway": 32, "status_counts": {str(s): statuses.count(s) for s in set(statuses)},
            "5xx": sum(s >= 500 for s in statuses), "kv_blocks_used_before": before,
            "kv_blocks_used_after": metric(m, "cairn_kv_blocks_used"),
            "requests_in_flight_after": metric(m, "cairn_requests_in_flight")}


async def queue_limit(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        body = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello."}]}
        rs = await asyncio.gather(*(c.post("/v1/messages", json=body, headers=H) for _ in range(128)),
                                  return_exceptions=True)
    codes = [r.status_code if isinstance(r, httpx.Response) else 0 for r in rs]
    retry = all(r.headers.get("retry-after") for r in rs if isinstance(r, httpx.Response) and r.status_code == 529)
    return {"requests": 128, "max_queue": 64, "status_counts": {str(s): codes.count(s) for s in set(codes)},
            "5xx_other_than_529": sum(s >= 500 and s != 529 for s in codes), "529_have_retry_after": retry}


def slow_clients(url: str, read_timeout: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for i in range(120):
        s = socket.create_connection((host, int(port)))
        s.setblocking(False)
        socks.append((s, i >= 100))
    t0 = time.monotonic()
    head = b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\nx-api-key: " + KEY.encode() + b"\r\n"
    for s, short_body in socks:
        if short_body:  # a whole head, then a body shorter than it says
            s.send(head + b"content-type: application/json\r\ncontent-length: 500\r\n\r\n{\"model\":")
    closed: dict[int, float] = {}
    replies: dict[int, bytes] = {}
    health: list[float] = []
    sent = 0
    while len(closed) < len(socks) and time.monotonic() - t0 < read_timeout * 4 + 30:
        if time.monotonic() - t0 >= sent * 2.0:  # a byte every 2 s on each slowloris connection
            for i, (s, short_body) in enumerate(socks):
                if not short_body and i not in closed and sent < len(head):
                    try:
                        s.send(head[sent:sent + 1])
                    except OSError:
                        closed.setdefault(i, time.monotonic() - t0)
            sent += 1
            h0 = time.monotonic()
            httpx.get(url + "/health", timeout=30)
            health.append(time.monotonic() - h0)
        for i, (s, _) in enumerate(socks):
            if i in closed:
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                replies[i] = replies.get(i, b"") + data
            else:
                closed[i] = time.monotonic() - t0
        time.sleep(0.05)
    for s, _ in socks:
        s.close()
    got_408 = sum(r.startswith(b"HTTP/1.1 408") for r in replies.values())
    return {"slowloris_connections": 100, "short_body_connections": 20, "closed_by_server": len(closed),
            "answered_408": got_408, "last_closed_after_s": round(max(closed.values(), default=float("nan")), 2),
            "read_timeout_s": read_timeout, "health_worst_s": round(max(health, default=float("nan")), 3)}


async def big_body(url: str) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        gaps: list[float] = []

        async def streamer():
            body = {"model": MODEL, "max_tokens": 200, "stream": True,
                    "messages": [{"role": "user", "content": "Write a long story about a lighthouse."}]}
            last = None
            async with c.stream("POST", "/v1/messages", json=body, headers=H) as r:
                async for _ in r.aiter_lines():
                    now = time.monotonic()
                    if last is not None:
                        gaps.append(now - last)
                    last = now

        async def heavy():
            await asyncio.sleep(1.0)
            text = "lorem ipsum dolor sit amet " * (20 * 1024 * 1024 // 27)
            r = await c.post("/v1/messages/count_tokens", headers=H,
                             json={"model": MODEL, "messages": [{"role": "user", "content": text}]})
            return r.status_code

        async def probe():
            worst = 0.0
            for _ in range(40):
                t = time.monotonic()
                await c.get("/health")
                worst = max(worst, time.monotonic() - t)
                await asyncio.sleep(0.25)
            return worst

        _, status, worst = await asyncio.gather(streamer(), heavy(), probe())
    return {"count_tokens_MiB": 20, "count_tokens_status": status, "stream_worst_gap_s": round(max(gaps), 3),
            "health_worst_s": round(worst, 3)}


async def soak(url: str, n: int, pid: int) -> dict:
    rss = [rss_mb(pid)]
    errors = 0
    done = 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def worker(k: int):
            nonlocal errors, done
            while done < n:
                done += 1
                i = done
                path, body = (("/v1/messages", {"model": MODEL, "max_tokens": 8, "messages": [
                    {"role": "user", "content": f"Request {i}: say a word."}]}) if i % 3 else
                    ("/v1/completions", {"model": MODEL, "max_tokens": 8, "prompt": f"Request {i}:"}))
                try:
                    r = await c.post(path, json=body, headers=H)
                    errors += r.status_code != 200
                except httpx.HTTPError:
                    errors += 1
                if i == n // 2:
                    rss.append(rss_mb(pid))

        t0 = time.monotonic()
        await asyncio.gather(*(worker(k) for k in range(8)))
        took = time.monotonic() - t0
    rss.append(rss_mb(pid))
    return {"requests": n, "errors": errors, "seconds": round(took, 1),
            "rss_mb_start_mid_end": [round(x) for x in rss]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8791)
    ap.add_argument("--soak", type=int, default=400, help="requests in the soak (default 400)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()
    url = f"http://127.0.0.1:{args.port}"
    read_timeout = 5.0
    cmd = [sys.executable, "-m", "cairn", "serve", "--port", str(args.port), "--api-key", KEY, "--max-queue", "64",
           "--read-timeout", str(read_timeout), "--log-level", "warning", "--engine-option", "threads=2"]
    proc = subprocess.Popen(cmd, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                print(proc.stderr.read() if proc.stderr else "", file=sys.stderr)
                return 1
            time.sleep(0.2)
        results = {"rss_mb_ready": round(rss_mb(proc.pid))}
        for name, run in (("disconnects", lambda: asyncio.run(disconnects(url))),
                          ("queue_limit", lambda: asyncio.run(queue_limit(url))),
                          ("slow_clients", lambda: slow_clients(url, read_timeout)),
                          ("big_count_tokens", lambda: asyncio.run(big_body(url))),
                          ("soak", lambda: asyncio.run(soak(url, args.soak, proc.pid)))):
            t0 = time.monotonic()
            results[name] = run()
            print(f"{name} ({time.monotonic() - t0:.0f} s): {json.dumps(results[name])}", flush=True)
        results["server_alive"] = proc.poll() is None
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
        print(json.dumps(results))
        return 0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    sys.exit(main())
