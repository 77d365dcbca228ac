"""What both APIs share: admission (queue limit), engine requests as asyncio event queues, disconnect watching.

A ``Generation`` is one or more engine requests whose events arrive on one asyncio queue (from the engine's
thread). Closing it cancels whatever is still running, which is how a client that leaves frees its KV.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import threading
import time
from collections import deque
from contextlib import suppress
from dataclasses import dataclass, field

import anyio
from starlette.responses import StreamingResponse

from cairn.engine.types import Event, FinishEvent, Request, TokenEvent
from cairn.errors import CairnError
from cairn.serve.auth import KeyChecker, RateLimiter
from cairn.serve.direct import DirectWriter
from cairn.serve.errors import APIError
from cairn.serve.metrics import Metrics

log = logging.getLogger("cairn.serve")


def release_free_memory() -> None:
    """Return the heap's free pages to the system (glibc's ``malloc_trim``). Tokenising a 20 MiB body makes the
    tokenizer allocate ~2 GB that it frees afterwards, but glibc keeps freed memory in its per-thread arenas, so
    the server's resident size would stay there for good; elsewhere (no glibc) this does nothing."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class FrameTemplate:
    """An SSE frame whose only variable is one string, rendered once around a marker: each fill splices the string's
    JSON in the marker's place. The text is the same as rendering the whole frame again with that string (the JSON
    encoder writes a string the same way wherever it stands), for a fraction of the per-token cost: a streamed token
    costs one string encoding, not a dict and an encoder."""

    MARKER = "\x00cairn frame slot\x00"

    def __init__(self, render):
        """``render(value)``: the frame's text with ``value`` as the variable string (rendered here once)."""
        slot = json.encoder.encode_basestring(self.MARKER)
        head, sep, tail = render(self.MARKER).partition(slot)
        if not sep or slot in tail:
            raise ValueError("the frame must hold the marker string exactly once")
        self.head, self.tail = head, tail

    def __call__(self, value: str) -> str:
        return self.head + json.encoder.encode_basestring(value) + self.tail


@dataclass
class ServerState:
    engine: object
    model_name: str
    keys: KeyChecker
    limiter: RateLimiter
    metrics: Metrics
    max_queue: int = 256
    ping_interval: float = 10.0
    created: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    adapters: dict[str, object] = field(default_factory=dict)  # model name -> its engine (base + a LoRA adapter)
    self_critique: bool = False  # the server's default for chat requests (`cairn serve --self-critique`)
    memory: object = None  # memory.Settings: token memory on chat requests by default (`cairn serve --memory`)
    critique_settings: object = None  # self_critique.Settings: the constitution and how principles are picked
    allowed_hosts: frozenset[str] | None = None  # Host header names accepted without an API key (None: any)
    _cpu: object = None  # anyio.CapacityLimiter: threads for CPU work on request bodies (made on first use)

    async def off_loop(self, fn, *args, admit: bool = False):
        """``fn(*args)`` (tokenising a request, say) in a worker thread, at most two at a time, so a large body
        never stalls the event loop and the streams it serves; ``admit``: count it against the queue limit as a
        generation request would be (count_tokens has no generation of its own to be admitted with)."""
        if self._cpu is None:
            self._cpu = anyio.CapacityLimiter(2)
        if admit:
            self.admit(1)
        def run():
            start = time.monotonic()
            try:
                return fn(*args)
            finally:
                if time.monotonic() - start > 0.1:  # a large request: hand the memory it used back to the system
                    release_free_memory()

        try:
            return await anyio.to_thread.run_sync(run, limiter=self._cpu)
        finally:
            if admit:
                self.release(1)

    async def compile(self, spec) -> None:
        """Compile a request's constraint (``engine.constraint.ConstraintSpec``) off the event loop, so the engine's
        check finds it cached; a schema or grammar that cannot be enforced is a 400 naming what."""
        if spec is None:
            return
        from cairn.engine.constraint import compile_constraint

        try:
            await self.off_loop(compile_constraint, spec, self.tokenizer, self.engine.config.vocab_size)
        except CairnError as e:
            raise APIError(400, str(e)) from None

    def critique(self, option, *, chat: bool = True):
        """A request's self-critique ``Settings`` from its body's ``cairn`` field (None: off); 400 if malformed."""
        from cairn.serve import self_critique as sc

        if option is None and not (self.self_critique and chat):
            return None
        try:
            return sc.requested(self.self_critique, self.critique_settings, option, chat=chat)
        except CairnError as e:
            raise APIError(400, str(e), param="cairn") from None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_context(self) -> int:
        return int(getattr(self.engine, "max_context", 0) or self.engine.config.max_seq_len)

    def model_names(self) -> list[str]:
        """The models this server serves: the base first, then the adapted ones."""
        return [self.model_name, *self.adapters]

    def select(self, name: str | None) -> ServerState | ModelView:
        """The served model a request names: the base for None or one of its aliases, else an adapted model by
        its name (case-insensitive); any other name is a 404 in the API's error shape."""
        if name is None or name.lower() in self.model_aliases():
            return self
        for adapter, engine in self.adapters.items():
            if name.lower() == adapter.lower():
                return ModelView(self, adapter, engine)
        served = ", ".join(repr(n) for n in self.model_names())
        raise APIError(404, f"model {name!r} not found: this server serves {served}", param="model")

    def check_model(self, name: str | None) -> None:
        self.select(name)

    def model_aliases(self) -> set[str]:
        return {self.model_name.lower(), "default", "cairn"}

    # admission: at most max_queue generation requests in the server at once (running or waiting)
    def admit(self, n: int = 1) -> None:
        if n > self.max_queue:
            raise APIError(400, f"this request asks for {n} generations but the server holds at most "
                                f"{self.max_queue} at once: ask for fewer (prompts x n)")
        if self.in_flight + n > self.max_queue:
            self.metrics.reject("overloaded")
            raise APIError(529, f"the server is overloaded ({self.in_flight} requests in flight, the limit is "
                                f"{self.max_queue}); retry shortly", headers={"retry-after": "1"})
        self.in_flight += n
        self.metrics.in_flight = self.in_flight

    def release(self, n: int = 1) -> None:
        self.in_flight = max(0, self.in_flight - n)
        self.metrics.in_flight = self.in_flight

    def generation(self, requests: list[Request], admitted: int | None = None) -> Generation:
        """Admit and submit ``requests``; raises APIError (529, 400) before anything is sent to the client.

        ``admitted``: the caller has already admitted that many (self-critique admits a reply's whole chain of
        generations once) and the Generation takes over releasing them; None: admit one per request now."""
        for r in requests:
            try:
                self.engine.check(r)
            except CairnError as e:
                raise APIError(400, str(e)) from None
        if admitted is None:
            self.admit(len(requests))
        return Generation(self, requests, admitted)  # releases its admission itself if submitting fails


class ModelView:
    """An adapted model of the server: its own name and engine; admission, keys, limits and metrics are the
    server's (``ServerState``'s), shared by every model it serves."""

    def __init__(self, state: ServerState, name: str, engine):
        self._state, self.model_name, self.engine = state, name, engine

    def __getattr__(self, attr: str):  # everything but the model's own: the server's
        return getattr(self._state, attr)

    tokenizer = ServerState.tokenizer
    max_context = ServerState.max_context
    generation = ServerState.generation
    compile = ServerState.compile
    critique = ServerState.critique


class Generation:
    """Engine requests whose events reach the event loop in order: ``next()`` returns them one by one.

    A streamed response may hand its token frames to the engine thread (``stream_directly``, see ``direct.py``):
    while it holds them, a token event is rendered and written to the client there and never queued."""

    def __init__(self, state: ServerState, requests: list[Request], admitted: int | None = None):
        self.state = state
        self.requests = requests
        self.holds = len(requests) if admitted is None else admitted  # admissions released when it is done
        self.index = {r.id: i for i, r in enumerate(requests)}
        self.loop = asyncio.get_running_loop()
        self._lock = threading.Lock()  # the engine thread's _put against the loop's hand-over and close
        self._pending: deque = deque()  # (index, event), or (-1, bytes the socket did not take) — for the loop
        self._waiter: asyncio.Future | None = None
        self._transport = None  # set by stream_directly: the client's connection
        self._render = None  # (index, TokenEvent) -> the frame to send, or None
        self._writer: DirectWriter | None = None
        self._direct = False  # the engine thread writes token frames itself
        self.open = set(self.index)
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self.closed = False
        self.aborted = False  # closed while requests were still running: their 'cancelled' is ours
        self.released = False
        try:
            for r in requests:
                i = self.index[r.id]
                state.engine.submit(r, lambda ev, i=i: self._put(i, ev))
        except CairnError as e:
            self.close()
            raise APIError(400, str(e)) from None
        except BaseException:
            self.close()
            raise

    def stream_directly(self, transport, render) -> None:
        """Let the engine thread write token frames ``render(index, event)`` (a str, or None: nothing to send) to
        ``transport``'s socket whenever the loop has nothing of this stream to write (``next`` hands them over and
        takes them back). ``transport`` None (the server does not offer it): the loop writes everything."""
        if transport is not None:
            self._transport, self._render = transport, render

    def _put(self, i: int, ev: Event) -> None:  # engine thread
        if isinstance(ev, FinishEvent):
            # counted here, not where the event is read: a generation whose client left is never read to its end,
            # and its tokens (and its 'cancelled') must still be in the metrics, as they are in the engine's
            u = ev.usage
            self.state.metrics.generation_done(ev.reason, u.prompt_tokens, u.cached_prompt_tokens,
                                               u.completion_tokens)
        with self._lock:
            if self._direct:
                if isinstance(ev, TokenEvent) and self._write(i, ev):
                    return
                self._direct = False  # the loop writes from here on (finish, or the write went wrong)
            self._pending.append((i, ev))
        with suppress(RuntimeError):  # the loop is gone (server shut down): nobody is listening
            self.loop.call_soon_threadsafe(self._wake)

    def _write(self, i: int, ev: TokenEvent) -> bool:  # engine thread, under the lock, in direct mode
        """Render and send a token's frame; False: the event goes to the loop instead."""
        try:
            frame = self._render(i, ev)
            data = None if frame is None else frame.encode()
        except Exception:  # (never into the engine's step) the loop renders it again and reports what fails
            log.exception("rendering a streamed token failed; the event loop takes the stream back")
            return False
        if self.first_token_at is None:
            self._first_token()
        if data is None:
            return True
        rest = self._writer.write(data)
        if rest:  # the socket is full (or broken): the rest goes first, through the transport; the loop takes over
            self._direct = False
            self._pending.append((-1, rest))
            with suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._wake)
        return True

    def _wake(self) -> None:  # loop thread
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _first_token(self) -> None:
        self.first_token_at = time.monotonic()
        self.state.metrics.first_token(self.first_token_at - self.start)

    def _hand_over(self) -> None:  # loop thread: nothing queued, nothing unsent: token frames go to the engine
        t = self._transport
        if t is None or self.closed or t.is_closing() or t.get_write_buffer_size():
            return
        with self._lock:
            if self._pending:
                return
            if self._writer is None:
                try:
                    self._writer = DirectWriter(t)
                except OSError:  # no descriptor to spare: the loop keeps writing
                    self._transport = None
                    return
            self._direct = True

    def _take_back(self) -> None:
        with self._lock:
            self._direct = False

    async def next(self, timeout: float | None = None) -> tuple[int, Event] | None:
        """The next event (index of its request, event), or None after ``timeout`` seconds without one (token events
        the engine thread wrote itself are not returned)."""
        while True:
            with self._lock:
                item = self._pending.popleft() if self._pending else None
            if item is not None and item[0] < 0:  # what the socket did not take of a direct write: send it first
                self._transport.write(item[1])
                continue
            if item is not None:
                break
            self._hand_over()
            self._waiter = self.loop.create_future()
            try:
                if not timeout:
                    await self._waiter
                else:
                    try:  # (asyncio.timeout: no task per event, as wait_for makes; the engine's put wakes this)
                        async with asyncio.timeout(timeout):
                            await self._waiter
                    except TimeoutError:
                        self._take_back()  # the caller writes something (a ping): the loop must own the socket
                        with self._lock:
                            if not self._pending:
                                return None
            finally:
                self._waiter = None
        i, ev = item
        if isinstance(ev, TokenEvent) and self.first_token_at is None:
            self._first_token()
        if isinstance(ev, FinishEvent):
            self.open.discard(self.requests[i].id)
            if not self.open:
                self._release()
        return i, ev

    @property
    def done(self) -> bool:
        return not self.open

    def _release(self) -> None:
        if not self.released:
            self.released = True
            if self.holds:
                self.state.release(self.holds)

    def close(self) -> None:
        """Cancel what is still running (a client left, or an error); idempotent."""
        if self.closed:
            return
        self.closed = True
        with self._lock:  # the engine thread writes no more: its duplicate of the socket is closed now
            self._direct = False
            if self._writer is not None:
                self._writer.close()
        self.aborted = bool(self.open)
        for rid in list(self.open):
            with suppress(Exception):
                self.state.engine.cancel(rid)  # its FinishEvent ('cancelled') still reaches the metrics
        self._release()

    async def collect(self, http_request=None) -> list[tuple[str, list[int], list[float], FinishEvent]]:
        """Run every request to the end: per request (text, token ids, logprobs, finish event).

        With ``http_request``, a client disconnect cancels the generation (raises ``ClientGone``).
        """
        out = [["", [], [], None] for _ in self.requests]
        watcher = asyncio.ensure_future(wait_disconnect(http_request)) if http_request is not None else None
        try:
            while not self.done:
                getter = asyncio.ensure_future(self.next())
                waits = {getter} | ({watcher} if watcher else set())
                finished, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if getter not in finished:
                    getter.cancel()
                    raise ClientGone()
                i, ev = getter.result()
                slot = out[i]
                if isinstance(ev, TokenEvent):
                    slot[0] += ev.text
                    slot[1].extend(ev.token_ids)
                    if ev.logprobs:
                        slot[2].extend(ev.logprobs)
                else:
                    slot[0] += ev.text
                    slot[3] = ev
        finally:
            if watcher is not None:
                watcher.cancel()
            self.close()
        return [tuple(s) for s in out]


async def self_critique(state: ServerState, chain, http_request, request_id: str) -> Generation:
    """Run a self-critique ``chain``'s draft, critiques and revisions up to its last revision (each watched for a
    disconnect), then submit that revision as ``request_id`` and return its Generation, for the caller to stream or
    collect like any other. The chain holds one admission throughout; the returned Generation releases it."""
    from cairn.serve.self_critique import arun

    def check(request: Request) -> None:
        try:
            state.engine.check(request)
        except CairnError as e:
            raise APIError(400, f"self-critique's {chain.step.kind} prompt: {e} (self-critique sends the draft and "
                                'its critique back to the model: lower max_tokens, or send "cairn": '
                                '{"self_critique": false})') from None

    async def generate(request: Request):
        check(request)
        gen = Generation(state, [request], admitted=0)
        [(text, _, _, finish)] = await gen.collect(http_request)
        if failed(finish, gen):
            raise APIError(500, "generation failed inside the engine; see the server log")
        return text, finish

    state.admit(1)
    try:
        await arun(chain, generate, until_final=True)
        final = chain.next_request(id=request_id)
        check(final)
    except BaseException:
        state.release(1)
        raise
    return Generation(state, [final], admitted=1)


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def wait_disconnect(http_request) -> None:
    while True:
        message = await http_request.receive()
        if message["type"] == "http.disconnect":
            return


def failed(ev: FinishEvent, gen: Generation) -> bool:
    """A request the engine ended as 'cancelled' although nobody cancelled it: the engine failed."""
    return ev.reason == "cancelled" and not gen.aborted


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is always closed, even when the client left mid-stream.

    Closing the generator runs its ``finally``, which cancels the engine requests (frees their KV).
    """

    def __init__(self, content, on_close=None, headers: dict[str, str] | None = None):
        self.on_close = on_close
        super().__init__(content, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no", **(headers or {})})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            if self.on_close is not None:
                self.on_close()
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True), suppress(Exception):
                    await aclose()
