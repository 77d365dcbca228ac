"""The Anthropic Messages API (version 2023-06-01) over the engine: /v1/messages and /v1/messages/count_tokens."""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from cairn.engine.types import FinishEvent, SamplingParams, TokenEvent
from cairn.engine.types import Request as EngineRequest
from cairn.errors import CairnError
from cairn.serve.errors import APIError, stream_error_anthropic
from cairn.serve.prompts import encode_turns, merge_turns, temperature
from cairn.serve.runtime import Generation, ServerState, SSEResponse, failed, self_critique
from cairn.serve.schema import RequestModel
from cairn.serve.self_critique import Chain, chain

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


class CountTokensRequest(RequestModel):
    model: str
    messages: list[MessageParam]
    system: str | list[ContentBlock] | None = None
    tools: list[dict[str, Any]] | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=0)  # 0: nothing is generated (Anthropic's cache pre-warming)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None
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
    """(prompt token ids, prefill text or None) for a Messages request."""
    turns, prefill = conversation(body)
    return encode_turns(state.tokenizer, turns, prefill), prefill


def conversation(body: CountTokensRequest) -> tuple[list[dict], str | None]:
    """(the turns as role/content dicts, system first, and the prefill text or None) of a Messages request."""
    if body.tools:
        raise APIError(400, "tools: tool use is not supported by this server", param="tools")
    if not body.messages:
        raise APIError(400, "messages: at least one message is required", param="messages")
    turns = merge_turns([{"role": m.role, "content": _text(m.content, f"messages.{i}")}
                         for i, m in enumerate(body.messages)])
    system = None
    if body.system is not None:
        system = body.system if isinstance(body.system, str) else _text(body.system, "system")
    prefill = None
    if turns[-1]["role"] == "assistant":
        prefill = turns.pop()["content"]
        if prefill != prefill.rstrip():
            raise APIError(400, "messages: final assistant content cannot end with trailing whitespace")
    if system:
        turns.insert(0, {"role": "system", "content": system})
    return turns, prefill


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
        ids = await state.off_loop(encode_turns, state.tokenizer, turns, prefill)
        if critique is not None and prefill is not None:
            raise APIError(400, "messages: a final assistant turn (prefill) cannot be used with self-critique, whose "
                                'answer is a revision, not a continuation: drop it or send "cairn": '
                                '{"self_critique": false}', param="messages")
        if body.max_tokens == 0:  # nothing to generate
            msg = _empty(state, ids)
            return SSEResponse(_replay(msg)) if body.stream else JSONResponse(msg)
        try:
            params = SamplingParams(
                max_tokens=body.max_tokens,
                temperature=temperature(body.temperature),
                top_k=body.top_k or 0,
                top_p=1.0 if body.top_p is None else max(body.top_p, 1e-9),
                stop=list(body.stop_sequences or []),
            )
        except CairnError as e:
            raise APIError(400, str(e)) from None
        msg_id = "msg_" + secrets.token_hex(12)
        critic = None
        if critique is None:
            gen = state.generation([EngineRequest(ids, params, id=msg_id)])
        else:  # draft, critique(s) and revision(s) run here; the last revision is streamed or collected below
            critic = chain(state.tokenizer, critique, turns, params, ids)
            gen = await self_critique(state, critic, request, msg_id)
        if body.stream:
            return SSEResponse(_stream(state, gen, msg_id, len(gen.requests[0].prompt_ids), critic),
                               on_close=gen.close)
        [(text, _, _, finish)] = await gen.collect(request)  # a client that leaves: ClientGone, answered by the app
        if failed(finish, gen):
            raise APIError(500, "generation failed inside the engine; see the server log")
        if critic is not None:
            critic.record(text, finish, time.monotonic() - gen.start)
        return JSONResponse(_message(state, msg_id, text, finish, critic))

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


def _message(state: ServerState, msg_id: str, text: str, finish: FinishEvent, critic: Chain | None = None) -> dict:
    extra = {"cairn": {"self_critique": critic.metadata()}} if critic is not None else {}
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": state.model_name,
        "content": [{"type": "text", "text": text}],
        "stop_reason": STOP_REASONS.get(finish.reason, "end_turn"),
        "stop_sequence": finish.stop_sequence,
        "usage": _usage(finish, critic),
        **extra,
    }


async def _stream(state: ServerState, gen: Generation, msg_id: str, n_prompt: int, critic: Chain | None = None):
    """The Messages stream of ``gen``. With self-critique (``critic``: draft and critiques done), ``gen`` is the last
    revision: usage counts every stage, and ``message_delta`` carries ``"cairn": {"self_critique": ...}``."""
    try:
        before = critic.usage() if critic is not None else None  # the stages already done
        start = {"id": msg_id, "type": "message", "role": "assistant", "model": state.model_name, "content": [],
                 "stop_reason": None, "stop_sequence": None,
                 "usage": {"input_tokens": n_prompt + (before.prompt_tokens - before.cached_prompt_tokens
                                                       if before else 0),
                           "output_tokens": before.completion_tokens if before else 0,
                           "cache_read_input_tokens": before.cached_prompt_tokens if before else 0,
                           "cache_creation_input_tokens": 0}}
        text = []
        yield _sse("message_start", {"type": "message_start", "message": start})
        yield _sse("content_block_start",
                   {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
        yield _sse("ping", {"type": "ping"})
        while True:
            item = await gen.next(timeout=state.ping_interval)
            if item is None:  # a long prefill or a long queue: keep the connection visibly alive
                yield _sse("ping", {"type": "ping"})
                continue
            _, ev = item
            if isinstance(ev, TokenEvent):
                if ev.text:
                    text.append(ev.text)
                    yield _delta(ev.text)
                continue
            if failed(ev, gen):
                yield stream_error_anthropic(500, "generation failed inside the engine; see the server log")
                return
            if ev.text:
                text.append(ev.text)
                yield _delta(ev.text)
            extra = {}
            if critic is not None:
                critic.record("".join(text), ev, time.monotonic() - gen.start)
                extra = {"cairn": {"self_critique": critic.metadata()}}
            yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
            yield _sse("message_delta", {
                "type": "message_delta",
                "delta": {"stop_reason": STOP_REASONS.get(ev.reason, "end_turn"), "stop_sequence": ev.stop_sequence},
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


def _delta(text: str) -> str:
    return _sse("content_block_delta",
                {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
