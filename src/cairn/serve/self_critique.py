"""Self-critique at inference (Constitutional AI, stage III): draft a reply, critique it, revise it.

One reply costs ``1 + 2 * rounds`` generations, all through the engine:

1. **draft**: the conversation as the user sent it, with the request's own sampling (so at temperature 0 the
   draft is exactly the reply the model gives without self-critique);
2. per round, under one principle of the constitution: a **critique** of the current reply
   (``cai.critique_messages``, at most ``critique_max_tokens`` tokens, no stop strings), then a **revision** given
   that critique (``cai.revision_messages``, the request's own sampling and stop strings), which becomes the
   current reply.

The last revision is the answer; its finish reason is the answer's. The prompts are the ones every CAI stage uses
(``cairn.train.cai``), so the model is asked at inference exactly what SL-CAI asked it in training.

Which principles: the ids in ``principles`` (one round each, in that order), or else ``rounds`` principles drawn
uniformly without replacement from the constitution by ``random.Random(seed)``; without a seed, the request's own
sampling seed, and without that a fresh draw each time. Stage *k* (draft 0, then critique, revision, ...) samples
with the request's seed + *k*, so a seeded request is reproducible and its stages are not copies of one stream.

The critic sees the request as text (``cai.as_text``): the user's message when the conversation is one user turn,
else a transcript of the turns (``User: ...`` / ``Assistant: ...``); the system prompt is not shown to it (the draft
is made with it). The draft and critique go into the prompts stripped of surrounding whitespace, as in SL-CAI.

``Chain`` is the bookkeeping of one reply and does no I/O (``next_request`` / ``record``); ``run`` drives it
synchronously (``cairn chat``, offline use), ``arun`` from asyncio with any coroutine that generates one request
(the default streams through ``Engine.stream``; the server passes its own, which holds the request's admission,
counts metrics and cancels on a disconnect). Used by the chat CLI and the HTTP server; nothing here knows HTTP.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace

from cairn.engine.types import FinishEvent, Request, SamplingParams, TokenEvent, Usage
from cairn.errors import CairnError
from cairn.train.cai import Constitution, Principle, as_text, critique_messages, load_constitution, revision_messages

MAX_ROUNDS = 8  # each round is two more generations
CRITIQUE_MAX_TOKENS = 128  # "two or three sentences" (the critique prompt's own request) fit well within it
OPTION_FIELDS = ("principles", "rounds", "seed", "critique_max_tokens")
REQUEST_OPTIONS = ("memory", "self_critique")  # the "cairn" field's keys (memory: cairn.serve.memory)


@dataclass(frozen=True)
class Settings:
    """How replies are critiqued: the constitution, and which principles (fixed ids, or ``rounds`` drawn)."""

    constitution: Constitution
    principles: tuple[str, ...] = ()  # fixed ids, one round each, in order; empty: draw `rounds` of them
    rounds: int = 1
    seed: int | None = None
    critique_max_tokens: int = CRITIQUE_MAX_TOKENS

    def __post_init__(self) -> None:
        ids = ", ".join(p.id for p in self.constitution)
        for pid in self.principles:
            if not any(p.id == pid for p in self.constitution):
                raise CairnError(f"self-critique: the constitution ({self.constitution.source}) has no principle "
                                 f"{pid!r}; its principles are {ids}")
        if len(self.principles) > MAX_ROUNDS:
            raise CairnError(f"self-critique: {len(self.principles)} principles given; at most {MAX_ROUNDS} rounds "
                             "(each is two more generations)")
        most = min(MAX_ROUNDS, len(self.constitution))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= most:
            raise CairnError(f"self-critique: rounds must be a whole number from 1 to {most} (principles are drawn "
                             f"without replacement from the {len(self.constitution)} of the constitution), "
                             f"not {self.rounds!r}")
        if isinstance(self.critique_max_tokens, bool) or not isinstance(self.critique_max_tokens, int) \
                or not 1 <= self.critique_max_tokens <= 4096:
            raise CairnError("self-critique: critique_max_tokens must be a whole number from 1 to 4096, "
                             f"not {self.critique_max_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise CairnError(f"self-critique: seed must be an integer, not {self.seed!r}")

    def rng(self, fallback_seed: int | None = None) -> random.Random:
        """The generator that draws principles: ``seed``, else ``fallback_seed`` (the request's), else fresh."""
        return random.Random(self.seed if self.seed is not None else fallback_seed)

    def pick(self, rng: random.Random) -> list[Principle]:
        """The principles of one reply, one per round."""
        if self.principles:
            return [self.constitution.get(pid) for pid in self.principles]
        return rng.sample(list(self.constitution.principles), self.rounds)

    def override(self, option: dict) -> Settings:
        """These settings with a request's own ``principles`` / ``rounds`` / ``seed`` / ``critique_max_tokens``.
        A request's ``rounds`` without ``principles`` means "draw this many" (it clears fixed principles)."""
        changes: dict = {}
        if "principles" in option:
            ps = option["principles"]
            if not isinstance(ps, list) or not ps or not all(isinstance(p, str) and p for p in ps):
                raise CairnError('cairn.self_critique.principles must be a non-empty list of principle ids, e.g. '
                                 f'["harm"]; the constitution has {", ".join(p.id for p in self.constitution)}')
            changes["principles"] = tuple(ps)
            if "rounds" in option and option["rounds"] != len(ps):
                raise CairnError("cairn.self_critique: rounds and principles disagree (each listed principle is one "
                                 "round): give one of them")
        elif "rounds" in option:
            changes.update(principles=(), rounds=option["rounds"])
        for key in ("seed", "critique_max_tokens"):
            if key in option:
                changes[key] = option[key]
        return replace(self, **changes)


def load_settings(constitution: str | None = None, principles: str | None = None, rounds: int = 1,
                  seed: int | None = None, critique_max_tokens: int = CRITIQUE_MAX_TOKENS) -> Settings:
    """Settings from command-line values (``principles`` comma-separated)."""
    ids = tuple(p.strip() for p in principles.split(",") if p.strip()) if principles else ()
    if principles is not None and not ids:
        raise CairnError("--critique-principles: give principle ids separated by commas, e.g. harm,honesty")
    if ids and rounds not in (1, len(ids)):
        raise CairnError(f"--critique-rounds {rounds} and --critique-principles ({len(ids)} ids, one round each) "
                         "disagree: give one of them")
    return Settings(load_constitution(constitution), ids, len(ids) or rounds, seed, critique_max_tokens)


def add_arguments(p: argparse.ArgumentParser, *, server: bool) -> None:
    """The self-critique flags, the same on ``cairn chat`` and ``cairn serve``."""
    p.add_argument("--self-critique", action="store_true",
                   help="draft each reply, critique it against a principle of the constitution and answer with the "
                        "revision (Constitutional AI at inference; costs 1 + 2 x rounds generations per reply)"
                        + ("; the server's default, which a request turns on or off with "
                           '"cairn": {"self_critique": true|false}' if server else ""))
    p.add_argument("--constitution", default=None, metavar="FILE",
                   help="the constitution (YAML, see docs/alignment.md) for self-critique (default: cairn's own)")
    p.add_argument("--critique-principles", default=None, metavar="IDS",
                   help="critique against these principle ids, comma-separated, one round each in order "
                        "(default: draw --critique-rounds principles at random)")
    p.add_argument("--critique-rounds", type=int, default=1, metavar="N",
                   help="critique-and-revise rounds, each under a principle drawn without replacement (default 1)")
    p.add_argument("--critique-max-tokens", type=int, default=CRITIQUE_MAX_TOKENS, metavar="N",
                   help=f"longest critique in tokens (default {CRITIQUE_MAX_TOKENS})")


def settings_from_args(args: argparse.Namespace) -> Settings:
    return load_settings(args.constitution, args.critique_principles, args.critique_rounds,
                         None, args.critique_max_tokens)


def requested(default_on: bool, settings: Settings, option, *, chat: bool = True) -> Settings | None:
    """A request's self-critique from the ``cairn`` field of its body (``option``): None when off.

    ``{"self_critique": true | false}`` turns it on or off; ``{"self_critique": {"principles": [...], "rounds": N,
    "seed": S, "critique_max_tokens": N}}`` turns it on with those settings; absent or null: the server's default.
    Anything else is a ``CairnError`` naming the field and the fix. ``chat=False`` (raw completions): the server's
    default does not apply, and asking for self-critique is refused.
    """
    value = None
    if option is not None:
        if not isinstance(option, dict):
            raise CairnError('cairn: must be an object of cairn\'s request options, e.g. {"self_critique": true}')
        unknown = sorted(set(option) - set(REQUEST_OPTIONS))
        if unknown:
            raise CairnError(f"cairn.{unknown[0]}: unknown option; cairn's request options are: "
                             f"{', '.join(REQUEST_OPTIONS)}")
        if not chat and option.get("memory") not in (None, False):
            raise CairnError("cairn.memory: token memory compacts chat conversations (/v1/chat/completions, "
                             "/v1/messages), not raw text completions: send a chat request or leave it out")
        value = option.get("self_critique")
    if value is None:
        return settings if default_on and chat else None
    if isinstance(value, bool):
        out = settings if value else None
    elif isinstance(value, dict):
        unknown = sorted(set(value) - set(OPTION_FIELDS))
        if unknown:
            raise CairnError(f"cairn.self_critique.{unknown[0]}: unknown field; the fields are "
                             f"{', '.join(OPTION_FIELDS)}")
        out = settings.override(value)
    else:
        raise CairnError("cairn.self_critique: must be true, false or an object with any of "
                         f"{', '.join(OPTION_FIELDS)}, not {type(value).__name__}")
    if out is not None and not chat:
        raise CairnError("cairn.self_critique: self-critique works on chat requests (/v1/chat/completions, "
                         "/v1/messages), not on raw text completions: send a chat request or leave it out")
    return out


def request_text(messages: list[dict]) -> str:
    """The request as the critic sees it (``cai.as_text``): the user's message, or a transcript of a longer
    conversation; the system prompt left out."""
    return as_text([m for m in messages if m["role"] != "system"])


@dataclass(frozen=True)
class Step:
    kind: str  # "draft", "critique" or "revision"
    principle: Principle | None  # None for the draft
    round: int  # 0 for the draft, then 1, 2, ...
    final: bool  # the last revision: the answer


@dataclass
class Stage:
    step: Step
    text: str
    finish: FinishEvent
    seconds: float


def _stage_seed(seed: int | None, k: int) -> int | None:
    return None if seed is None else (seed + k) % 2**64


@dataclass
class Chain:
    """One reply's draft → (critique → revision) × rounds, as engine requests; no I/O.

    ``next_request()`` is the next stage's request (None when done) and ``record(text, finish, seconds)`` its
    answer. ``messages`` is the conversation (role/content dicts); ``prompt_ids`` the draft's prompt when the
    caller has rendered it already (the server: system prompt, template), else the chat template of ``messages``.
    """

    tokenizer: object
    messages: list[dict]
    params: SamplingParams
    principles: list[Principle]
    prompt_ids: list[int] | None = None
    critique_max_tokens: int = CRITIQUE_MAX_TOKENS
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.principles:
            raise CairnError("self-critique needs at least one principle")
        self.request = request_text(self.messages)
        last = len(self.principles)
        self.steps = [Step("draft", None, 0, False)] + [
            Step(kind, p, i, kind == "revision" and i == last)
            for i, p in enumerate(self.principles, 1) for kind in ("critique", "revision")]

    @property
    def step(self) -> Step | None:
        """The stage ``next_request`` builds (None when every stage is done)."""
        return self.steps[len(self.stages)] if len(self.stages) < len(self.steps) else None

    @property
    def draft(self) -> str | None:
        return self.stages[0].text if self.stages else None

    def reply(self) -> str | None:
        """The current reply: the latest draft or revision."""
        texts = [s.text for s in self.stages if s.step.kind != "critique"]
        return texts[-1] if texts else None

    def next_request(self, id: str | None = None) -> Request | None:
        step = self.step
        if step is None:
            return None
        k = len(self.stages)
        seed = _stage_seed(self.params.seed, k)
        if step.kind == "draft":
            ids = self.prompt_ids if self.prompt_ids is not None else self.tokenizer.encode_chat(self.messages)
            params = replace(self.params, seed=seed)
        elif step.kind == "critique":  # texts go into the prompts stripped, as in SL-CAI (cai.generate_replies)
            ids = self.tokenizer.encode_chat(critique_messages(self.request, self.reply().strip(), step.principle))
            params = replace(self.params, max_tokens=self.critique_max_tokens, seed=seed, stop=[], logprobs=False)
        else:
            critique = self.stages[-1].text.strip()
            ids = self.tokenizer.encode_chat(revision_messages(self.request, self.reply().strip(), critique,
                                                               step.principle))
            params = replace(self.params, seed=seed)
        kw = {"id": id} if id is not None else {}
        return Request(list(ids), params, **kw)

    def record(self, text: str, finish: FinishEvent, seconds: float = 0.0) -> None:
        step = self.step
        if step is None:
            raise CairnError("self-critique: every stage is done already")
        if finish.reason == "cancelled":
            raise CairnError(f"self-critique: the {step.kind} generation was cancelled")
        self.stages.append(Stage(step, text, finish, seconds))

    @property
    def done(self) -> bool:
        return self.step is None

    def usage(self) -> Usage:
        """Tokens of every stage recorded so far, summed (what the reply really cost)."""
        u = Usage()
        for s in self.stages:
            u.prompt_tokens += s.finish.usage.prompt_tokens
            u.cached_prompt_tokens += s.finish.usage.cached_prompt_tokens
            u.completion_tokens += s.finish.usage.completion_tokens
        return u

    def metadata(self) -> dict:
        """What the response reports: the draft, each round's principle, critique and revision, whether the answer
        differs from the draft, and per stage its tokens, engine finish reason and seconds."""
        rounds = []
        for s in self.stages[1:]:
            if s.step.kind == "critique":
                rounds.append({"principle": s.step.principle.id, "critique": s.text})
            else:
                rounds[-1]["revision"] = s.text
        return {
            "draft": self.draft,
            "critiques": rounds,
            "revised": self.done and self.reply() != self.draft,
            "stages": [{"stage": s.step.kind, **({"principle": s.step.principle.id} if s.step.principle else {}),
                        "prompt_tokens": s.finish.usage.prompt_tokens,
                        "cached_prompt_tokens": s.finish.usage.cached_prompt_tokens,
                        "completion_tokens": s.finish.usage.completion_tokens,
                        "finish_reason": s.finish.reason, "seconds": round(s.seconds, 4)} for s in self.stages],
        }


def chain(tokenizer, settings: Settings, messages: list[dict], params: SamplingParams,
          prompt_ids: list[int] | None = None, rng: random.Random | None = None) -> Chain:
    """A ``Chain`` for one reply, its principles picked by ``settings`` (with ``rng``, or
    ``settings.rng(params.seed)``)."""
    principles = settings.pick(rng if rng is not None else settings.rng(params.seed))
    return Chain(tokenizer, messages, params, principles, prompt_ids, settings.critique_max_tokens)


# ------------------------------------------------------------------------------------------------------ drivers
def run(engine, c: Chain, on_start: Callable[[Step], None] | None = None,
        on_text: Callable[[Step, str], None] | None = None) -> str:
    """Run every stage of ``c`` on ``engine`` (blocking); the answer. ``on_start(step)`` is called as each stage
    starts, ``on_text(step, piece)`` as its text streams."""
    while (request := c.next_request()) is not None:
        step, parts, finish = c.step, [], None
        if on_start is not None:
            on_start(step)
        t0 = time.perf_counter()
        for ev in engine.events(request):
            if ev.text:
                parts.append(ev.text)
                if on_text is not None:
                    on_text(step, ev.text)
            if isinstance(ev, FinishEvent):
                finish = ev
        c.record("".join(parts), finish, time.perf_counter() - t0)
    return c.reply()


Generate = Callable[[Request], Awaitable[tuple[str, FinishEvent]]]


def engine_generate(engine) -> Generate:
    """One request through ``Engine.stream`` (asyncio): (text, finish event)."""

    async def generate(request: Request) -> tuple[str, FinishEvent]:
        parts, finish = [], None
        async for ev in engine.stream(request):
            parts.append(ev.text)
            if not isinstance(ev, TokenEvent):
                finish = ev
        return "".join(parts), finish

    return generate


async def arun(c: Chain, generate: Generate, *, until_final: bool = False) -> str | None:
    """Run the stages of ``c`` with ``generate`` (``engine_generate(engine)`` or the server's); the answer. With
    ``until_final``, stop before the last revision, which the caller runs itself (to stream it)."""
    while (step := c.step) is not None and not (until_final and step.final):
        t0 = time.perf_counter()
        text, finish = await generate(c.next_request())
        c.record(text, finish, time.perf_counter() - t0)
    return c.reply()
