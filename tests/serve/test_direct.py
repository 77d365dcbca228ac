"""Streamed token frames written by the engine thread (cairn.serve.direct): the same streams as the event loop
writes, in order, whatever the client does — reads slowly, leaves, or waits through a ping."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from cairn.engine.types import FinishEvent
from cairn.serve import direct
from cairn.serve.app import create_app

from .conftest import KEYS, ServerThread


@pytest.fixture()
def writes(monkeypatch):
    """Every direct write: (thread name, bytes the socket did not take)."""
    seen: list[tuple[str, int]] = []
    real = direct.DirectWriter.write

    def write(self, frame):
        rest = real(self, frame)
        seen.append((threading.current_thread().name, len(rest)))
        return rest

    monkeypatch.setattr(direct.DirectWriter, "write", write)
    return seen


@pytest.fixture(scope="module")
def loop_server(engine):
    """uvicorn's own HTTP protocol: no transport in the scope, so the event loop writes every frame."""
    with ServerThread(create_app(engine, api_keys=KEYS), http="h11") as s:
        yield s


def raw_request(url: str, path: str, body: dict, headers: dict, rcvbuf: int | None = None,
                pause: float = 0.0) -> tuple[bytes, bytes]:
    """POST over a raw socket (optionally with a small receive buffer, reading nothing for ``pause`` seconds after
    the request); the response head and the de-chunked body."""
    host, port = url.rsplit("//", 1)[1].split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 f"content-length: {len(data)}\r\n{head}\r\n".encode() + data)
    time.sleep(pause)
    raw = b""
    sock.settimeout(120)
    while chunk := sock.recv(65536):
        raw += chunk
    sock.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body_out = b""
    while True:  # strict chunked decoding: a frame torn or misplaced by a direct write fails here
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        assert rest[size:size + 2] == b"\r\n", rest[:size + 8]
        body_out, rest = body_out + rest[:size], rest[size + 2:]
    return head, body_out


def events(body: bytes) -> list[tuple[str | None, dict | str]]:
    out = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        kind, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
        out.append((kind, data if data in (None, "[DONE]") else json.loads(data)))
    return out


AUTH = {"authorization": f"Bearer {KEYS[0]}"}


def chat(max_tokens: int, stream: bool = True) -> dict:
    return {"model": "default", "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
            **({"stream_options": {"include_usage": True}} if stream else {})}


def openai_text(evs) -> str:
    return "".join(c["delta"].get("content") or "" for _, e in evs if isinstance(e, dict)
                   for c in e.get("choices", []))


def test_openai_stream_is_written_by_the_engine_thread_as_the_loop_writes_it(server, loop_server, writes):
    _, direct_body = raw_request(server.url, "/v1/chat/completions", chat(48), AUTH)
    threads = {name for name, _ in writes}
    assert len(writes) >= 40 and threads == {"cairn-engine"}, (len(writes), threads)
    writes.clear()
    _, loop_body = raw_request(loop_server.url, "/v1/chat/completions", chat(48), AUTH)
    assert writes == []  # the other protocol offers no transport: the loop wrote it all

    def strip(evs):  # ids, timestamps and the prefix cache's share of the prompt differ between two requests
        return [(k, {x: y for x, y in e.items() if x not in ("id", "created", "usage")} if isinstance(e, dict) else e)
                for k, e in evs]

    assert strip(events(direct_body)) == strip(events(loop_body))
    evs = events(direct_body)
    assert evs[-1] == (None, "[DONE]") and evs[-2][1]["usage"]["completion_tokens"] == 48
    import urllib.request

    req = urllib.request.Request(server.url + "/v1/chat/completions", json.dumps(chat(48, stream=False)).encode(),
                                 {"content-type": "application/json", **AUTH})
    reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
    assert openai_text(evs) == reply["choices"][0]["message"]["content"]


def test_anthropic_stream_is_written_by_the_engine_thread_as_the_loop_writes_it(server, loop_server, writes):
    body = {"model": "default", "max_tokens": 40, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Name three rivers."}]}
    headers = {"x-api-key": KEYS[0], "anthropic-version": "2023-06-01"}
    _, direct_body = raw_request(server.url, "/v1/messages", body, headers)
    assert len(writes) >= 30 and {name for name, _ in writes} == {"cairn-engine"}
    _, loop_body = raw_request(loop_server.url, "/v1/messages", body, headers)

    def strip(evs):  # the message id and the prefix cache's share of the prompt differ between two requests
        return [(k, None if k == "message_start" else {x: y for x, y in e.items() if x != "usage"}) for k, e in evs]

    assert strip(events(direct_body)) == strip(events(loop_body))
    kinds = [k for k, _ in events(direct_body)]
    assert kinds[:3] == ["message_start", "content_block_start", "ping"] and kinds[-1] == "message_stop"


def test_a_client_that_does_not_read_gets_every_frame_in_order(engine, writes):
    """The socket fills while the client sleeps: the engine thread's write is cut short, the rest goes through the
    transport, the loop takes the stream back (and hands it over again once the socket drains)."""

    def small_send_buffer(app):
        async def wrapped(scope, receive, send):
            transport = (scope.get("extensions") or {}).get(direct.TRANSPORT)
            if transport is not None:
                transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            await app(scope, receive, send)

        return wrapped

    app = create_app(engine, api_keys=KEYS)
    with ServerThread(small_send_buffer(app)) as s:
        _, body = raw_request(s.url, "/v1/chat/completions", chat(300), AUTH, rcvbuf=4096, pause=2.0)
    assert any(rest for _, rest in writes), "the socket never filled: the test did not reach the fallback"
    evs = events(body)
    assert evs[-1] == (None, "[DONE]") and evs[-2][1]["usage"]["completion_tokens"] == 300
    with ServerThread(create_app(engine, api_keys=KEYS), http="h11") as s:
        _, reference = raw_request(s.url, "/v1/chat/completions", chat(300), AUTH)
    assert openai_text(evs) == openai_text(events(reference))


class StallingEngine:
    """The real engine, whose events stop for ``stall`` seconds after the ``after``-th token: the loop must take
    the stream back to send a ping (Anthropic), then hand it over again."""

    def __init__(self, real, after: int, stall: float):
        self.real, self.after, self.stall = real, after, stall

    def __getattr__(self, name):
        return getattr(self.real, name)

    def submit(self, request, sink):
        seen = [0]

        def stalling(ev):
            if not isinstance(ev, FinishEvent):
                seen[0] += 1
                if seen[0] == self.after + 1:
                    time.sleep(self.stall)
            sink(ev)

        return self.real.submit(request, stalling)


def test_a_ping_in_the_middle_of_a_direct_stream(engine, writes):
    body = {"model": "default", "max_tokens": 30, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Name three rivers."}]}
    headers = {"x-api-key": KEYS[0], "anthropic-version": "2023-06-01"}
    with ServerThread(create_app(StallingEngine(engine, 10, 0.5), api_keys=KEYS, ping_interval=0.1)) as s:
        _, stalled = raw_request(s.url, "/v1/messages", body, headers)
    with ServerThread(create_app(engine, api_keys=KEYS), http="h11") as s:
        _, reference = raw_request(s.url, "/v1/messages", body, headers)
    kinds = [k for k, _ in events(stalled)]
    first_delta = kinds.index("content_block_delta")
    assert "ping" in kinds[first_delta:], kinds  # a ping between two deltas
    assert kinds.count("content_block_delta") == 30 and kinds[-1] == "message_stop"
    assert {n for n, _ in writes} == {"cairn-engine"} and len(writes) >= 25  # direct before and after the ping

    def text(evs):
        return "".join(e["delta"]["text"] for k, e in evs if k == "content_block_delta")

    assert text(events(stalled)) == text(events(reference))


def test_a_client_that_leaves_mid_stream_cancels_its_request(engine, writes):
    """The client leaves while the engine thread writes its tokens: the disconnect still cancels the request and
    frees its KV, and the engine thread's duplicate of the socket is closed (no descriptor left behind)."""
    import os

    with ServerThread(create_app(engine, api_keys=KEYS)) as s:
        cancelled_before = s.state.metrics.finished.get("cancelled", 0)
        fds_before = len(os.listdir("/proc/self/fd"))
        host, port = s.url.rsplit("//", 1)[1].split(":")
        sock = socket.create_connection((host, int(port)))
        data = json.dumps(chat(2000)).encode()
        sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     f"authorization: Bearer {KEYS[0]}\r\ncontent-length: {len(data)}\r\n\r\n".encode() + data)
        got = b""
        while got.count(b"data: ") < 20:
            got += sock.recv(65536)
        sock.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = engine.stats()
            if stats.get("running", 0) == 0 and stats.get("queued", 0) == 0 and s.state.in_flight == 0 and \
                    len(os.listdir("/proc/self/fd")) <= fds_before:
                break
            time.sleep(0.05)
        assert stats.get("running", 0) == 0 and s.state.in_flight == 0, stats
        assert all(v == 0 for k, v in stats.items() if "block" in k and "used" in k), stats
        assert s.state.metrics.finished.get("cancelled", 0) == cancelled_before + 1
        assert len(os.listdir("/proc/self/fd")) <= fds_before
    assert 15 <= len(writes) < 2000 and {n for n, _ in writes} == {"cairn-engine"}


def test_a_frame_the_engine_thread_cannot_render_goes_to_the_loop(server, loop_server, monkeypatch, writes):
    """A failure while rendering on the engine thread never reaches the engine's step: the event goes to the loop,
    which renders it (here successfully), and the stream is whole."""
    from cairn.serve.runtime import FrameTemplate

    real = FrameTemplate.__call__
    failed = []

    def flaky(self, value):
        if threading.current_thread().name == "cairn-engine" and len(failed) < 3:
            failed.append(value)
            raise RuntimeError("injected")
        return real(self, value)

    monkeypatch.setattr(FrameTemplate, "__call__", flaky)
    _, body = raw_request(server.url, "/v1/chat/completions", chat(40), AUTH)
    monkeypatch.setattr(FrameTemplate, "__call__", real)
    _, reference = raw_request(loop_server.url, "/v1/chat/completions", chat(40), AUTH)
    assert len(failed) == 3 and len(writes) >= 30  # it failed three times, then the engine thread wrote again
    evs = events(body)
    assert openai_text(evs) == openai_text(events(reference)) and evs[-1] == (None, "[DONE]")
