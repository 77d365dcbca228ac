"""Continuous batching: which tokens of which sequences go into the next step.

Every step fills a token budget: first one decode token for each running sequence (decodes first, so streaming
never stalls behind a long prompt), then prefill chunks (at most ``chunk_size`` tokens each) of sequences still
reading their prompt, then new requests, which join at the next step with their cached prefix already attached.
When the pool runs out of blocks, the most recently admitted sequence is preempted: its blocks go to the offload
tier (and come back when there is room) or, without a tier, are dropped and recomputed later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from cairn.engine.kv import KVPool, OutOfBlocks, SequenceKV
from cairn.engine.runner import Segment
from cairn.engine.types import Request, Usage


@dataclass(eq=False)
class Sequence:
    """A request being served: its tokens so far (prompt + generated), KV, and what it streams to."""

    request: Request
    kv: SequenceKV
    tokens: list[int]
    sink: Any  # called with each Event
    stream: Any  # TextStream
    generator: Any  # torch.Generator | None
    usage: Usage
    order: int  # admission order (preemption takes the newest)
    admitted: bool = False
    swapped: bool = False
    extra: dict = field(default_factory=dict)
    matcher: Any = None  # constraint.Matcher of a constrained request (its grammar state)

    @property
    def remaining(self) -> int:
        """Tokens whose KV is not computed yet (1 while decoding)."""
        return len(self.tokens) - self.kv.length

    @property
    def in_prompt(self) -> bool:
        """Some of the prompt is still to compute (a prefix-cache hit can leave a single token of it)."""
        return self.kv.length < self.usage.prompt_tokens


class Scheduler:
    def __init__(self, pool: KVPool, chunk_size: int = 2048, max_batch_tokens: int | None = None,
                 max_running: int = 64):
        self.pool = pool
        self.chunk_size = chunk_size
        self.max_batch_tokens = max_batch_tokens or chunk_size + max_running
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Forget a finished or cancelled sequence and release its KV blocks at once."""
        for q in (self.running, self.waiting, self.swapped):
            if seq in q:
                q.remove(seq)
        seq.kv.release(seq.tokens)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.swapped)

    # ------------------------------------------------------------- the step
    def schedule(self) -> list[Segment]:
        budget = self.max_batch_tokens
        decodes: list[Segment] = []
        prefills: list[Segment] = []
        # 1. one token for every running sequence that is decoding, preempting the newest when blocks run out
        for seq in sorted(self.running, key=lambda s: s.order):
            if seq not in self.running or seq.remaining != 1 or seq.in_prompt:
                continue
            while True:
                try:
                    slots = seq.kv.reserve(1)
                    break
                except OutOfBlocks:
                    victim = max(self.running, key=lambda s: s.order)
                    self.preempt(victim)
                    if victim is seq:
                        slots = None
                        break
            if slots is not None:
                decodes.append(Segment(seq.kv, seq.tokens[-1:], seq.kv.length, slots, True))
                budget -= 1
        # 2. resume preempted sequences when their blocks fit again (before admitting anyone new)
        while self.swapped and len(self.running) < self.max_running:
            seq = self.swapped[0]
            if seq.kv.blocks_to_swap_in() + 1 > self.pool.n_free():
                break
            self.swapped.popleft()
            seq.kv.swap_in()
            seq.swapped = False
            self.running.append(seq)
        # 3. prefill chunks of sequences reading their prompt, oldest first
        for seq in sorted(self.running, key=lambda s: s.order):
            if (seq.remaining > 1 or seq.in_prompt) and budget > 0:
                seg = self._chunk(seq, budget)
                if seg is not None:
                    prefills.append(seg)
                    budget -= len(seg.tokens)
        # 4. admit new requests
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not seq.admitted:
                cached = seq.kv.match_prefix(seq.tokens)
                if "cached" not in seq.extra:  # the first admission (not a re-admission after preemption)
                    seq.extra["cached"] = seq.usage.cached_prompt_tokens = cached
                seq.admitted = True
            if not self._fits(seq):
                break
            self.waiting.popleft()
            self.running.append(seq)
            seg = self._chunk(seq, budget)
            if seg is not None:
                if len(seg.tokens) == 1 and not seg.prefill:
                    decodes.append(seg)
                else:
                    prefills.append(seg)
                budget -= len(seg.tokens)
        return decodes + prefills

    def _fits(self, seq: Sequence) -> bool:
        """Admit only when the rest of the prompt has room (windowed sequences need only their window)."""
        need = seq.remaining
        if seq.kv.window is not None:
            need = min(need, seq.kv.window + seq.kv.sinks + self.chunk_size)
        blocks = -(-need // self.pool.block_size) + 1
        return blocks <= self.pool.n_free() or not self.running

    def _chunk(self, seq: Sequence, budget: int) -> Segment | None:
        n = min(seq.remaining, self.chunk_size, budget, seq.kv.room())  # a smaller chunk when blocks are short
        if n < 1:
            return None
        try:
            slots = seq.kv.reserve(n)
        except OutOfBlocks:
            return None
        start = seq.kv.length
        return Segment(seq.kv, seq.tokens[start:start + n], start, slots, start + n == len(seq.tokens),
                       prefill=seq.in_prompt)

    def preempt(self, seq: Sequence) -> None:
        """Take a running sequence off the pool: to the offload tier if it fits there, else recompute later."""
        self.preemptions += 1
        self.running.remove(seq)
        if self.pool.tier is not None and len(self.pool.tier.free) >= seq.kv.table.n_resident():
            seq.kv.swap_out()
            seq.swapped = True
            self.swapped.appendleft(seq)
        else:  # recompute later: drop the KV, keep the tokens (prompt + generated so far)
            seq.kv.release(seq.tokens)
            seq.admitted = False
            self.waiting.appendleft(seq)
