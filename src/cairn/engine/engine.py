"""The engine: requests in, token events out, continuously batched in a background thread.

The CLI, the server and the evals all generate through ``Engine``: ``submit``/``events`` (sync), ``stream``
(asyncio), ``cancel``, ``generate``, ``stats``. Behind them:

- ``kv.KVPool`` — the paged KV cache (blocks, ref counts, prefix cache, offload tier);
- ``scheduler.Scheduler`` — continuous batching with chunked prefill under a token budget;
- ``runner.Runner`` — one packed forward pass per step (fused, optionally int8/int4 weights);
- ``sampling`` / ``stream`` — token choice, UTF-8-safe detokenization and stop strings.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch

from cairn.engine.constraint import MaskWorker, compile_constraint
from cairn.engine.kv import KVPool, SequenceKV
from cairn.engine.runner import InferenceWeights, Runner
from cairn.engine.sampling import make_generator, sample, takes_argmax
from cairn.engine.scheduler import Scheduler, Sequence
from cairn.engine.stream import TextStream
from cairn.engine.types import Event, FinishEvent, Request, TokenEvent, Usage
from cairn.errors import CairnError

log = logging.getLogger("cairn.engine")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish: FinishEvent


@dataclass
class EngineOptions:
    """How the engine serves. Memory: ``kv_blocks`` blocks of ``block_size`` tokens (default: ``kv_memory_mb``)."""

    max_context: int | None = None  # default: the model's max_seq_len
    block_size: int = 16
    kv_blocks: int | None = None
    kv_memory_mb: int = 1024
    chunk_size: int = 2048  # prefill chunk (tokens)
    max_batch_tokens: int | None = None  # token budget per step (default chunk_size + max_running)
    max_running: int = 64  # sequences decoding together
    prefix_caching: bool = True
    window: int | None = None  # attend to the last `window` tokens (+ `sinks` first ones) in every layer
    sinks: int = 0
    offload_blocks: int = 0  # blocks in the memory-mapped offload tier (0: no tier)
    offload_dir: str | None = None
    hot_tokens: int | None = None  # tier boundary: keep only the last N tokens' blocks in the pool
    quantize: str | None = "auto"  # "auto" (the file's own precision class), None/"none", "int8", "int4"
    kv_dtype: str = "auto"  # "auto" (fp16 with int8/int4 weights, else the model's), "float32", "float16", "bfloat16"
    group_size: int = 32  # int4 group size
    kernel: str = "auto"  # "auto", "native", "fbgemm"; int8 also "weight_only", int4 also "int4pack"
    outliers: int | None = None  # FBGEMM int8: input channels per matrix kept in fp32 (default 32)
    threads: int | None = None  # torch intra-op threads (default: leave as is)
    eager_kernels: bool = False  # build batched-decode kernels at start (default: at the first batched step)


def resolve_quantize(mode: str | None, cfg) -> str:
    """``"auto"``: run a quantized file in its own precision class: int4 kernels for a 4-bit GGUF (for Q4_1, cairn's
    kernel reads the file's own codes), int8 for 5- to 8-bit ones, fp32 for float files, HF directories and
    checkpoints. Any other value is taken as it is."""
    if mode != "auto":
        return mode or "none"
    bits = cfg.weight_bits
    if bits is None or bits > 8:
        return "none"
    return "int4" if bits <= 4 else "int8"


KV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_kv_dtype(kv_dtype: str, quantize: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's element type. ``"auto"``: fp16 when an fp32 model runs int8/int4 weights (half the KV memory
    and half the bytes every decode step reads, as llama.cpp's default KV cache; its rounding, ~5e-4 relative, is
    far below the weights'), otherwise the model's own dtype, so an unquantized engine stays exact."""
    if kv_dtype == "auto":
        return torch.float16 if quantize in ("int8", "int4") and model_dtype == torch.float32 else model_dtype
    if kv_dtype not in KV_DTYPES:
        raise CairnError(f"unknown kv_dtype {kv_dtype!r}: use auto, {', '.join(KV_DTYPES)}")
    return KV_DTYPES[kv_dtype]


class Engine:
    def __init__(self, loaded, **options):
        unknown = set(options) - set(EngineOptions.__dataclass_fields__)
        if unknown:
            raise CairnError(f"unknown engine option(s) {sorted(unknown)}; known: "
                             f"{', '.join(EngineOptions.__dataclass_fields__)}")
        self.options = o = EngineOptions(**options)
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = cfg = loaded.config
        self.model_name = loaded.name
        # with a window the KV stays bounded, so a longer stream than the model's trained length may be asked for
        limit = cfg.max_seq_len if o.window is None else max(cfg.max_seq_len, o.max_context or 0)
        self.max_context = min(o.max_context or cfg.max_seq_len, limit)
        if o.threads:
            torch.set_num_threads(o.threads)
        if o.window is not None and o.window < 1:
            raise CairnError(f"window must be a positive number of tokens, got {o.window}")
        if o.sinks < 0:
            raise CairnError(f"sinks must be >= 0, got {o.sinks}")
        # the window that bounds KV memory: the engine's, or the model's when every layer is windowed
        model_windows = {cfg.window(i) for i in range(cfg.n_layers)}
        self.kv_window = o.window if o.window is not None else (
            model_windows.pop() if len(model_windows) == 1 else None)
        self.quantize = resolve_quantize(o.quantize, cfg)
        dtype = resolve_kv_dtype(o.kv_dtype, self.quantize, next(self.model.parameters()).dtype)
        per_block = 2 * cfg.n_layers * o.block_size * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize
        n_blocks = o.kv_blocks or max(16, o.kv_memory_mb * 2**20 // per_block)
        self.pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, n_blocks, o.block_size, dtype,
                           o.offload_blocks, o.offload_dir, o.prefix_caching)
        self.weights = InferenceWeights(self.model, self.quantize, o.group_size, o.kernel, self.tokenizer, o.outliers,
                                        getattr(loaded, "quantized", None))
        if o.eager_kernels:
            self.weights.build_batch_kernels()
        self.runner = Runner(self.weights, self.pool, o.window, o.sinks)
        self.scheduler = Scheduler(self.pool, o.chunk_size, o.max_batch_tokens, o.max_running)
        self._inbox: queue.Queue = queue.Queue()
        self._seqs: dict[str, Sequence] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._counters = {"requests": 0, "finished": 0, "cancelled": 0, "prompt_tokens": 0,
                          "cached_prompt_tokens": 0, "completion_tokens": 0, "steps": 0, "step_tokens": 0,
                          "busy_s": 0.0}
        self._closed = False
        self._masks = MaskWorker()  # constrained requests' token masks, computed beside the forward pass
        self._thread = threading.Thread(target=self._loop, name="cairn-engine", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    # ------------------------------------------------------------------ API
    def check(self, request: Request) -> None:
        if not request.prompt_ids and request.messages:
            if self.tokenizer is None:
                raise CairnError("this model has no tokenizer: send prompt token ids instead of messages")
            request.prompt_ids = self.tokenizer.encode_chat(request.messages)
        n = len(request.prompt_ids)
        if n == 0:
            raise CairnError("the prompt is empty: give at least one token")
        if n >= self.max_context:
            raise CairnError(
                f"the prompt has {n} tokens but the model's context is {self.max_context} tokens: "
                f"shorten the prompt by at least {n - self.max_context + 1} tokens"
            )
        bad = [t for t in request.prompt_ids if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise CairnError(f"token id(s) {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")
        if self.kv_window is None:
            need = -(-n // self.pool.block_size) + 1
            if need > self.pool.n_blocks:
                raise CairnError(f"the prompt needs {need} KV blocks but the pool has {self.pool.n_blocks}: "
                                 "raise kv_blocks / kv_memory_mb")
        if request.params.constraint is not None:  # compiled once per spec (cached): a bad schema fails here
            compile_constraint(request.params.constraint, self.tokenizer, self.config.vocab_size)

    def submit(self, request: Request, sink=None) -> None:
        """Queue ``request``; ``sink(event)`` is called from the engine thread for each event."""
        if self._closed:
            raise CairnError("the engine is closed")
        self.check(request)
        with self._lock:
            if request.id in self._seqs:
                raise CairnError(f"a request with id {request.id!r} is already running")
            p = request.params
            token_bytes = self.tokenizer.token_bytes if self.tokenizer is not None else []
            seq = Sequence(
                request=request,
                kv=SequenceKV(self.pool, self.kv_window, self.options.sinks, self.options.hot_tokens),
                tokens=list(request.prompt_ids),
                sink=sink or (lambda ev: None),
                stream=TextStream(token_bytes, p.stop),
                generator=make_generator(p),
                usage=Usage(prompt_tokens=len(request.prompt_ids)),
                order=next(self._order),
            )
            if p.constraint is not None:
                seq.matcher = compile_constraint(p.constraint, self.tokenizer, self.config.vocab_size).matcher()
            self._seqs[request.id] = seq
        self._inbox.put(("add", seq))

    def cancel(self, request_id: str) -> None:
        """Stop a request; its KV blocks go back to the pool at the engine's next step (milliseconds)."""
        self._inbox.put(("cancel", request_id))

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

    def generate_many(self, requests: list[Request]) -> list[Completion]:
        """All ``requests`` at once, batched by the scheduler (continuous batching), their completions in order.
        For offline work over many prompts (data generation, RL rollouts, evals); ``generate`` runs one."""
        done = threading.Semaphore(0)
        parts: list[tuple[list[str], list[int], list[FinishEvent]]] = [([], [], []) for _ in requests]

        def sink_for(i: int):
            text, ids, fin = parts[i]

            def sink(ev: Event) -> None:
                text.append(ev.text)
                if isinstance(ev, TokenEvent):
                    ids.extend(ev.token_ids)
                else:
                    fin.append(ev)
                    done.release()

            return sink

        submitted = 0
        try:
            for i, r in enumerate(requests):
                self.submit(r, sink_for(i))
                submitted += 1
            for _ in requests:
                done.acquire()
        except BaseException:
            for r in requests[:submitted]:
                self.cancel(r.id)
            raise
        return [Completion("".join(t), ids, fin[0]) for t, ids, fin in parts]

    def score(self, tokens: list[int], decode_from: int | None = None) -> list[float]:
        """Log-probability of each token after the first given the ones before it (``len(tokens) - 1`` values, in
        nats): one teacher-forced prefill through this engine's weights (quantized as it runs them), window and
        sinks, on a scratch KV that is freed at once. With ``decode_from=p`` the first ``p`` tokens are a prompt and
        each later one a one-token decode step, so those logits come from the kernels generation uses. It runs on the
        engine thread between steps, so it may be called while requests run. For perplexity and log-likelihood
        evals."""
        if self._closed:
            raise CairnError("the engine is closed")
        n = len(tokens)
        if n < 2:
            raise CairnError("scoring needs at least two tokens (the first is only context)")
        if n > self.max_context:
            raise CairnError(f"{n} tokens to score but the model's context is {self.max_context}: score a window "
                             "of the text at a time (e.g. `cairn eval ppl --context`)")
        bad = [t for t in tokens if not isinstance(t, int) or not 0 <= t < self.config.vocab_size]
        if bad:
            raise CairnError(f"token id(s) {bad[:5]} are outside the vocabulary (size {self.config.vocab_size})")
        need = -(-n // self.pool.block_size)
        if need > self.pool.n_blocks:
            raise CairnError(f"scoring {n} tokens needs {need} KV blocks but the pool has {self.pool.n_blocks}: "
                             "raise kv_blocks / kv_memory_mb")
        if decode_from is not None and not 1 <= decode_from <= n:
            raise CairnError(f"decode_from must be in 1..{n}, got {decode_from}")
        done: queue.Queue = queue.Queue(maxsize=1)
        self._inbox.put(("call", (lambda: self._score(tokens, decode_from), done)))
        ok, value = done.get()
        if not ok:
            raise value
        return value

    def _score(self, tokens: list[int], decode_from: int | None) -> list[float]:
        logits = self.runner.score(tokens, decode_from)[:-1]  # row i predicts token i + 1
        targets = torch.tensor(tokens[1:])
        out: list[float] = []
        for s in range(0, len(targets), 1024):  # log-softmax a slice at a time: [T, V] floats once, not thrice
            lp = torch.log_softmax(logits[s:s + 1024].float(), dim=-1)
            out += lp.gather(1, targets[s:s + 1024, None])[:, 0].tolist()
        return out

    def stats(self) -> dict:
        with self._lock:
            s = self.scheduler
            out = dict(self._counters, queued=len(s.waiting), running=len(s.running), swapped=len(s.swapped),
                       preemptions=s.preemptions, weights=self.weights.quantize,
                       kv_dtype=str(self.pool.dtype).removeprefix("torch."),
                       weight_bytes=self.weights.weight_bytes(),
                       decode_weight_bytes=self.weights.decode_weight_bytes())
            out.update(self.pool.stats())
        return out

    def wait_idle(self, timeout: float = 60.0) -> None:
        """Block until every submitted request has finished (tests, benchmarks)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._seqs and self._inbox.empty():
                    return
            time.sleep(0.002)
        raise TimeoutError("engine still busy")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._inbox.put(("close", None))
        self._thread.join(timeout=30)
        self._masks.close()
        self.pool.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- the loop
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            block = not self.scheduler.has_work()
            try:
                while True:
                    kind, arg = self._inbox.get(block=block)
                    block = False
                    if kind == "close":
                        self._shutdown()
                        return
                    if kind == "call":  # work that needs the pool to itself (score): run it between steps
                        fn, done = arg
                        try:
                            done.put((True, fn()))
                        except Exception as e:
                            done.put((False, e))
                        continue
                    with self._lock:
                        if kind == "add" and self._seqs.get(arg.request.id) is arg:  # (not cancelled already)
                            self.scheduler.add(arg)
                            self._counters["requests"] += 1
                        elif kind == "cancel":
                            seq = self._seqs.get(arg)
                            if seq is not None:
                                self._finish(seq, "cancelled")
            except queue.Empty:
                pass
            if not self.scheduler.has_work():
                continue
            try:
                self._step()
            except Exception as e:  # never let one bad step kill the engine thread: fail what was running
                log.exception("engine step failed: %s", e)
                with self._lock:
                    for seq in list(self._seqs.values()):
                        self._finish(seq, "cancelled")

    def _shutdown(self) -> None:
        with self._lock:
            for seq in list(self._seqs.values()):
                self._finish(seq, "cancelled")

    def _step(self) -> None:
        t0 = time.perf_counter()
        with self._lock:
            segments = self.scheduler.schedule()
            if not segments and self.scheduler.running:
                # nothing can run: running sequences hold the whole pool and each needs more. Preempt the newest
                # (it resumes when there is room); a sequence alone that still cannot grow is out of KV memory.
                seq = max(self.scheduler.running, key=lambda q: q.order)
                if len(self.scheduler.running) > 1:
                    self.scheduler.preempt(seq)
                else:
                    log.warning("request %s: out of KV blocks (%d in the pool); raise kv_memory_mb",
                                seq.request.id, self.pool.n_blocks)
                    self._finish(seq, "context_full")
                return
        if not segments:
            time.sleep(0.001)
            return
        by_kv = {id(seq.kv): seq for seq in self.scheduler.running}
        sampled = [by_kv[id(s.kv)] for s in segments if s.sample]
        # constrained rows: their grammars' masks are computed while the forward pass runs
        masked = [i for i, q in enumerate(sampled) if q.matcher is not None and q.matcher.active]
        masks = self._masks.start([sampled[i].matcher for i in masked], self.config.vocab_size) if masked else None
        params = [q.request.params for q in sampled]
        # all rows greedy (a batch-1 chat at temperature 0): the step finds the tokens beside its head
        logits = self.runner.forward(segments, greedy=bool(sampled) and not masked and all(map(takes_argmax, params)))
        allowed, dead = self._allowed(masked, masks, logits.shape[-1]) if masked else (None, set())
        picks = sample(logits, params, [q.generator for q in sampled], allowed, self.runner.argmax) if sampled else []
        with self._lock:
            for s in segments:
                seq = by_kv[id(s.kv)]
                seq.kv.commit(seq.tokens, len(s.tokens))
            for i, (seq, (tok, lp)) in enumerate(zip(sampled, picks, strict=True)):
                if i in dead:  # the grammar allows nothing (llguidance hit a limit): the request cannot go on
                    log.warning("request %s: its constraint failed: %s", seq.request.id, seq.matcher.error)
                    self._finish(seq, "cancelled")
                else:
                    self._emit(seq, tok, lp)
            self._counters["steps"] += 1
            self._counters["step_tokens"] += sum(len(s.tokens) for s in segments)
            self._counters["busy_s"] += time.perf_counter() - t0

    def _emit(self, seq: Sequence, tok: int, logprob: float) -> None:
        p = seq.request.params
        eos = () if p.ignore_eos else (self.tokenizer.eos_ids if self.tokenizer is not None else ())
        if tok in eos:
            self._finish(seq, "eos")
            return
        toks = [tok]
        if seq.matcher is not None:  # advance the grammar (a lazy one may replace the token: see constraint.py)
            try:
                toks = seq.matcher.advance(tok)
            except CairnError as e:
                log.warning("request %s: %s", seq.request.id, e)
                self._finish(seq, "cancelled")
                return
        seq.tokens.extend(toks)
        seq.usage.completion_tokens += len(toks)
        text, stop = seq.stream.push(toks[0]) if len(toks) == 1 else self._push_all(seq, toks)
        first = seq.usage.completion_tokens == len(toks)  # the prefix cache's share of the prompt is known from here
        ev = TokenEvent(seq.request.id, text, toks, [logprob] + [0.0] * (len(toks) - 1) if p.logprobs else None,
                        usage=Usage(seq.usage.prompt_tokens, seq.usage.cached_prompt_tokens, 1) if first else None)
        if not self._send(seq, ev):
            self._finish(seq, "cancelled")
        elif stop is not None:
            self._finish(seq, "stop_sequence", stop)
        elif seq.matcher is not None and seq.matcher.done:  # the grammar is complete: so is the output
            if seq.matcher.error:
                log.warning("request %s: its constraint failed: %s", seq.request.id, seq.matcher.error)
            self._finish(seq, "cancelled" if seq.matcher.error else "eos")
        elif seq.usage.completion_tokens >= p.max_tokens:
            self._finish(seq, "max_tokens")
        elif len(seq.tokens) >= self.max_context:
            self._finish(seq, "context_full")

    @staticmethod
    def _push_all(seq: Sequence, toks: list[int]) -> tuple[str, str | None]:
        text = ""
        for t in toks:
            piece, stop = seq.stream.push(t)
            text += piece
            if stop is not None:
                return text, stop
        return text, None

    def _allowed(self, masked: list[int], masks, vocab: int) -> tuple[dict[int, torch.Tensor], set[int]]:
        """The constrained rows' masks ({row: bool [vocab]}) and the rows whose grammar allows no token at all."""
        ok = masks.result()[:, :vocab]
        if ok.shape[1] < vocab:  # logits wider than the tokenizer's vocabulary: those ids are never allowed
            ok = torch.nn.functional.pad(ok, (0, vocab - ok.shape[1]))
        any_ok = ok.any(dim=1).tolist()
        allowed = {i: ok[k] if any_ok[k] else torch.ones(vocab, dtype=torch.bool) for k, i in enumerate(masked)}
        return allowed, {i for k, i in enumerate(masked) if not any_ok[k]}

    def _finish(self, seq: Sequence, reason: str, stop: str | None = None) -> None:
        """Release the sequence's KV and send its FinishEvent (call with the lock held)."""
        self.scheduler.remove(seq)
        self._seqs.pop(seq.request.id, None)
        tail = seq.stream.finish() if reason not in ("stop_sequence", "cancelled") else ""
        c = self._counters
        c["finished"] += 1
        c["cancelled"] += reason == "cancelled"
        c["prompt_tokens"] += seq.usage.prompt_tokens
        c["cached_prompt_tokens"] += seq.usage.cached_prompt_tokens
        c["completion_tokens"] += seq.usage.completion_tokens
        self._send(seq, FinishEvent(seq.request.id, reason, seq.usage, stop_sequence=stop, text=tail))

    @staticmethod
    def _send(seq: Sequence, ev: Event) -> bool:
        """Hand ``ev`` to the request's consumer; False when the consumer is gone (e.g. its event loop closed)."""
        try:
            seq.sink(ev)
            return True
        except Exception as e:
            log.warning("request %s: dropping its events (%s)", seq.request.id, e)
            return False
