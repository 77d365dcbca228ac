"""Real servers on 127.0.0.1 (uvicorn in threads) over one engine with the default model, loaded once.

The fixtures live for the tests/serve package (torn down after its last test).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
import uvicorn

from cairn.engine import Engine
from cairn.engine.types import FinishEvent, Usage
from cairn.serve.app import create_app
from cairn.serve.timeouts import header_guard
from cairn.weights import load_model

KEYS = ["sk-cairn-test-1", "sk-cairn-test-2"]


class ServerThread:
    """uvicorn in a thread with cairn serve's HTTP protocol (``header_guard``, which lets streamed token frames be
    written by the engine thread: ``cairn.serve.direct``) unless ``http=`` names another."""

    def __init__(self, app, **config):
        self.app = app
        config.setdefault("http", header_guard())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.sock = sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10, **config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    @property
    def state(self):
        return self.app.state.cairn


@pytest.fixture(scope="package")
def engine():
    # One intra-op thread: the test machine's 2 cores are shared, and oversubscribed torch threads are ~8x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = Engine(load_model(None, quantized=True))  # as `cairn serve` loads it: the GGUF blocks run as they are
    yield eng
    eng.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def server(engine):
    """The main server: API keys required, default limits."""
    with ServerThread(create_app(engine, api_keys=KEYS)) as s:
        yield s


@pytest.fixture(scope="package")
def strict_server(engine):
    """A server with a small body limit and a rate limit of 3 requests per minute per key.

    Tests share its buckets: KEYS[0] is for the rate-limit test, KEYS[1] (3 requests at most) for the body limit.
    """
    with ServerThread(create_app(engine, api_keys=KEYS, rate_limit=3, max_body_bytes=4096)) as s:
        yield s


class HarnessEngine:
    """The real engine behind a gate (requests wait until it opens) and with injectable failures."""

    def __init__(self, real: Engine):
        self.real = real
        self.gate = threading.Event()
        self.gate.set()
        self.fail: str | None = None  # "submit": submit raises; "midway": the engine fails after some tokens
        self.cancelled: set[str] = set()  # cancelled while held at the gate

    def __getattr__(self, name):
        return getattr(self.real, name)

    def cancel(self, request_id):
        self.cancelled.add(request_id)
        self.real.cancel(request_id)

    def submit(self, request, sink):
        if self.fail == "submit":
            raise RuntimeError("injected failure")
        self.real.check(request)
        if self.fail == "midway":
            seen = [0]

            def failing_sink(ev):
                if seen[0] < 0:
                    return
                seen[0] += 1
                if seen[0] > 2 and not isinstance(ev, FinishEvent):  # what the engine sends when a request crashes
                    sink(FinishEvent(request.id, "cancelled", Usage(len(request.prompt_ids))))
                    seen[0] = -1
                    self.real.cancel(request.id)
                    return
                sink(ev)

            return self.real.submit(request, failing_sink)
        if self.gate.is_set():
            return self.real.submit(request, sink)

        def later():
            self.gate.wait()
            if request.id in self.cancelled:
                sink(FinishEvent(request.id, "cancelled", Usage(len(request.prompt_ids))))
            else:
                self.real.submit(request, sink)

        threading.Thread(target=later, daemon=True).start()


class PacedEngine:
    """The real engine, with each token event held back ``delay`` seconds: a model as slow as a big one on a CPU,
    for tests that must act while a reply is still streaming, however fast the real engine is."""

    def __init__(self, real: Engine, delay: float):
        self.real, self.delay = real, delay

    def __getattr__(self, name):
        return getattr(self.real, name)

    def submit(self, request, sink):
        def paced(ev):
            if not isinstance(ev, FinishEvent):
                time.sleep(self.delay)
            sink(ev)

        return self.real.submit(request, paced)


@pytest.fixture(scope="package")
def paced_server(engine):
    """The main server's setup over an engine that streams at most ~20 tokens a second."""
    with ServerThread(create_app(PacedEngine(engine, 0.05), api_keys=KEYS)) as s:
        yield s


@pytest.fixture(scope="package")
def test_engine(engine):
    return HarnessEngine(engine)


@pytest.fixture(scope="package")
def gated_server(test_engine):
    """max_queue=1 over the gated/faulty engine: for 529 and 500."""
    with ServerThread(create_app(test_engine, api_keys=KEYS, max_queue=1, ping_interval=0.2)) as s:
        yield s
