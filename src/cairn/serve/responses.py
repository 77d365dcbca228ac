"""OpenAI's Responses API (``POST /v1/responses``) over the engine, stateless.

Text input (a string or message items) and output, ``instructions``, function tools (calls and their outputs as
input items), ``text.format`` (json_schema, json_object) through the engine's constraints, streaming with the API's
events. cairn keeps no responses: ``store`` true, ``previous_response_id``, ``conversation``, ``background`` and
the routes that read a stored response are refused with a 400 (404 for the routes) that says so; send the whole
conversation as ``input`` each time (``store: false``, as the Agents SDK does for stateless providers).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from cairn.engine.constraint import ConstraintSpec
from cairn.engine.types import FinishEvent, SamplingParams, TokenEvent
from cairn.engine.types import Request as EngineRequest
from cairn.errors import CairnError
from cairn.serve.errors import APIError
from cairn.serve.openai import function_choice, function_tools
from cairn.serve.prompts import temperature
from cairn.serve.runtime import Generation, ServerState, SSEResponse, failed
from cairn.serve.schema import RequestModel
from cairn.serve.structured import compile_format, text_format
from cairn.serve.tools import CallArgs, CallEnd, CallParser, CallStart, Choice, Text, Tool, call_constraint, encode

log = logging.getLogger("cairn.serve")

# fields this server takes; anything else is refused by name (an ignored field would be a silent lie)
KNOWN = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "store",
         "previous_response_id", "tools", "tool_choice", "parallel_tool_calls", "text", "metadata", "user",
         "safety_identifier", "prompt_cache_key", "truncation", "include", "reasoning", "background",
         "conversation", "max_tool_calls", "top_logprobs", "service_tier", "stream_options", "prompt"}
STATELESS = ("cairn keeps no responses (it is stateless): send store: false and the whole conversation as input, "
             "with earlier outputs (messages, function_call items) and function_call_output items")


class ResponsesRequest(RequestModel):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stream: bool = False
    store: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    truncation: str | None = None


def _refusals(body: ResponsesRequest) -> None:
    """A 400 for every field whose meaning cairn cannot honour, naming it."""
    extra = body.model_extra or {}
    unknown = sorted(set(extra) - KNOWN)
    if unknown:
        raise APIError(400, f"unsupported field(s): {', '.join(unknown)}", param=unknown[0])
    if body.store:
        raise APIError(400, f"store: true is not supported: {STATELESS}", param="store")
    for name in ("previous_response_id", "conversation", "prompt"):
        if extra.get(name) is not None:
            raise APIError(400, f"{name}: not supported: {STATELESS}", param=name)
    if extra.get("background"):
        raise APIError(400, f"background: true is not supported: {STATELESS}", param="background")
    reasoning = extra.get("reasoning")
    if reasoning is not None and (not isinstance(reasoning, dict) or reasoning.get("effort") not in (None, "none")):
        raise APIError(400, "reasoning: the served model does not reason before answering; leave reasoning out",
                       param="reasoning")
    if extra.get("include"):
        raise APIError(400, f"include: none of {extra['include']!r} can be included by this server (no reasoning, "
                            "no built-in tools, no logprobs here); leave include out", param="include")
    if extra.get("top_logprobs"):
        raise APIError(400, "top_logprobs: not supported on /v1/responses; use /v1/chat/completions with logprobs",
                       param="top_logprobs")
    if extra.get("max_tool_calls") is not None:
        raise APIError(400, "max_tool_calls: not supported; use parallel_tool_calls: false for at most one call",
                       param="max_tool_calls")
    if extra.get("service_tier") not in (None, "auto", "default"):
        raise APIError(400, "service_tier: this server has one tier; leave it out or send 'auto'",
                       param="service_tier")
    options = extra.get("stream_options")
    if options is not None and (not isinstance(options, dict) or options.get("include_obfuscation")):
        raise APIError(400, "stream_options.include_obfuscation: not supported; send false or leave it out",
                       param="stream_options")
    if body.truncation not in (None, "disabled"):
        raise APIError(400, "truncation: only 'disabled' is supported (a conversation longer than the context is a "
                            "400, never silently cut)", param="truncation")


def input_turns(body: ResponsesRequest) -> list[dict]:
    """``instructions`` and ``input`` as turns in the HF convention (function calls and their outputs included)."""
    turns: list[dict] = []
    if body.instructions:
        turns.append({"role": "system", "content": body.instructions})
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    if not items:
        raise APIError(400, "input: give at least one input item", param="input")
    names: dict[str, str] = {}  # call_id -> tool name
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise APIError(400, f"{where}.type: must be a string", param=f"{where}.type")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise APIError(400, f"{where}.role: must be user, assistant, system or developer (got {role!r})",
                               param=f"{where}.role")
            turns.append({"role": "system" if role == "developer" else role,
                          "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":
            cid, name, args = item.get("call_id"), item.get("name"), item.get("arguments")
            try:
                parsed = json.loads(args) if isinstance(args, str) else None
            except ValueError:
                parsed = None
            if not isinstance(cid, str) or not isinstance(name, str) or not isinstance(parsed, dict):
                raise APIError(400, f"{where}: a function_call item needs call_id, name and arguments (a JSON "
                                    "object as a string)", param=where)
            names[cid] = name
            call = {"id": cid, "type": "function", "function": {"name": name, "arguments": parsed}}
            if turns and turns[-1]["role"] == "assistant":  # the calls of one reply: one assistant turn
                turns[-1] = {**turns[-1], "tool_calls": turns[-1].get("tool_calls", []) + [call]}
            else:
                turns.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            cid = item.get("call_id")
            if not isinstance(cid, str) or cid not in names:
                raise APIError(400, f"{where}.call_id: {cid!r} answers no function_call item before it ({STATELESS})",
                               param=f"{where}.call_id")
            turns.append({"role": "tool", "tool_call_id": cid, "name": names[cid],
                          "content": _content_text(item.get("output"), f"{where}.output")})
        elif kind == "item_reference":
            raise APIError(400, f"{where}: item_reference items are not supported: {STATELESS}", param=where)
        else:
            raise APIError(400, f"{where}.type: {kind!r} items are not supported (cairn takes message, function_call "
                                "and function_call_output items)", param=f"{where}.type")
    return turns


def _content_text(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}.content: a string or a list of input_text parts", param=where)
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text") \
                or not isinstance(p.get("text"), str):
            kind = p.get("type") if isinstance(p, dict) else None
            raise APIError(400, f"{where}.content.{j}: only text parts (input_text, output_text) are supported "
                                f"(got {kind!r}: cairn serves a text-only model)", param=where)
        parts.append(p["text"])
    return "\n\n".join(x for x in parts if x)


def _format(body: ResponsesRequest) -> tuple[dict, ConstraintSpec | None]:
    """(``text`` as echoed in the response, the constraint its ``format`` asks for)."""
    text = dict(body.text or {})
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise APIError(400, f"text: unsupported field(s) {', '.join(unknown)}", param="text")
    if text.get("verbosity") not in (None, "medium"):
        raise APIError(400, "text.verbosity: only 'medium' is supported (the model has no verbosity control)",
                       param="text.verbosity")
    text["format"] = text.get("format") or {"type": "text"}
    return text, text_format(text["format"])


def _usage(finish: FinishEvent) -> dict:
    u = finish.usage
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.prompt_tokens + u.completion_tokens}


class _Output:
    """The response's output items, built from the generated text as it comes: one message item (its text), or
    with tools, messages and function_call items in the order the parser finds them. Each step returns the
    stream events it makes; the non-streamed response is the same builder fed the whole text."""

    def __init__(self, parser: CallParser | None):
        self.parser = parser
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written

    def push(self, text: str) -> list[dict]:
        if self.parser is None:
            return self._text(text) if text else []
        return [e for ev in self.parser.push(text) for e in self._event(ev)]

    def end(self, complete: bool) -> list[dict]:
        events = [e for ev in self.parser.finish() for e in self._event(ev)] if self.parser is not None else []
        if not self.items:  # nothing at all: one empty message, as a response always has
            events += self._open_message()
        return events + self._close("completed" if complete else "incomplete")

    def _event(self, ev) -> list[dict]:
        if isinstance(ev, Text):
            return self._text(ev.text)
        if isinstance(ev, CallStart):
            item = {"type": "function_call", "id": "fc_" + secrets.token_hex(16), "call_id": ev.id,
                    "name": ev.name, "arguments": "", "status": "in_progress"}
            return self._close("completed") + self._add(item)
        if isinstance(ev, CallArgs):
            self.open["arguments"] += ev.text
            return [{"type": "response.function_call_arguments.delta", "item_id": self.open["id"],
                     "output_index": len(self.items) - 1, "delta": ev.text}]
        assert isinstance(ev, CallEnd)
        return self._close("completed")

    def _text(self, text: str) -> list[dict]:
        events = [] if self.open is not None and self.open["type"] == "message" else \
            self._close("completed") + self._open_message()
        part = self.open["content"][0]
        part["text"] += text
        return events + [{"type": "response.output_text.delta", "item_id": self.open["id"],
                          "output_index": len(self.items) - 1, "content_index": 0, "delta": text, "logprobs": []}]

    def _open_message(self) -> list[dict]:
        item = {"type": "message", "id": "msg_" + secrets.token_hex(16), "status": "in_progress",
                "role": "assistant", "content": []}
        events = self._add(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["content"].append(part)
        return events + [{"type": "response.content_part.added", "item_id": item["id"],
                          "output_index": len(self.items) - 1, "content_index": 0, "part": dict(part)}]

    def _add(self, item: dict) -> list[dict]:
        self.items.append(item)
        self.open = item
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": json.loads(json.dumps(item))}]

    def _close(self, status: str) -> list[dict]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        at = {"item_id": item["id"], "output_index": len(self.items) - 1}
        events = []
        if item["type"] == "message":
            part = item["content"][0]
            events += [{"type": "response.output_text.done", **at, "content_index": 0, "text": part["text"],
                        "logprobs": []},
                       {"type": "response.content_part.done", **at, "content_index": 0, "part": dict(part)}]
        else:
            events.append({"type": "response.function_call_arguments.done", **at, "name": item["name"],
                           "arguments": item["arguments"]})
        return events + [{"type": "response.output_item.done", "output_index": at["output_index"],
                          "item": json.loads(json.dumps(item))}]


def router(server: ServerState) -> APIRouter:
    """The routes; each request runs on the served model its `model` field names (`server.select`)."""
    r = APIRouter()

    @r.post("/v1/responses", response_model=None)
    async def create(body: ResponsesRequest, request: Request) -> JSONResponse | SSEResponse:
        state = server.select(body.model)
        _refusals(body)
        tools = function_tools(body.tools, flat=True)
        choice = function_choice(tools, body.tool_choice, body.parallel_tool_calls, flat=True)
        text_field, fmt = _format(body)
        constraint = call_constraint(tools, choice)
        if constraint is not None and fmt is not None:
            raise APIError(400, "text.format cannot be combined with tools yet: leave out one of them (or send "
                                "tool_choice: none)", param="text.format")
        constraint = constraint or fmt
        turns = input_turns(body)
        ids = await state.off_loop(encode, state.tokenizer, turns, tools)
        if len(ids) >= state.max_context:
            raise APIError(400, f"the input has {len(ids)} tokens but the model's context is {state.max_context} "
                                "tokens: shorten the input", param="input")
        await compile_format(state, constraint, "text.format" if constraint is fmt else "tools")
        try:
            params = SamplingParams(
                max_tokens=body.max_output_tokens or max(1, state.max_context - len(ids)),
                temperature=temperature(body.temperature),
                top_p=1.0 if body.top_p is None else max(body.top_p, 1e-9),
                constraint=constraint,
            )
        except CairnError as e:
            raise APIError(400, str(e)) from None
        rid = "resp_" + secrets.token_hex(24)
        parser = CallParser({t.name for t in tools}) if constraint is not None and tools else None
        shell = _shell(state, body, rid, tools, choice, text_field)
        gen = state.generation([EngineRequest(ids, params, id=rid)])
        if body.stream:
            return SSEResponse(_stream(state, gen, shell, parser), on_close=gen.close)
        [(text, _, _, finish)] = await gen.collect(request)
        if failed(finish, gen):
            raise APIError(500, "generation failed inside the engine; see the server log")
        out = _Output(parser)
        out.push(text)
        out.end(_complete(finish, parser))
        return JSONResponse(_finished(shell, out, finish, parser))

    @r.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"], response_model=None,
                 include_in_schema=False)
    @r.api_route("/v1/responses/{response_id}/{action}", methods=["GET", "POST"], response_model=None,
                 include_in_schema=False)
    async def stored(response_id: str, action: str | None = None) -> JSONResponse:
        raise APIError(404, f"response {response_id!r} not found: {STATELESS}")

    return r


def _complete(finish: FinishEvent, parser: CallParser | None) -> bool:
    """Whether the reply ended by itself (not cut by max_output_tokens or the context) with no call cut short."""
    return finish.reason in ("eos", "stop_sequence") and not (parser is not None and parser.incomplete)


def _shell(state: ServerState, body: ResponsesRequest, rid: str, tools: list[Tool], choice: Choice,
           text_field: dict) -> dict:
    """The response object's fields before any output (echoing the request as the API does)."""
    if choice.mode == "tool":
        tool_choice: Any = {"type": "function", "name": choice.name}
    else:
        tool_choice = choice.mode
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "status": "in_progress",
        "background": False, "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": state.model_name, "output": [],
        "parallel_tool_calls": choice.parallel, "previous_response_id": None,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "top_p": 1.0 if body.top_p is None else body.top_p, "tool_choice": tool_choice,
        "tools": [{"type": "function", "name": t.name, "description": t.description or None,
                   "parameters": t.parameters, "strict": True} for t in tools],
        "text": text_field, "truncation": "disabled", "usage": None, "user": body.user,
        "safety_identifier": body.safety_identifier, "prompt_cache_key": body.prompt_cache_key,
        "metadata": body.metadata or {}, "store": False, "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
    }


def _finished(shell: dict, out: _Output, finish: FinishEvent, parser: CallParser | None) -> dict:
    complete = _complete(finish, parser)
    return {**shell, "status": "completed" if complete else "incomplete",
            "completed_at": int(time.time()) if complete else None,
            "incomplete_details": None if complete else {"reason": "max_output_tokens"},
            "output": out.items, "usage": _usage(finish)}


async def _stream(state: ServerState, gen: Generation, shell: dict, parser: CallParser | None):
    """The Responses event stream: created, in_progress, the output items' events, then completed (or
    incomplete); each SSE frame has an ``event:`` line and a ``sequence_number``."""
    seq = [0]

    def frame(data: dict) -> str:
        data = {**data, "sequence_number": seq[0]}
        seq[0] += 1
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    out = _Output(parser)
    try:
        yield frame({"type": "response.created", "response": shell})
        yield frame({"type": "response.in_progress", "response": shell})
        if parser is None:
            for ev in out._open_message():
                yield frame(ev)
        while True:
            _, ev = await gen.next()
            if isinstance(ev, TokenEvent):
                for e in out.push(ev.text):
                    yield frame(e)
                continue
            if failed(ev, gen):
                error = {"code": "server_error", "message": "generation failed inside the engine; see the server log"}
                yield frame({"type": "response.failed", "response": {**shell, "status": "failed", "error": error,
                                                                      "output": out.items}})
                return
            for e in out.push(ev.text) + out.end(_complete(ev, parser)):
                yield frame(e)
            done = _finished(shell, out, ev, parser)
            kind = "response.completed" if done["status"] == "completed" else "response.incomplete"
            yield frame({"type": kind, "response": done})
            return
    except Exception as e:  # after the 200: report in-band
        log.exception("stream %s failed", shell["id"])
        yield frame({"type": "error", "code": "server_error", "message": f"internal error: {type(e).__name__}",
                     "param": None})
    finally:
        gen.close()

