"""The engine: requests in, token events out, in a background thread.

The CLI, the server and the evals all generate through ``Engine``. This version runs one request at a time
with a contiguous KV cache (prefill, then cached decode); the scheduler behind it can change without changing the
interface: ``submit``/``events`` (sync), ``stream`` (asyncio), ``cancel``, ``generate``, ``stats``.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch

from cairn.engine.sampling import make_generator, sample
from cairn.engine.stream import TextStream
from cairn.engine.types import Event, FinishEvent, Request, TokenEvent, Usage
from cairn.errors import CairnError
from cairn.model.cache import DenseKVCache


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish: FinishEvent


class _Job:
    def __init__(self, request: Request, sink):
        self.request = request
        self.sink = sink  # called with each Event, from the engine thread
        self.cancelled = threading.Event()


class Engine:
    def __init__(self, loaded, max_context: int | None = None):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.model_name = loaded.name
        self.max_context = min(max_context or self.config.max_seq_len, self.config.max_seq_len)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._jobs: dict[str, _Job] = {}
        self._lock = threading.Lock()
        self._counters = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "running": 0}
        self._thread = threading.Thread(target=self._loop, name="cairn-engine", daemon=True)
        self._thread.start()
        self._closed = False
        atexit.register(self.close)

    # ------------------------------------------------------------------ API
    def check(self, request: Request) -> None:
        n = len(request.prompt_ids)
        if n == 0:
            raise CairnError("the prompt is empty: give at least one token")
        if n >= self.max_context:
            raise CairnError(
                f"the prompt has {n} tokens but the model's context is {self.max_context} tokens: "
                "shorten the prompt"
            )
        bad = [t for t in request.prompt_ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise CairnError(f"token id(s) {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")

    def submit(self, request: Request, sink) -> None:
        """Queue ``request``; ``sink(event)`` is called from the engine thread for each event."""
        self.check(request)
        job = _Job(request, sink)
        with self._lock:
            if request.id in self._jobs:
                raise CairnError(f"a request with id {request.id!r} is already running")
            self._jobs[request.id] = job
        self._queue.put(job)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            job = self._jobs.get(request_id)
        if job is not None:
            job.cancelled.set()

    def events(self, request: Request) -> Iterator[Event]:
        q: queue.Queue[Event] = queue.Queue()
        self.submit(request, q.put)
        done = False
        try:
            while not done:
                ev = q.get()
                done = isinstance(ev, FinishEvent)
                yield ev
        finally:
            if not done:
                self.cancel(request.id)

    async def stream(self, request: Request) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[Event] = asyncio.Queue()
        self.submit(request, lambda ev: loop.call_soon_threadsafe(q.put_nowait, ev))
        done = False
        try:
            while not done:
                ev = await q.get()
                done = isinstance(ev, FinishEvent)
                yield ev
        finally:
            if not done:
                self.cancel(request.id)

    def generate(self, request: Request) -> Completion:
        text, ids, finish = [], [], None
        for ev in self.events(request):
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
                ids.extend(ev.token_ids)
            else:
                text.append(ev.text)
                finish = ev
        return Completion("".join(text), ids, finish)

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counters, queued=self._queue.qsize())

    def close(self) -> None:
        """Stop after the request in flight; queued requests are cancelled."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancelled.set()
        self._queue.put(None)
        self._thread.join(timeout=30)
        atexit.unregister(self.close)

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                job.sink(FinishEvent(job.request.id, "cancelled", Usage(len(job.request.prompt_ids))))
                with self._lock:
                    self._jobs.pop(job.request.id, None)
                continue
            with self._lock:
                self._counters["running"] = 1
            try:
                self._run(job)
            except Exception as e:  # never let one request kill the engine thread
                job.sink(FinishEvent(job.request.id, "cancelled", Usage(len(job.request.prompt_ids)), text=""))
                import logging

                logging.getLogger("cairn.engine").exception("request %s failed: %s", job.request.id, e)
            finally:
                with self._lock:
                    self._jobs.pop(job.request.id, None)
                    self._counters["running"] = 0

    def _run(self, job: _Job) -> None:
        req, p = job.request, job.request.params
        prompt = req.prompt_ids
        usage = Usage(prompt_tokens=len(prompt))
        capacity = min(self.max_context, len(prompt) + p.max_tokens)
        dtype = next(self.model.parameters()).dtype
        cache = DenseKVCache(self.config.n_layers, 1, self.config.n_kv_heads, self.config.head_dim, capacity, dtype)
        stream = TextStream(self.tokenizer.token_bytes, p.stop)
        gen = make_generator(p)
        eos = set() if p.ignore_eos else self.tokenizer.eos_ids
        logits = self.model(torch.tensor([prompt]), cache=cache, last_only=True)[:, -1]
        reason, stop_seq = "max_tokens", None
        while True:
            if job.cancelled.is_set():
                reason = "cancelled"
                break
            (tok, lp), = sample(logits, [p], [gen])
            if tok in eos:
                reason = "eos"
                break
            usage.completion_tokens += 1
            text, stop_seq = stream.push(tok)
            job.sink(TokenEvent(req.id, text, [tok], [lp] if p.logprobs else None))
            if stop_seq is not None:
                reason = "stop_sequence"
                break
            if usage.completion_tokens >= p.max_tokens:
                break
            if cache.length >= self.max_context:
                reason = "context_full"
                break
            logits = self.model(torch.tensor([[tok]]), cache=cache)[:, -1]
        tail = stream.finish() if reason != "stop_sequence" else ""
        with self._lock:
            self._counters["requests"] += 1
            self._counters["prompt_tokens"] += usage.prompt_tokens
            self._counters["completion_tokens"] += usage.completion_tokens
        job.sink(FinishEvent(req.id, reason, usage, stop_sequence=stop_seq, text=tail))
