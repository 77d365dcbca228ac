"""The Anthropic Messages API (version 2023-06-01) over the engine: /v1/messages and /v1/messages/count_tokens."""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from typing import Any, ClassVar, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from cairn.engine.types import FinishEvent, SamplingParams, TokenEvent
from cairn.engine.types import Request as EngineRequest
from cairn.errors import CairnError
from cairn.serve import direct, memory
from cairn.serve.errors import APIError, stream_error_anthropic
from cairn.serve.prompts import merge_turns, temperature
from cairn.serve.runtime import FrameTemplate, Generation, ServerState, SSEResponse, failed, self_critique
from cairn.serve.schema import ANY, RequestBody, RequestModel
from cairn.serve.self_critique import Chain, chain
from cairn.serve.structured import compile_format, output_format, refuse_thinking
from cairn.serve.tools import (
    CallArgs,
    CallEnd,
    CallParser,
    CallStart,
    Choice,
    Text,
    Tool,
    call_constraint,
    check_choice,
    encode,
    has_tool_turns,
    make_tool,
)

log = logging.getLogger("cairn.serve")

STOP_REASONS = {
    "eos": "end_turn",
    "max_tokens": "max_tokens",
    "stop_sequence": "stop_sequence",
    "context_full": "model_context_window_exceeded",
}


class ContentBlock(RequestModel):
    type: str
    text: str | None = None


class MessageParam(RequestModel):
    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class Metadata(RequestModel):
    user_id: str | None = None


class CountTokensRequest(RequestBody):
    # the Messages fields that do not change a prompt's count, so that one request body can be counted and sent
    accepted: ClassVar[dict[str, tuple | None]] = {
        "thinking": ({"type": "disabled"},), "output_config": ANY, "output_format": ANY, "cairn": ANY,
        "service_tier": ("auto", "standard_only")}
    model: str
    messages: list[MessageParam]
    system: str | list[ContentBlock] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None


class MessagesRequest(CountTokensRequest):
    accepted: ClassVar[dict[str, tuple | None]] = {"service_tier": ("auto", "standard_only")}
    max_tokens: int = Field(ge=0)  # 0: nothing is generated (Anthropic's cache pre-warming)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None
    output_config: Any = None  # structured output: {"format": {"type": "json_schema", "schema": ...}}
    output_format: Any = None  # the same format, where the structured-outputs beta put it
    thinking: Any = None  # refused (400) unless {"type": "disabled"}: the model has no thinking mode
    cairn: Any = None  # cairn's own request options: {"self_critique": true | false | {...}}


def _text(content: str | list[ContentBlock], where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for i, block in enumerate(content):
        if block.type != "text":
            raise APIError(400, f"{where}.content.{i}: content blocks of type {block.type!r} are not supported "
                                "(cairn serves a text-only model: use 'text' blocks)")
        if block.text is None:
            raise APIError(400, f"{where}.content.{i}.text: Field required")
        parts.append(block.text)
    return "\n\n".join(p for p in parts if p)


def prompt_ids(state: ServerState, body: CountTokensRequest) -> tuple[list[int], str | None]:
    """(prompt token ids, prefill text or None) for a Messages request (its tools rendered into the prompt)."""
    turns, prefill = conversation(body)
    tools, _ = request_tools(body)
    return encode(state.tokenizer, turns, tools, prefill), prefill


def conversation(body: CountTokensRequest) -> tuple[list[dict], str | None]:
    """(the turns as role/content dicts, system first, and the prefill text or None) of a Messages request."""
    if not body.messages:
        raise APIError(400, "messages: at least one message is required", param="messages")
    names: dict[str, str] = {}  # tool_use id -> tool name, for the results that answer them
    turns = merge_turns([t for i, m in enumerate(body.messages) for t in _turns(m, i, names)])
    system = None
    if body.system is not None:
        system = body.system if isinstance(body.system, str) else _text(body.system, "system")
    prefill = None
    if turns[-1]["role"] == "assistant":
        if turns[-1].get("tool_calls"):
            raise APIError(400, "messages: the last message is an assistant turn with tool_use blocks: send the "
                                "tool_result blocks for them in a user turn after it", param="messages")
        prefill = turns.pop()["content"]
        if prefill != prefill.rstrip():
            raise APIError(400, "messages: final assistant content cannot end with trailing whitespace")
    if system:
        turns.insert(0, {"role": "system", "content": system})
    return turns, prefill


TOOL_FIELDS = {"type", "name", "description", "input_schema", "strict", "cache_control"}


def request_tools(body: CountTokensRequest) -> tuple[list[Tool], Choice]:
    """The request's custom tools and its tool_choice; server tools and unknown fields are a 400.

    Every call is held to its tool's ``input_schema`` by the grammar, so ``strict`` (true or false) is always
    honoured; a schema feature the grammar cannot enforce is a 400 when the request is made."""
    tools = []
    for i, t in enumerate(body.tools or []):
        where = f"tools.{i}"
        if not isinstance(t, dict):
            raise APIError(400, f"{where}: a tool is an object with name, description and input_schema", param=where)
        kind = t.get("type") or "custom"
        if kind != "custom":
            raise APIError(400, f"{where}.type: {kind!r} is a server tool, which cairn does not run: declare a custom "
                                "tool (name, description, input_schema) and run it yourself", param=f"{where}.type")
        unknown = sorted(set(t) - TOOL_FIELDS)
        if unknown:
            raise APIError(400, f"{where}: unsupported tool field(s) {', '.join(unknown)} (cairn takes "
                                f"{', '.join(sorted(TOOL_FIELDS))})", param=where)
        if "input_schema" not in t:
            raise APIError(400, f"{where}.input_schema: Field required", param=f"{where}.input_schema")
        if t.get("strict") is not None and not isinstance(t["strict"], bool):
            raise APIError(400, f"{where}.strict: must be true or false", param=f"{where}.strict")
        tools.append(make_tool(t.get("name"), t.get("description"), t["input_schema"], where))
    tc = body.tool_choice or {"type": "auto"}
    modes = {"auto": "auto", "any": "required", "tool": "tool", "none": "none"}
    if not isinstance(tc.get("type"), str) or tc["type"] not in modes:
        raise APIError(400, f"tool_choice.type: must be one of auto, any, tool, none (got {tc.get('type')!r})",
                       param="tool_choice")
    unknown = sorted(set(tc) - {"type", "name", "disable_parallel_tool_use"})
    if unknown:
        raise APIError(400, f"tool_choice: unsupported field(s) {', '.join(unknown)}", param="tool_choice")
    if tc["type"] == "tool" and not isinstance(tc.get("name"), str):
        raise APIError(400, "tool_choice.name: required (the tool to call) when tool_choice.type is 'tool'",
                       param="tool_choice.name")
    if tc["type"] != "tool" and "name" in tc:
        raise APIError(400, "tool_choice.name: only for tool_choice.type 'tool'", param="tool_choice.name")
    parallel = tc.get("disable_parallel_tool_use")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError(400, "tool_choice.disable_parallel_tool_use: must be true or false", param="tool_choice")
    choice = Choice(modes[tc["type"]], tc.get("name"), not parallel)
    check_choice(tools, choice, "tool_choice")
    return tools, choice


def _turns(m: MessageParam, i: int, names: dict[str, str]) -> list[dict]:
    """One message as turns in the HF convention: the assistant's ``tool_use`` blocks become its ``tool_calls``, a
    user's ``tool_result`` blocks each a ``tool`` turn (before the user's own text)."""
    if isinstance(m.content, str):
        return [{"role": m.role, "content": m.content}]
    texts, calls, results = [], [], []
    for j, b in enumerate(m.content):
        where, extra = f"messages.{i}.content.{j}", b.model_extra or {}
        if b.type == "text":
            texts.append(_text([b], f"messages.{i}"))
        elif b.type == "tool_use" and m.role == "assistant":
            tid, name, args = extra.get("id"), extra.get("name"), extra.get("input")
            if not isinstance(tid, str) or not tid or not isinstance(name, str) or not isinstance(args, dict):
                raise APIError(400, f"{where}: a tool_use block needs id and name (strings) and input (an object)")
            names[tid] = name
            calls.append({"id": tid, "type": "function", "function": {"name": name, "arguments": args}})
        elif b.type == "tool_result" and m.role == "user":
            tid = extra.get("tool_use_id")
            if not isinstance(tid, str) or tid not in names:
                raise APIError(400, f"{where}.tool_use_id: {tid!r} answers no tool_use block of an earlier assistant "
                                    "turn")
            content = extra.get("content") or ""
            if isinstance(content, list):
                try:
                    content = _text([ContentBlock.model_validate(c) for c in content], f"{where}.content")
                except ValueError:
                    raise APIError(400, f"{where}.content: a string or a list of text blocks") from None
            elif not isinstance(content, str):
                raise APIError(400, f"{where}.content: a string or a list of text blocks")
            if extra.get("is_error") is True:
                content = f"Error: {content}"
            results.append({"role": "tool", "tool_call_id": tid, "name": names[tid], "content": content})
        else:
            kinds = "text and tool_use" if m.role == "assistant" else "text and tool_result"
            raise APIError(400, f"{where}: content blocks of type {b.type!r} are not supported in {m.role} turns "
                                f"(cairn serves a text-only model: use {kinds} blocks)")
    turns = list(results)
    if texts or calls or not results:
        turn = {"role": m.role, "content": "\n\n".join(t for t in texts if t)}
        turns.append({**turn, "tool_calls": calls} if calls else turn)
    return turns


def _usage(finish: FinishEvent, critic: Chain | None = None) -> dict:
    """The request's usage: with self-critique, every stage's tokens summed (``critic.usage()``)."""
    u = critic.usage() if critic is not None else finish.usage
    return {
        "input_tokens": u.prompt_tokens - u.cached_prompt_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
    }


def _sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def router(server: ServerState) -> APIRouter:
    """The routes; each request runs on the served model its `model` field names (`server.select`)."""
    r = APIRouter()

    @r.post("/v1/messages/count_tokens")
    async def count_tokens(body: CountTokensRequest) -> dict:
        state = server.select(body.model)
        ids, _ = await state.off_loop(prompt_ids, state, body, admit=True)
        return {"input_tokens": len(ids)}

    @r.post("/v1/messages", response_model=None)
    async def messages(body: MessagesRequest, request: Request) -> JSONResponse | SSEResponse:
        state = server.select(body.model)
        critique = state.critique(body.cairn)
        turns, prefill = conversation(body)
        tools, choice = request_tools(body)
        refuse_thinking(body.thinking)
        fmt = output_format(body.output_config, body.output_format)
        if fmt is not None:
            if critique is not None and body.cairn is not None:
                raise APIError(400, "output_config.format: structured output is not supported with self-critique "
                                    '(a revision is prose): send "cairn": {"self_critique": false}', param="cairn")
            critique = None  # the server's default (--self-critique) does not apply to structured output
            if prefill is not None:
                raise APIError(400, "messages: a final assistant turn (prefill) cannot be combined with "
                                    "output_config.format, whose JSON starts the reply: drop the prefill",
                               param="messages")
        if critique is not None and (tools or has_tool_turns(turns)):
            if body.cairn is not None:
                raise APIError(400, "tools: self-critique revises a text reply and cannot be combined with tool use: "
                                    'send "cairn": {"self_critique": false}', param="cairn")
            critique = None  # the server's default (--self-critique) does not apply to tool use
        ids = await state.off_loop(encode, state.tokenizer, turns, tools, prefill)
        turns, ids, memo = await memory.fit(state, body.cairn, turns, ids,
                                            lambda t: encode(state.tokenizer, t, tools, prefill), body.max_tokens,
                                            request)
        if critique is not None and prefill is not None:
            raise APIError(400, "messages: a final assistant turn (prefill) cannot be used with self-critique, whose "
                                'answer is a revision, not a continuation: drop it or send "cairn": '
                                '{"self_critique": false}', param="messages")
        if body.max_tokens == 0:  # nothing to generate
            msg = memory.annotate(_empty(state, ids), memo)
            return SSEResponse(_replay(msg)) if body.stream else JSONResponse(msg)
        try:
            params = SamplingParams(
                max_tokens=body.max_tokens,
                temperature=temperature(body.temperature),
                top_k=body.top_k or 0,
                top_p=1.0 if body.top_p is None else max(body.top_p, 1e-9),
                stop=list(body.stop_sequences or []),
                constraint=fmt,
            )
        except CairnError as e:
            raise APIError(400, str(e)) from None
        await compile_format(state, fmt, "output_config.format")
        constraint = call_constraint(tools, choice)
        if constraint is not None:
            if params.constraint is not None:
                raise APIError(400, "output_config.format cannot be combined with tools yet: leave out one of them",
                               param="tools")
            await compile_format(state, constraint, "tools")
            params = dataclasses.replace(params, constraint=constraint)
        parser = CallParser({t.name for t in tools}, "toolu_") if constraint is not None else None
        msg_id = "msg_" + secrets.token_hex(12)
        critic = None
        if critique is None:
            gen = state.generation([EngineRequest(ids, params, id=msg_id)])
        else:  # draft, critique(s) and revision(s) run here; the last revision is streamed or collected below
            critic = chain(state.tokenizer, critique, turns, params, ids)
            gen = await self_critique(state, critic, request, msg_id)
        if body.stream:
            return SSEResponse(memory.stream(_stream(state, gen, msg_id, len(gen.requests[0].prompt_ids), critic,
                                                     parser, direct.transport_of(request)), memo),
                               on_close=gen.close)
        [(text, _, _, finish)] = await gen.collect(request)  # a client that leaves: ClientGone, answered by the app
        if failed(finish, gen):
            raise APIError(500, "generation failed inside the engine; see the server log")
        if critic is not None:
            critic.record(text, finish, time.monotonic() - gen.start)
        return JSONResponse(memory.annotate(_message(state, msg_id, text, finish, critic, parser), memo))

    return r


def _empty(state: ServerState, ids: list[int]) -> dict:
    from cairn.engine.types import Usage

    return _message(state, "msg_" + secrets.token_hex(12), "",
                    FinishEvent("", "max_tokens", Usage(prompt_tokens=len(ids))))


async def _replay(msg: dict):
    """A finished message as the stream of events that would have produced it."""
    start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None}
    yield _sse("message_start", {"type": "message_start", "message": start})
    yield _sse("content_block_start",
               {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    if msg["content"][0]["text"]:
        yield _delta(msg["content"][0]["text"])
    yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    yield _sse("message_delta", {"type": "message_delta", "usage": msg["usage"],
                                 "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": msg["stop_sequence"]}})
    yield _sse("message_stop", {"type": "message_stop"})


def _message(state: ServerState, msg_id: str, text: str, finish: FinishEvent, critic: Chain | None = None,
             parser: CallParser | None = None) -> dict:
    extra = {"cairn": {"self_critique": critic.metadata()}} if critic is not None else {}
    content = [{"type": "text", "text": text}]
    if parser is not None:  # the same parser a stream runs: text and tool_use blocks in the order they came
        body, calls = parser.feed_all(text)
        content = ([{"type": "text", "text": body}] if body else []) + [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": c.input} for c in calls]
        content = content or [{"type": "text", "text": ""}]
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": state.model_name,
        "content": content,
        "stop_reason": _stop_reason(finish, parser),
        "stop_sequence": finish.stop_sequence,
        "usage": _usage(finish, critic),
        **extra,
    }


def _stop_reason(finish: FinishEvent, parser: CallParser | None) -> str:
    """``tool_use`` when the reply made calls and none was cut short; otherwise the engine's reason."""
    if parser is not None and parser.called(finish.reason):
        return "tool_use"
    return STOP_REASONS.get(finish.reason, "end_turn")


class _Blocks:
    """The content blocks of a streamed message as SSE frames. Without tools: one text block, opened at once.
    With tools (``parser``): text and ``tool_use`` blocks, each opened when the parser finds it; a tool_use block's
    ``input_json_delta`` pieces join to its ``input`` (the non-streamed message runs the same parser)."""

    def __init__(self, parser: CallParser | None):
        self.parser, self.n, self.open = parser, 0, None  # blocks so far; the kind of the open one

    def start(self) -> list[str]:
        return self._open("text", {"type": "text", "text": ""}) if self.parser is None else []

    def push(self, text: str) -> list[str]:
        if self.parser is None:
            return [_delta(text)] if text else []
        return [f for ev in self.parser.push(text) for f in self._event(ev)]

    def end(self) -> list[str]:
        frames = [f for ev in self.parser.finish() for f in self._event(ev)] if self.parser is not None else []
        if self.n == 0:  # nothing at all: one empty text block, as the non-streamed message has
            frames += self._open("text", {"type": "text", "text": ""})
        return frames + self._close()

    def _event(self, ev) -> list[str]:
        if isinstance(ev, Text):
            frames = [] if self.open == "text" else self._close() + self._open("text", {"type": "text", "text": ""})
            return frames + [_delta(ev.text, self.n - 1)]
        if isinstance(ev, CallStart):
            return self._close() + self._open("tool_use", {"type": "tool_use", "id": ev.id, "name": ev.name,
                                                           "input": {}})
        if isinstance(ev, CallArgs):
            return [_sse("content_block_delta", {"type": "content_block_delta", "index": self.n - 1,
                                                 "delta": {"type": "input_json_delta", "partial_json": ev.text}})]
        assert isinstance(ev, CallEnd)
        return self._close()

    def _open(self, kind: str, block: dict) -> list[str]:
        self.open, self.n = kind, self.n + 1
        return [_sse("content_block_start", {"type": "content_block_start", "index": self.n - 1,
                                             "content_block": block})]

    def _close(self) -> list[str]:
        if self.open is None:
            return []
        self.open = None
        return [_sse("content_block_stop", {"type": "content_block_stop", "index": self.n - 1})]


async def _stream(state: ServerState, gen: Generation, msg_id: str, n_prompt: int, critic: Chain | None = None,
                  parser: CallParser | None = None, transport=None):
    """The Messages stream of ``gen``. With self-critique (``critic``: draft and critiques done), ``gen`` is the last
    revision: usage counts every stage, and ``message_delta`` carries ``"cairn": {"self_critique": ...}``. With
    tools (``parser``), calls stream as ``tool_use`` blocks (``_Blocks``). With ``transport``
    (``direct.transport_of``), the engine thread writes token frames itself after the opening ones, whenever it can
    (``Generation.stream_directly``)."""
    try:
        # message_start waits for the first event: only once the prompt is prefilled does the engine know how much
        # of it came from the prefix cache, and input_tokens (as in the API) excludes those cache reads. Until
        # then SSE comments, which every client ignores, keep a long queue or prefill's connection alive.
        first = None
        while first is None:
            first = await gen.next(timeout=state.ping_interval)
            if first is None:
                yield ": waiting for the model\n\n"
        u = first[1].usage
        cached = u.cached_prompt_tokens if u is not None else 0
        before = critic.usage() if critic is not None else None  # the stages already done
        start = {"id": msg_id, "type": "message", "role": "assistant", "model": state.model_name, "content": [],
                 "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": n_prompt - cached + (before.prompt_tokens - before.cached_prompt_tokens
                                                                if before else 0),
                           "output_tokens": before.completion_tokens if before else 0,
                           "cache_read_input_tokens": cached + (before.cached_prompt_tokens if before else 0),
                           "cache_creation_input_tokens": 0}}
        text = []
        blocks = _Blocks(parser)
        yield _sse("message_start", {"type": "message_start", "message": start})
        for frame in blocks.start():
            yield frame
        yield _sse("ping", {"type": "ping"})

        def token_frames(_, ev: TokenEvent) -> str | None:  # the loop's, or the engine thread's when direct
            if not ev.text:
                return None
            text.append(ev.text)
            return "".join(blocks.push(ev.text)) or None

        gen.stream_directly(transport, token_frames)
        while True:
            item, first = (first, None) if first is not None else (await gen.next(timeout=state.ping_interval), None)
            if item is None:  # a long prefill or a long queue: keep the connection visibly alive
                yield _sse("ping", {"type": "ping"})
                continue
            _, ev = item
            if isinstance(ev, TokenEvent):
                frames = token_frames(_, ev)
                if frames is not None:
                    yield frames
                continue
            if failed(ev, gen):
                yield stream_error_anthropic(500, "generation failed inside the engine; see the server log")
                return
            if ev.text:
                text.append(ev.text)
                for frame in blocks.push(ev.text):
                    yield frame
            extra = {}
            if critic is not None:
                critic.record("".join(text), ev, time.monotonic() - gen.start)
                extra = {"cairn": {"self_critique": critic.metadata()}}
            for frame in blocks.end():
                yield frame
            yield _sse("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(ev, parser), "stop_sequence": ev.stop_sequence},
                "usage": _usage(ev, critic),
                **extra,
            })
            yield _sse("message_stop", {"type": "message_stop"})
            return
    except Exception as e:  # after the 200: report in-band
        log.exception("stream %s failed", msg_id)
        yield stream_error_anthropic(500, f"internal error: {type(e).__name__}")
    finally:
        gen.close()


def _delta(text: str, index: int = 0) -> str:
    frame = _deltas.get(index)
    if frame is None:
        frame = _deltas[index] = FrameTemplate(lambda t: _sse("content_block_delta", {
            "type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": t}}))
    return frame(text)


_deltas: dict[int, FrameTemplate] = {}  # a text delta's frame per content block index
