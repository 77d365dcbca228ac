"""Token memory: when a conversation outgrows its budget, the oldest turns are folded into a bounded summary written
by the model itself, and the recent turns are kept verbatim.

The policy, per reply (``plan``):

1. The conversation's prompt (chat template, system prompt and tools included) is measured. Within the **budget**
   (prompt tokens; default: the context less the reply's ``max_tokens``, or less ``REPLY_RESERVE`` when the request
   sets none) nothing changes.
2. Over it, the leading system message stays, and the other messages are split at a fold point ``k``: messages
   ``0..k-1`` are folded, the rest (at least ``keep_last`` of them, always the newest) are kept word for word. A fold
   point already summarised for this conversation (the ``SummaryCache`` of the engine, keyed by a hash of the
   system prompt and the folded messages) is reused when the prompt then fits: the summary is **not regenerated**,
   and the compacted prompt starts with exactly the tokens of the previous turn's, so the engine's prefix cache
   serves them (``cached_prompt_tokens`` in the usage). Otherwise a new fold point is chosen: the first that brings
   the compacted prompt to at most ``low_water`` of the budget (room for several more turns before the next fold),
   or, when none does, the last one (only ``keep_last`` messages kept), moved on to a user message where possible.
3. The summary is written by the model, greedily, in at most ``summary_max_tokens`` tokens (the bound): one
   generation per chunk of folded messages, each chunk summarised together with the summary so far (so folding
   more of a conversation extends its last summary, and a long history never has to fit one prompt).
4. The summary goes into the system message (``SUMMARY_HEADER`` + summary, after the user's own system prompt).

A conversation whose newest ``keep_last`` messages alone, with the system prompt and a summary, exceed the budget
cannot be compacted: that is a ``CairnError`` naming the sizes. Without token memory an over-long prompt gets the
engine's usual error (a 400 on the server).

The request option is ``"cairn": {"memory": true | false | {"budget": N, "summary_max_tokens": N, "keep_last": N}}``
(``/v1/messages`` and ``/v1/chat/completions``); ``cairn chat --memory`` is the same policy in the terminal. The
response reports it under ``"cairn": {"memory": {...}}`` (``Compaction.metadata``); the usage counts the summary's
generations besides the reply's, as self-critique counts its stages.

``plan`` returns a ``Compaction``, which does no I/O: ``next_request()`` is the next summary generation (None when
done), ``record(text, finish)`` its answer; ``run`` drives it with a blocking engine, ``arun`` from asyncio (with
``self_critique.engine_generate(engine)`` or the server's own generate, as ``fit`` does).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from cairn.engine.types import FinishEvent, Request, SamplingParams, Usage
from cairn.errors import CairnError

SUMMARY_MAX_TOKENS = 256
KEEP_LAST = 2
LOW_WATER = 0.5
REPLY_RESERVE = 256  # reply room assumed when a request sets no max_tokens
OPTION_FIELDS = ("budget", "summary_max_tokens", "keep_last")
SUMMARY_HEADER = "Summary of the earlier part of this conversation (older messages were condensed to fit the context):"
SUMMARY_PROMPT = (
    "Summarise the conversation below between a user and an assistant, so that it can continue without it. Keep every "
    "fact, name, number, instruction, decision and open question that later messages may need; leave out greetings "
    "and filler. Write plain sentences, at most {words} words.\n\n{previous}Conversation:\n{transcript}"
)


@dataclass(frozen=True)
class Settings:
    budget: int | None = None  # most prompt tokens; None: the context less the reply's max_tokens
    summary_max_tokens: int | None = None  # None: SUMMARY_MAX_TOKENS, at most an eighth of the context
    keep_last: int = KEEP_LAST
    low_water: float = LOW_WATER

    def __post_init__(self) -> None:
        for name, low in (("budget", 16), ("summary_max_tokens", 8), ("keep_last", 1)):
            v = getattr(self, name)
            if v is None and name in ("budget", "summary_max_tokens"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise CairnError(f"memory: {name} must be a whole number of at least {low}, not {v!r}")

    def override(self, option: dict) -> Settings:
        unknown = sorted(set(option) - set(OPTION_FIELDS))
        if unknown:
            raise CairnError(f"cairn.memory.{unknown[0]}: unknown field; the fields are {', '.join(OPTION_FIELDS)}")
        return Settings(**{**self.__dict__, **option})


def requested(default: Settings | None, option) -> Settings | None:
    """A request's token-memory settings from its ``cairn`` field (``option``; None: the server's ``default``)."""
    if option is None or not isinstance(option, dict) or option.get("memory") is None:
        return default
    value = option["memory"]
    if isinstance(value, bool):
        return (default or Settings()) if value else None
    if isinstance(value, dict):
        return (default or Settings()).override(value)
    raise CairnError("cairn.memory: must be true, false or an object with any of "
                     f"{', '.join(OPTION_FIELDS)}, not {type(value).__name__}")


def add_arguments(p, *, server: bool) -> None:
    """The token-memory flags, the same on ``cairn chat`` and ``cairn serve``."""
    p.add_argument("--memory", action="store_true",
                   help="token memory: when the conversation outgrows its budget, fold the oldest turns into a "
                        "summary the model writes and keep the newest verbatim"
                        + ("; the server's default for chat requests, which a request turns on or off with "
                           '"cairn": {"memory": true|false|{...}}' if server else ""))
    p.add_argument("--memory-budget", type=int, default=None, metavar="TOKENS",
                   help="most prompt tokens before compacting (default: the context less the reply's max tokens)")
    p.add_argument("--memory-summary-tokens", type=int, default=None, metavar="N",
                   help=f"longest summary in tokens (default {SUMMARY_MAX_TOKENS}, at most an eighth of the context)")
    p.add_argument("--memory-keep-last", type=int, default=KEEP_LAST, metavar="N",
                   help="newest messages always kept verbatim")


def settings_from_args(args) -> Settings | None:
    """The ``--memory*`` flags' settings (None without ``--memory``; the other flags alone are an error)."""
    if not args.memory:
        if args.memory_budget is not None or args.memory_summary_tokens is not None \
                or args.memory_keep_last != KEEP_LAST:
            raise CairnError("--memory-budget, --memory-summary-tokens and --memory-keep-last set up token memory: "
                             "add --memory to use them")
        return None
    return Settings(args.memory_budget, args.memory_summary_tokens, args.memory_keep_last)


# ------------------------------------------------------------------------------------------------ summary cache
class SummaryCache:
    """Summaries already written, by a hash of what they fold (LRU, ``size`` entries); thread-safe."""

    def __init__(self, size: int = 512):
        self.size = size
        self._d: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        with self._lock:
            if key in self._d:
                self._d.move_to_end(key)
                return self._d[key]
            return None

    def put(self, key: str, summary: str) -> None:
        with self._lock:
            self._d[key] = summary
            self._d.move_to_end(key)
            while len(self._d) > self.size:
                self._d.popitem(last=False)


_caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def cache_for(engine) -> SummaryCache:
    """The summary cache of ``engine`` (one per engine: an adapter's summaries are its own)."""
    with _caches_lock:
        if engine not in _caches:
            _caches[engine] = SummaryCache()
        return _caches[engine]


def _key(system: list[dict], folded: list[dict], settings: Settings) -> str:
    blob = json.dumps([settings.summary_max_tokens, system, folded], ensure_ascii=False, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------ planning
def transcript(messages: list[dict]) -> str:
    return "\n\n".join(f"{str(m['role']).capitalize()}: {m.get('content') or ''}" for m in messages)


def with_summary(system: list[dict], summary: str, kept: list[dict]) -> list[dict]:
    """The compacted conversation: the system message (the user's own prompt, then the summary), the kept turns."""
    note = f"{SUMMARY_HEADER}\n{summary.strip()}"
    if system:
        head = {**system[0], "content": f"{system[0]['content']}\n\n{note}" if system[0]["content"] else note}
        return [head, *system[1:], *kept]
    return [{"role": "system", "content": note}, *kept]


@dataclass
class Compaction:
    """One reply's compaction: the fold, the summary generations still to run, and what they cost. No I/O."""

    tokenizer: object
    settings: Settings
    budget: int
    original_tokens: int
    system: list[dict]
    rest: list[dict]
    fold: int  # messages rest[:fold] are folded
    encode: Callable[[list[dict]], list[int]]
    cache: SummaryCache
    summary: str | None = None  # the summary so far (a cached one for rest[:start])
    start: int = 0  # rest[:start] is in `summary` already
    reused: bool = False
    chunks: list[tuple[int, int]] = field(default_factory=list)  # the [a, b) slices of rest still to fold
    stages: list[tuple[FinishEvent, float]] = field(default_factory=list)
    ids: list[int] | None = None  # the compacted prompt, when done
    room: int = 1 << 30  # transcript tokens one summary prompt holds

    @property
    def done(self) -> bool:
        return not self.chunks

    def next_request(self) -> Request | None:
        if not self.chunks:
            return None
        a, b = self.chunks[0]
        previous = f"Summary of what came before:\n{self.summary.strip()}\n\n" if self.summary else ""
        words = max(8, int(self.settings.summary_max_tokens * 0.6))
        text = _cut(self.tokenizer, transcript(self.rest[a:b]), self.room)
        prompt = SUMMARY_PROMPT.format(words=words, previous=previous, transcript=text)
        ids = self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return Request(ids, SamplingParams(max_tokens=self.settings.summary_max_tokens, temperature=0.0))

    def record(self, text: str, finish: FinishEvent, seconds: float = 0.0) -> None:
        if finish.reason == "cancelled":
            raise CairnError("token memory: the summary generation was cancelled")
        a, b = self.chunks.pop(0)
        self.summary = text.strip() or self.summary or "(nothing to note)"
        self.start = b
        self.cache.put(_key(self.system, self.rest[:b], self.settings), self.summary)
        self.stages.append((finish, seconds))
        if not self.chunks:
            self._finish()

    def _finish(self) -> None:
        self.ids = self.encode(self.messages())

    def messages(self) -> list[dict]:
        return with_summary(self.system, self.summary or "", self.rest[self.fold:])

    def usage(self) -> Usage:
        u = Usage()
        for f, _ in self.stages:
            u.prompt_tokens += f.usage.prompt_tokens
            u.cached_prompt_tokens += f.usage.cached_prompt_tokens
            u.completion_tokens += f.usage.completion_tokens
        return u

    def metadata(self) -> dict:
        u = self.usage()
        return {
            "compacted": True,
            "budget": self.budget,
            "original_prompt_tokens": self.original_tokens,
            "prompt_tokens": len(self.ids) if self.ids is not None else None,
            "folded_messages": self.fold,
            "kept_messages": len(self.rest) - self.fold,
            "summary": self.summary,
            "summary_reused": self.reused,
            "summary_generations": len(self.stages),
            "summary_usage": {"prompt_tokens": u.prompt_tokens, "cached_prompt_tokens": u.cached_prompt_tokens,
                              "completion_tokens": u.completion_tokens},
        }


@dataclass
class Unchanged:
    """Token memory was on and the conversation fit its budget."""

    budget: int
    prompt_tokens: int

    def metadata(self) -> dict:
        return {"compacted": False, "budget": self.budget, "prompt_tokens": self.prompt_tokens}

    def usage(self) -> Usage:
        return Usage()


def budget_for(settings: Settings, max_context: int, reply_tokens: int | None) -> int:
    """The most prompt tokens: the setting (at most the context less one token), else the context less the reply."""
    if settings.budget is not None:
        return min(settings.budget, max_context - 1)
    reply = REPLY_RESERVE if reply_tokens is None else reply_tokens
    return max(16, max_context - min(reply, max_context // 2))


def plan(tokenizer, engine, turns: list[dict], ids: list[int], encode: Callable[[list[dict]], list[int]],
         settings: Settings, max_context: int, reply_tokens: int | None) -> Compaction | Unchanged:
    """How to fit ``turns`` (whose prompt is ``ids``, rendered by ``encode``) into the budget; see the module doc."""
    budget = budget_for(settings, max_context, reply_tokens)
    if settings.summary_max_tokens is None:
        settings = replace(settings, summary_max_tokens=min(SUMMARY_MAX_TOKENS, max(16, max_context // 8)))
    if len(ids) <= budget:
        return Unchanged(budget, len(ids))
    n_sys = 1 if turns and turns[0]["role"] == "system" else 0
    system, rest = [dict(t) for t in turns[:n_sys]], list(turns[n_sys:])
    most = len(rest) - settings.keep_last  # the most messages that may be folded
    cache = cache_for(engine)
    if most < 1:
        raise CairnError(f"token memory: the conversation's prompt is {len(ids)} tokens, over its budget of {budget}, "
                         f"and it has only {len(rest)} message(s) besides the system prompt, which keep_last="
                         f"{settings.keep_last} keeps verbatim: shorten the newest messages or raise the budget")
    size = {}

    def tokens_with(k: int, summary: str | None) -> int:
        if summary is None and k in size:
            return size[k]
        # without a summary yet: the prompt with an empty one, plus the most tokens a summary may take
        n = len(encode(with_summary(system, summary or "", rest[k:])))
        if summary is None:
            n = size[k] = n + settings.summary_max_tokens
        return n

    # a fold this conversation already has a summary for, the latest first: its prompt is the previous turn's
    for k in range(most, 0, -1):
        summary = cache.get(_key(system, rest[:k], settings))
        if summary is not None:
            if tokens_with(k, summary) <= budget:
                c = Compaction(tokenizer, settings, budget, len(ids), system, rest, k, encode, cache, summary, k,
                               reused=True)
                c._finish()
                return c
            break  # it no longer fits: fold further, starting from that summary
    else:
        summary, k = None, 0
    start = k if summary is not None else 0
    fits = [j for j in range(start + 1, most + 1) if tokens_with(j, None) <= budget]
    if not fits:
        raise CairnError(f"token memory: the conversation's prompt is {len(ids)} tokens, over its budget of {budget}, "
                         f"and even with all but the newest {settings.keep_last} message(s) folded into a summary "
                         f"of up to {settings.summary_max_tokens} tokens it is {tokens_with(most, None)}: shorten the "
                         "newest messages, lower keep_last or summary_max_tokens, or raise the budget")
    low = [j for j in fits if tokens_with(j, None) <= settings.low_water * budget]
    fold = low[0] if low else fits[-1]  # under the low-water mark if it can be, else as low as it can go
    if rest[fold]["role"] != "user":  # keep from a user message: later if allowed, else earlier if it fits
        later = [j for j in fits if j > fold and rest[j]["role"] == "user"]
        earlier = [j for j in fits if j < fold and rest[j]["role"] == "user"]
        fold = later[0] if later else earlier[-1] if earlier else fold
    c = Compaction(tokenizer, settings, budget, len(ids), system, rest, fold, encode, cache, summary, start)
    c.room = _room(max_context, settings)
    c.chunks = _chunks(tokenizer, rest, start, fold, c.room)
    return c


def _room(max_context: int, settings: Settings) -> int:
    """Tokens of transcript one summary prompt holds: the context less the instructions, summary so far and reply."""
    return max(32, max_context - 2 * settings.summary_max_tokens - 160)


def _chunks(tokenizer, rest: list[dict], a: int, b: int, room: int) -> list[tuple[int, int]]:
    """Split rest[a:b] into runs whose transcript fits ``room`` tokens (a message too long alone is its own run,
    its text cut in the middle when the prompt is built)."""
    out, i = [], a
    while i < b:
        j, used = i, 0
        while j < b:
            n = len(tokenizer.encode(transcript([rest[j]]))) + 4
            if j > i and used + n > room:
                break
            used += n
            j += 1
        out.append((i, j))
        i = j
    return out


def _cut(tokenizer, text: str, room: int) -> str:
    ids = tokenizer.encode(text)
    if len(ids) <= room:
        return text
    half = room // 2 - 4
    return tokenizer.decode(ids[:half]) + " [...] " + tokenizer.decode(ids[-half:])


# ------------------------------------------------------------------------------------------------------ drivers
def run(engine, c: Compaction | Unchanged) -> Compaction | Unchanged:
    """Run the summary generations of ``c`` on ``engine`` (blocking)."""
    while isinstance(c, Compaction) and (request := c.next_request()) is not None:
        t0, parts, finish = time.perf_counter(), [], None
        for ev in engine.events(request):
            parts.append(ev.text)
            if isinstance(ev, FinishEvent):
                finish = ev
        c.record("".join(parts), finish, time.perf_counter() - t0)
    return c


Generate = Callable[[Request], Awaitable[tuple[str, FinishEvent]]]


async def arun(c: Compaction | Unchanged, generate: Generate) -> Compaction | Unchanged:
    """Run the summary generations of ``c`` with ``generate`` (a coroutine: one request → (text, finish))."""
    while isinstance(c, Compaction) and (request := c.next_request()) is not None:
        t0 = time.perf_counter()
        text, finish = await generate(request)
        c.record(text, finish, time.perf_counter() - t0)
    return c



# --------------------------------------------------------------------------------------------------- the server
async def fit(state, option, turns: list[dict], ids: list[int], encode: Callable[[list[dict]], list[int]],
              reply_tokens: int | None, http_request=None):
    """The server's hook: ``(turns, ids, memo)`` for a chat request, compacted when its ``cairn.memory`` option (or
    the server's default, ``state.memory``) asks and the conversation is over its budget; ``memo`` is None when token
    memory is off. Summary generations hold one admission and are cancelled if the client leaves."""
    from cairn.serve.errors import APIError
    from cairn.serve.runtime import Generation, failed

    try:
        settings = requested(getattr(state, "memory", None), option)
    except CairnError as e:
        raise APIError(400, str(e), param="cairn") from None
    if settings is None:
        return turns, ids, None
    try:
        c = await state.off_loop(plan, state.tokenizer, state.engine, turns, ids, encode, settings,
                                 state.max_context, reply_tokens)
    except CairnError as e:
        raise APIError(400, str(e), param="messages") from None
    if isinstance(c, Unchanged):
        return turns, ids, c

    async def generate(request: Request) -> tuple[str, FinishEvent]:
        try:
            state.engine.check(request)
        except CairnError as e:
            raise APIError(400, f"token memory's summary prompt: {e}") from None
        gen = Generation(state, [request], admitted=0)
        [(text, _, _, finish)] = await gen.collect(http_request)
        if failed(finish, gen):
            raise APIError(500, "generation failed inside the engine; see the server log")
        return text, finish

    if not c.done:
        state.admit(1)
        try:
            await arun(c, generate)
        finally:
            state.release(1)
    return c.messages(), c.ids, c


def annotate(data: dict, memo) -> dict:
    """A finished response (Anthropic message or OpenAI chat completion) with ``"cairn": {"memory": ...}`` and the
    summary generations' tokens added to its usage."""
    if memo is None:
        return data
    data.setdefault("cairn", {})["memory"] = memo.metadata()
    if isinstance(data.get("usage"), dict):
        _add_usage(data["usage"], memo.usage())
    return data


def _add_usage(usage: dict, u: Usage) -> None:
    if "input_tokens" in usage:  # Anthropic
        usage["input_tokens"] = usage.get("input_tokens", 0) + u.prompt_tokens - u.cached_prompt_tokens
        usage["cache_read_input_tokens"] = usage.get("cache_read_input_tokens", 0) + u.cached_prompt_tokens
        usage["output_tokens"] = usage.get("output_tokens", 0) + u.completion_tokens
    elif "prompt_tokens" in usage:  # OpenAI
        usage["prompt_tokens"] += u.prompt_tokens
        usage["completion_tokens"] += u.completion_tokens
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        details = usage.setdefault("prompt_tokens_details", {})
        details["cached_tokens"] = (details.get("cached_tokens") or 0) + u.cached_prompt_tokens


def stream(frames, memo):
    """A streamed reply's SSE frames with token memory's report: Anthropic's ``message_delta`` (and the usage of
    ``message_start``) and OpenAI's chunk with a ``finish_reason`` (and its usage chunk) carry it, as self-critique's
    report is carried. Without a report, ``frames`` themselves (no generator between them and the response, whose
    every token frame would pass through it)."""
    return frames if memo is None else _stream(frames, memo)


async def _stream(frames, memo):
    try:
        async for frame in frames:
            if not frame.startswith(("event:", "data:")):
                yield frame
                continue
            lines = frame.rstrip("\n").split("\n")
            data_at = next((i for i, x in enumerate(lines) if x.startswith("data: ")), None)
            if data_at is None or lines[data_at] == "data: [DONE]":
                yield frame
                continue
            obj = json.loads(lines[data_at][6:])
            kind = obj.get("type") if isinstance(obj, dict) else None
            if kind == "message_start" and isinstance(obj["message"].get("usage"), dict):
                _add_usage(obj["message"]["usage"], memo.usage())
            elif kind == "message_delta":
                annotate(obj, memo)
            elif isinstance(obj, dict) and obj.get("object") == "chat.completion.chunk":
                if any(c.get("finish_reason") for c in obj.get("choices") or []):
                    obj.setdefault("cairn", {})["memory"] = memo.metadata()
                if isinstance(obj.get("usage"), dict):
                    _add_usage(obj["usage"], memo.usage())
            else:
                yield frame
                continue
            lines[data_at] = "data: " + json.dumps(obj, ensure_ascii=False)
            yield "\n".join(lines) + "\n\n"
    finally:
        aclose = getattr(frames, "aclose", None)
        if aclose is not None:
            await aclose()
