"""Slow clients are closed (issue 14, item 8): a request head or body that trickles in gets 408 and the connection
is dropped, while ordinary keep-alive traffic and long generations are untouched by the deadlines."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from cairn.serve.app import create_app
from cairn.serve.timeouts import BodyDeadline, header_guard
from tests.serve.conftest import PacedEngine, ServerThread

DEADLINE = 1.0  # seconds for a request head, and the base allowance for a body


@pytest.fixture(scope="module")
def guarded(engine):
    # tokens paced at 20/s: a 40-token reply takes twice the head deadline, however fast the machine
    app = create_app(PacedEngine(engine, DEADLINE / 20), read_timeout=DEADLINE, min_body_rate=1024)
    with ServerThread(app, http=header_guard(DEADLINE)) as s:
        yield s


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def _trickle(sock: socket.socket, data: bytes, every: float) -> None:
    """Send ``data`` a byte at a time until the server closes the connection."""
    try:
        for b in data:
            sock.send(bytes([b]))
            time.sleep(every)
    except OSError:
        pass


def test_trickled_headers_get_408_and_are_closed(guarded):
    head = b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n" * 4
    sock = _connect(guarded.url)
    t = threading.Thread(target=_trickle, args=(sock, head, 0.2), daemon=True)
    t.start()
    reply = _read_all(sock)  # returns once the server closes; the socket's own timeout (30 s) would raise
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"did not arrive" in reply
    sock.close()


def test_many_idle_half_open_connections_are_all_dropped(guarded):
    socks = [_connect(guarded.url) for _ in range(40)]
    for s in socks:
        s.send(b"GET /health HTTP/1.1\r\nhost: local")  # a head that never ends
    for s in socks:
        assert _read_all(s).startswith(b"HTTP/1.1 408")
        s.close()
    assert httpx.get(guarded.url + "/health").status_code == 200  # the server still answers


def test_a_body_shorter_than_its_content_length_gets_408(guarded):
    body = json.dumps({"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = _connect(guarded.url)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % (len(body) + 50) + body)
    reply = _read_all(sock).decode()
    head, _, payload = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408"), reply
    assert "connection: close" in head.lower()
    err = json.loads(payload)
    assert err["type"] == "error" and "too slowly" in err["error"]["message"]
    sock.close()


def test_a_trickled_body_gets_408(guarded):
    body = b'{"model": "x", "max_tokens": 1, "messages": [{"role": "user", "content": "' + b"a" * 200 + b'"}]}'
    sock = _connect(guarded.url)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(body))
    t = threading.Thread(target=_trickle, args=(sock, body, 0.1), daemon=True)
    t.start()
    reply = _read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b"too slowly" in reply
    sock.close()


def test_keep_alive_requests_and_long_replies_are_not_cut(guarded):
    with httpx.Client(base_url=guarded.url, timeout=120) as c:
        for _ in range(3):
            assert c.get("/health").status_code == 200
            time.sleep(DEADLINE * 0.6)  # idle between requests, under uvicorn's keep-alive timeout
        # a generation that runs longer than the head deadline, streamed and not
        body = {"model": "default", "max_tokens": 40, "temperature": 0,
                "messages": [{"role": "user", "content": "Count from 1 to 50, one number per line."}]}
        r = c.post("/v1/messages", json=body)
        assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 40
        with c.stream("POST", "/v1/messages", json={**body, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("event:")]
        assert events[-1] == "event: message_stop"
        assert events.count("event: content_block_delta") >= 30


async def _receive_after(messages: list[tuple[float, dict]]):
    import asyncio

    async def receive():
        delay, message = messages.pop(0)
        await asyncio.sleep(delay)
        return message
    return receive


def test_body_deadline_grows_with_the_bytes_received_and_steps_aside_after_the_body():
    import asyncio

    from cairn.serve.timeouts import SlowBody

    async def run(schedule, timeout, rate):
        deadline = BodyDeadline(await _receive_after(schedule), timeout, rate)
        out = []
        while True:
            try:
                out.append(await deadline())
            except SlowBody as e:
                return out, e
            if deadline.done and out[-1]["type"] != "http.request":
                return out, None
            if deadline.done and len(out) > 1 and out[-1]["type"] == "http.request":
                out.append(await deadline())  # the disconnect wait is not timed
                return out, None

    # 3 chunks of 1000 bytes, 0.1 s apart: within 0.15 s + 1000 B / 10 kB/s per chunk
    chunks = [(0.1, {"type": "http.request", "body": b"x" * 1000, "more_body": True}),
              (0.1, {"type": "http.request", "body": b"x" * 1000, "more_body": True}),
              (0.1, {"type": "http.request", "body": b"x" * 1000, "more_body": False}),
              (0.5, {"type": "http.disconnect"})]
    out, err = asyncio.run(run(list(chunks), 0.15, 10_000))
    assert err is None and [m["type"] for m in out] == ["http.request"] * 3 + ["http.disconnect"]
    # the same chunks at a required 100 kB/s: the second chunk is late
    out, err = asyncio.run(run(list(chunks), 0.15, 100_000))
    assert err is not None and err.status_code == 408 and len(out) == 1
    assert "1000 bytes" in err.detail


def test_read_timeout_must_be_positive(engine):
    from cairn.errors import CairnError

    with pytest.raises(CairnError, match="read timeout"):
        create_app(engine, read_timeout=0)
