"""OpenAI's chat completions (/v1/chat/completions) and completions (/v1/completions) over the engine.

``/v1/completions`` with ``echo`` and ``logprobs`` is what lm-evaluation-harness's ``local-completions`` client
uses to score continuations: the log-probabilities (and the top alternatives) of every token, prompt included, come
from one scoring forward pass of the model over prompt + completion (``score``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import secrets
import threading
import time
from typing import Any, ClassVar, Literal

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from cairn.engine.types import FinishEvent, SamplingParams, TokenEvent
from cairn.engine.types import Request as EngineRequest
from cairn.errors import CairnError
from cairn.serve import direct, memory
from cairn.serve.errors import APIError, stream_error_openai
from cairn.serve.prompts import temperature
from cairn.serve.runtime import FrameTemplate, Generation, ServerState, SSEResponse, failed, self_critique
from cairn.serve.schema import ANY, RequestBody, RequestModel
from cairn.serve.self_critique import Chain, chain
from cairn.serve.structured import compile_format, response_format
from cairn.serve.tools import (
    CallArgs,
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

FINISH_REASONS = {"eos": "stop", "stop_sequence": "stop", "max_tokens": "length", "context_full": "length"}
SEED = Field(default=None, ge=-(2**63), lt=2**64)


class ContentPart(RequestModel):
    type: str
    text: str | None = None


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers


class StreamOptions(RequestModel):
    include_usage: bool = False


class _Common(RequestBody):
    # fields with no effect here, with the values that are no-ops: nothing is stored, there is one service tier,
    # every prompt prefix is cached anyway, no penalties or biases are applied (0 / {} ask for none)
    accepted: ClassVar[dict[str, tuple | None]] = {
        "store": (False,), "metadata": ANY, "service_tier": ("auto", "default"), "prompt_cache_key": ANY,
        "safety_identifier": ANY, "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},)}
    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = SEED
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: Any = None  # structured output (serve/structured.py); on /v1/completions as vLLM takes it
    cairn: Any = None  # cairn's own request options: {"self_critique": true | false | {...}}


class ChatCompletionRequest(_Common):
    accepted: ClassVar[dict[str, tuple | None]] = {
        **_Common.accepted, "modalities": (["text"],), "functions": ANY, "function_call": ANY}  # (the last two:
    # the deprecated function API, refused by the tools code with a message of its own)
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Common):
    accepted: ClassVar[dict[str, tuple | None]] = {**_Common.accepted, "best_of": (1,)}
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


def _params(body: _Common, max_tokens: int, logprobs: bool, i: int, fmt=None) -> SamplingParams:
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    seed = None if body.seed is None else (body.seed + i) % 2**64  # n choices, each its own seed
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature(body.temperature),
            top_p=1.0 if body.top_p is None else max(body.top_p, 1e-9),
            seed=seed,
            stop=stop,
            logprobs=logprobs,
            constraint=fmt,
        )
    except CairnError as e:
        raise APIError(400, str(e)) from None


def _max_tokens(state: ServerState, requested: int | None, n_prompt: int) -> int:
    return requested if requested is not None else max(1, state.max_context - n_prompt)


def _usage(finishes: list[FinishEvent], critic: Chain | None = None) -> dict:
    if critic is not None:  # self-critique: every stage's tokens (one choice)
        u = critic.usage()
        prompt, completion, cached = u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens
    else:
        prompt = sum(f.usage.prompt_tokens for f in finishes[:1])  # the n choices share one prompt
        completion = sum(f.usage.completion_tokens for f in finishes)
        cached = sum(f.usage.cached_prompt_tokens for f in finishes[:1])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _chunk(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------- scoring
_score_lock = threading.Lock()


def score(engine, ids: list[int], top: int) -> tuple[list[float | None], list[list[tuple[int, float]] | None]]:
    """Log-probability of each token given the ones before it, and the ``top`` likeliest tokens at each position.

    Position 0 has no context: ``None``. One forward pass of the model, outside the engine's scheduler.
    """
    from cairn.weights import full_weights

    model = getattr(engine, "model", None)
    if model is None:
        model = engine.loaded.model
    # the model's own forward pass needs fp32 weights: a transient copy of those the engine keeps as GGUF blocks
    with _score_lock, torch.inference_mode(), full_weights(getattr(engine, "loaded", None)):
        logits = model(torch.tensor([ids]))[0, :-1].float()
        chosen: list[float | None] = [None]
        tops: list[list[tuple[int, float]] | None] = [None]
        targets = torch.tensor(ids[1:])
        for s in range(0, logits.shape[0], 512):
            lp = torch.log_softmax(logits[s:s + 512], dim=-1)
            chosen += lp.gather(1, targets[s:s + 512, None])[:, 0].tolist()
            if top:
                v, i = lp.topk(top, dim=-1)
                tops += [list(zip(ii, vv, strict=True)) for ii, vv in zip(i.tolist(), v.tolist(), strict=True)]
            else:
                tops += [[] for _ in range(lp.shape[0])]
    return chosen, tops


def _piece(tokenizer, t: int) -> str:
    raw = tokenizer.token_bytes[t] if 0 <= t < len(tokenizer.token_bytes) else b""
    return raw.decode("utf-8", errors="replace") if raw else (tokenizer.tok.id_to_token(t) or "")


# ----------------------------------------------------------------------------------------------- router
def router(server: ServerState) -> APIRouter:
    """The routes; each request runs on the served model its `model` field names (`server.select`)."""
    r = APIRouter()

    @r.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatCompletionRequest, request: Request) -> JSONResponse | SSEResponse:
        state = server.select(body.model)
        critique = state.critique(body.cairn)
        if not body.messages:
            raise APIError(400, "messages: at least one message is required", param="messages")
        turns = chat_turns(body.messages)
        tools, choice = _chat_tools(body)
        fmt = response_format(body.response_format)
        if critique is not None and fmt is not None and body.cairn is None:
            critique = None  # the server's default (--self-critique) does not apply to structured output
        if critique is not None and (tools or has_tool_turns(turns)):
            if body.cairn is not None:
                raise APIError(400, "tools: self-critique revises a text reply and cannot be combined with tool use: "
                                    'send "cairn": {"self_critique": false}', param="cairn")
            critique = None  # the server's default (--self-critique) does not apply to tool use
        if critique is not None:
            _check_critique(body)
        constraint = call_constraint(tools, choice)
        if constraint is not None and body.logprobs:
            raise APIError(400, "logprobs: not supported with tools (a reply's tokens may be a call's, which has no "
                                "place in the logprobs); leave out logprobs or tools", param="logprobs")
        ids = await state.off_loop(encode, state.tokenizer, turns, tools)
        turns, ids, memo = await memory.fit(state, body.cairn, turns, ids, lambda t: encode(state.tokenizer, t, tools),
                                            body.max_completion_tokens or body.max_tokens, request)
        max_tokens = _max_tokens(state, body.max_completion_tokens or body.max_tokens or None, len(ids))
        reqs = [EngineRequest(ids, _params(body, max_tokens, body.logprobs, i, fmt)) for i in range(body.n)]
        await compile_format(state, fmt, "response_format")
        if constraint is not None:
            if any(r.params.constraint is not None for r in reqs):
                raise APIError(400, "response_format cannot be combined with tools yet: leave out one of them",
                               param="response_format")
            await compile_format(state, constraint, "tools")
            for r in reqs:
                r.params = dataclasses.replace(r.params, constraint=constraint)
        parsers = [CallParser({t.name for t in tools}) if constraint is not None else None for _ in reqs]
        cid = "chatcmpl-" + secrets.token_hex(12)
        critic = None
        if critique is None:
            gen = state.generation(reqs)
        else:  # draft, critique(s) and revision(s) run here; the last revision is streamed or collected below
            critic = chain(state.tokenizer, critique, turns, reqs[0].params, ids)
            gen = await self_critique(state, critic, request, cid)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return SSEResponse(memory.stream(_chat_stream(state, gen, cid, include_usage, body.logprobs, critic,
                                                          parsers, direct.transport_of(request)), memo),
                               on_close=gen.close)
        results = await gen.collect(request)  # a client that leaves: ClientGone, answered by the app
        choices = []
        for i, (text, tok_ids, _, finish) in enumerate(results):
            if failed(finish, gen):
                raise APIError(500, "generation failed inside the engine; see the server log")
            if critic is not None:
                critic.record(text, finish, time.monotonic() - gen.start)
            lp = None
            if body.logprobs:
                lp = {"content": await _chat_logprobs(state, ids, tok_ids, body.top_logprobs or 0)}
            message = {"role": "assistant", "content": text, "refusal": None}
            if parsers[i] is not None:  # the same parser a stream runs
                body_text, calls = parsers[i].feed_all(text)
                message["content"] = body_text or None if calls else body_text
                if calls:
                    message["tool_calls"] = [{"id": c.id, "type": "function",
                                              "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
            choices.append({"index": i, "message": message, "logprobs": lp,
                            "finish_reason": _finish_reason(finish, parsers[i])})
        extra = {"cairn": {"self_critique": critic.metadata()}} if critic is not None else {}
        return JSONResponse(memory.annotate({"id": cid, "object": "chat.completion", "created": int(time.time()),
                                             "model": state.model_name, "choices": choices, "system_fingerprint": None,
                                             "usage": _usage([f for *_, f in results], critic), **extra}, memo))

    @r.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | SSEResponse:
        state = server.select(body.model)
        state.critique(body.cairn, chat=False)  # refuses self-critique here; the server's default does not apply
        if body.suffix:
            raise APIError(400, "suffix: insertion (fill-in-the-middle) is not supported", param="suffix")
        prompts = await state.off_loop(_prompts, state, body.prompt)
        cid = "cmpl-" + secrets.token_hex(12)
        if body.max_tokens == 0:  # scoring only (echo + logprobs), nothing to generate
            return await _score_only(state, body, prompts, cid)
        fmt = response_format(body.response_format)
        await compile_format(state, fmt, "response_format")
        reqs = []
        for p in prompts:
            # null means the documented default (16), as an absent field does; not "to the end of the context"
            max_tokens = _max_tokens(state, 16 if body.max_tokens is None else body.max_tokens, len(p))
            for i in range(body.n):
                reqs.append(EngineRequest(p, _params(body, max_tokens, body.logprobs is not None, i, fmt)))
        gen = state.generation(reqs)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return SSEResponse(_completion_stream(state, gen, cid, body, include_usage, direct.transport_of(request)),
                               on_close=gen.close)
        results = await gen.collect(request)  # a client that leaves: ClientGone, answered by the app
        choices = []
        for k, (text, tok_ids, _, finish) in enumerate(results):
            if failed(finish, gen):
                raise APIError(500, "generation failed inside the engine; see the server log")
            prompt = reqs[k].prompt_ids
            if finish.reason == "eos" and body.logprobs is not None:
                tok_ids = tok_ids + [_eos_id(state)]  # as OpenAI lists <|endoftext|>: the token that ended the text
            choices.append(await _completion_choice(state, body, k, prompt, text, tok_ids,
                                                    FINISH_REASONS.get(finish.reason, "stop")))
        finishes = [f for *_, f in results]
        usage = {"prompt_tokens": sum(len(p) for p in prompts),
                 "completion_tokens": sum(f.usage.completion_tokens for f in finishes)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return JSONResponse({"id": cid, "object": "text_completion", "created": int(time.time()),
                             "model": state.model_name, "choices": choices, "usage": usage})

    return r


# ------------------------------------------------------------------------------------------------- tools
def chat_turns(messages: list[ChatMessage]) -> list[dict]:
    """Chat messages as turns in the HF convention: an assistant's ``tool_calls`` with their arguments parsed,
    ``tool`` turns naming the tool of the call they answer (``developer`` is a system turn)."""
    turns: list[dict] = []
    names: dict[str, str] = {}  # call id -> tool name
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if m.role == "function":
            raise APIError(400, f"{where}.role: 'function' messages (the deprecated function-calling API) are not "
                                "supported: answer tool_calls with 'tool' messages", param=f"{where}.role")
        turn = {"role": "system" if m.role == "developer" else m.role, "content": _chat_text(m.content, where)}
        if m.role == "tool":
            if m.tool_call_id not in names:
                raise APIError(400, f"{where}.tool_call_id: {m.tool_call_id!r} answers no tool call of an earlier "
                                    "assistant message", param=f"{where}.tool_call_id")
            turn.update(tool_call_id=m.tool_call_id, name=names[m.tool_call_id])
        elif m.tool_calls:
            if m.role != "assistant":
                raise APIError(400, f"{where}.tool_calls: only assistant messages make tool calls")
            calls = []
            for j, c in enumerate(m.tool_calls):
                cid, fn = c.get("id"), c.get("function")
                name, args = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else (None, None)
                if c.get("type", "function") != "function" or not isinstance(cid, str) or not isinstance(name, str):
                    raise APIError(400, f"{where}.tool_calls.{j}: a function call needs id, type 'function' and "
                                        "function.name")
                try:
                    parsed = json.loads(args) if isinstance(args, str) else args
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict):
                    raise APIError(400, f"{where}.tool_calls.{j}.function.arguments: must be a JSON object (as a "
                                        "string)")
                names[cid] = name
                calls.append({"id": cid, "type": "function", "function": {"name": name, "arguments": parsed}})
            turn["tool_calls"] = calls
        turns.append(turn)
    return turns


def function_tools(items: list[dict[str, Any]] | None, flat: bool = False) -> list[Tool]:
    """Function tools as ``Tool``s: ``{"type": "function", "function": {name, description, parameters, strict}}``
    (chat completions), or with those fields at the top (``flat``: the Responses API). Every call is held to its
    tool's schema by the grammar, so ``strict`` (true or false) is always honoured."""
    tools = []
    for i, t in enumerate(items or []):
        where = f"tools.{i}"
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise APIError(400, f"{where}.type: only 'function' tools are supported (got {kind!r}): cairn runs no "
                                "built-in or custom-grammar tools", param=f"{where}.type")
        fn = t if flat else t.get("function")
        if not isinstance(fn, dict):
            raise APIError(400, f"{where}.function: Field required", param=f"{where}.function")
        known = {"type", "name", "description", "parameters", "strict"} if flat else {
            "name", "description", "parameters", "strict"}
        unknown = sorted(set(fn) - known)
        if unknown:
            raise APIError(400, f"{where}: unsupported field(s) {', '.join(unknown)}", param=where)
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise APIError(400, f"{where}.strict: must be true or false", param=where)
        tools.append(make_tool(fn.get("name"), fn.get("description"), fn.get("parameters"), where))
    return tools


def function_choice(tools: list[Tool], tool_choice: str | dict | None, parallel: bool | None,
                    flat: bool = False) -> Choice:
    """``tool_choice`` (none, auto, required, or a named function) and ``parallel_tool_calls`` as a ``Choice``.
    Without tools the default is none, with tools auto (as OpenAI documents)."""
    if tool_choice is None:
        tool_choice = "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise APIError(400, f"tool_choice: must be 'none', 'auto', 'required' or a named function (got "
                                f"{tool_choice!r})", param="tool_choice")
        choice = Choice(tool_choice, None, parallel is not False)
    else:
        fn = tool_choice if flat else tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            form = '{"type": "function", "name": NAME}' if flat else '{"type": "function", "function": {"name": NAME}}'
            raise APIError(400, f"tool_choice: a named tool choice is {form} (allowed_tools and custom tools are "
                                "not supported)", param="tool_choice")
        choice = Choice("tool", name, parallel is not False)
    check_choice(tools, choice, "tool_choice")
    return choice


def _chat_tools(body: ChatCompletionRequest) -> tuple[list[Tool], Choice]:
    extra = body.model_extra or {}
    for old in ("functions", "function_call"):
        if extra.get(old) is not None:
            raise APIError(400, f"{old}: the deprecated function-calling API is not supported: use tools and "
                                "tool_choice", param=old)
    tools = function_tools(body.tools)
    return tools, function_choice(tools, body.tool_choice, body.parallel_tool_calls)


def _finish_reason(finish: FinishEvent, parser: CallParser | None) -> str:
    """``tool_calls`` when the reply made calls and none was cut short; otherwise the engine's reason."""
    if parser is not None and parser.called(finish.reason):
        return "tool_calls"
    return FINISH_REASONS.get(finish.reason, "stop")


def _tool_delta(events: list) -> dict:
    """A stream chunk's delta from the parser's events: the text as ``content``, calls as ``tool_calls`` entries
    (the first of a call with its id, type and name; then pieces of its arguments)."""
    delta: dict = {}
    text = "".join(e.text for e in events if isinstance(e, Text))
    if text:
        delta["content"] = text
    calls: list[dict] = []
    for e in events:
        if isinstance(e, CallStart):
            calls.append({"index": e.index, "id": e.id, "type": "function",
                          "function": {"name": e.name, "arguments": ""}})
        elif isinstance(e, CallArgs):
            if calls and calls[-1]["index"] == e.index:
                calls[-1]["function"]["arguments"] += e.text
            else:
                calls.append({"index": e.index, "function": {"arguments": e.text}})
    if calls:
        delta["tool_calls"] = calls
    return delta


def _check_critique(body: ChatCompletionRequest) -> None:
    """Self-critique makes one reply by revising a draft: what it cannot honour is refused, naming the fix."""
    off = 'or send "cairn": {"self_critique": false}'
    if body.n != 1:
        raise APIError(400, f"n: self-critique makes one reply per request; send n=1 {off}", param="n")
    if body.logprobs or body.top_logprobs:
        raise APIError(400, "logprobs: the tokens of a self-critiqued reply are a revision's, whose log-probabilities "
                            f"are not the reply's to your prompt; leave logprobs out {off}", param="logprobs")
    if response_format(body.response_format) is not None:
        raise APIError(400, "response_format: structured output is not supported with self-critique; leave it out "
                            f"{off}", param="response_format")


def _eos_id(state: ServerState) -> int:
    tok = state.tokenizer
    return tok.eos_id if tok.eos_id is not None else min(tok.eos_ids)


def _chat_text(content: str | list[ContentPart] | None, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for i, p in enumerate(content):
        if p.type != "text" or p.text is None:
            raise APIError(400, f"{where}.content.{i}: only text parts are supported (got type {p.type!r})")
        parts.append(p.text)
    return "\n\n".join(x for x in parts if x)


def _prompts(state: ServerState, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        items: list = [prompt]
    elif prompt and all(isinstance(x, int) for x in prompt):
        items = [prompt]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt: give at least one prompt", param="prompt")
    if len(items) > 64:
        raise APIError(400, f"prompt: at most 64 prompts per request, got {len(items)}", param="prompt")
    out = []
    for p in items:
        ids = state.tokenizer.encode(p) if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, "prompt: a prompt is empty", param="prompt")
        vocab = state.engine.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        if len(ids) >= state.max_context:
            raise APIError(400, f"the prompt has {len(ids)} tokens but the model's context is {state.max_context} "
                                "tokens: shorten the prompt", param="prompt")
        out.append(ids)
    return out


async def _logprob_block(state: ServerState, prompt: list[int], gen_ids: list[int], top: int, echo: bool) -> dict:
    ids = prompt + gen_ids
    if len(ids) < 2:
        chosen, tops = [None] * len(ids), [None] * len(ids)
    else:
        chosen, tops = await asyncio.to_thread(score, state.engine, ids, top)
    start = 0 if echo else len(prompt)
    tok = state.tokenizer
    pieces = [_piece(tok, t) for t in ids]
    offsets, pos = [], 0
    for p in pieces:
        offsets.append(pos)
        pos += len(p)
    top_dicts = [None if t is None else {_piece(tok, i): v for i, v in t} for t in tops]
    base = offsets[start] if start < len(offsets) else pos
    return {"tokens": pieces[start:], "token_logprobs": chosen[start:], "top_logprobs": top_dicts[start:],
            "text_offset": [o - base for o in offsets[start:]]}


async def _completion_choice(state, body: CompletionRequest, index: int, prompt: list[int], text: str,
                             gen_ids: list[int], finish_reason: str) -> dict:
    prefix = state.tokenizer.decode(prompt, skip_special=False) if body.echo else ""
    lp = None
    if body.logprobs is not None:
        lp = await _logprob_block(state, prompt, gen_ids, body.logprobs, body.echo)
    return {"index": index, "text": prefix + text, "logprobs": lp, "finish_reason": finish_reason}


async def _score_only(state: ServerState, body: CompletionRequest, prompts: list[list[int]], cid: str):
    state.admit(len(prompts))
    try:
        choices = []
        for k, p in enumerate(prompts):
            choice = await _completion_choice(state, body, k, p, "", [], "length")
            choices.append(choice)
    finally:
        state.release(len(prompts))
    n = sum(len(p) for p in prompts)
    usage = {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}
    data = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
            "choices": choices, "usage": usage}
    if not body.stream:
        return JSONResponse(data)

    async def frames():
        for c in choices:
            yield _chunk({**data, "choices": [c], "usage": None})
        if body.stream_options and body.stream_options.include_usage:
            yield _chunk({**data, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return SSEResponse(frames())


async def _chat_logprobs(state: ServerState, prompt: list[int], gen_ids: list[int], top: int) -> list[dict]:
    if not gen_ids:
        return []
    chosen, tops = await asyncio.to_thread(score, state.engine, prompt + gen_ids, top)
    out = []
    tok = state.tokenizer
    for k, t in enumerate(gen_ids):
        j = len(prompt) + k
        piece = _piece(tok, t)
        out.append({"token": piece, "logprob": chosen[j], "bytes": list(piece.encode()),
                    "top_logprobs": [{"token": _piece(tok, i), "logprob": v, "bytes": list(_piece(tok, i).encode())}
                                     for i, v in (tops[j] or [])]})
    return out


PLAIN = object()  # token_choice's answer for a token that is only its text: the stream's plain_choice(i, text)


async def _openai_stream(gen: Generation, cid: str, base: dict, include_usage: bool, opening: list[dict],
                         token_choice, finish_choice, usage, finish_extra=None, plain_choice=None, transport=None):
    """The SSE frames of a streamed chat completion or completion: ``opening`` choices, then per event the choice
    ``token_choice(i, ev)`` (None: nothing to send; ``PLAIN``: ``plain_choice(i, ev.text)``, whose frames come from
    a template filled with each token's text) or ``finish_choice(i, ev)`` (its chunk with the top-level fields
    ``finish_extra(i, ev)`` adds), then ``usage(finishes)`` when asked for, then ``[DONE]``; an engine failure ends
    the stream with an error frame. With ``transport`` (``direct.transport_of``), the engine thread writes the token
    frames itself whenever it can (``Generation.stream_directly``)."""
    extra = {"usage": None} if include_usage else {}
    finishes: list[FinishEvent] = []
    plain: dict[int, FrameTemplate] = {}  # per choice index

    def token_frame(i: int, ev: TokenEvent) -> str | None:  # the loop's, or the engine thread's when direct
        choice = token_choice(i, ev)
        if choice is PLAIN:
            frame = plain.get(i)
            if frame is None:
                frame = plain[i] = FrameTemplate(
                    lambda text: _chunk({**base, "choices": [plain_choice(i, text)], **extra}))
            return frame(ev.text)
        return None if choice is None else _chunk({**base, "choices": [choice], **extra})

    try:
        for choice in opening:
            yield _chunk({**base, "choices": [choice], **extra})
        gen.stream_directly(transport, token_frame)
        while not gen.done:
            i, ev = await gen.next()
            if isinstance(ev, TokenEvent):
                frame = token_frame(i, ev)
                if frame is not None:
                    yield frame
                continue
            if failed(ev, gen):
                yield stream_error_openai(500, "generation failed inside the engine; see the server log")
                yield "data: [DONE]\n\n"
                return
            finishes.append(ev)
            more = finish_extra(i, ev) if finish_extra is not None else {}
            yield _chunk({**base, "choices": [finish_choice(i, ev)], **extra, **more})
        if include_usage:
            yield _chunk({**base, "choices": [], "usage": usage(finishes)})
        yield "data: [DONE]\n\n"
    except Exception as e:
        log.exception("stream %s failed", cid)
        yield stream_error_openai(500, f"internal error: {type(e).__name__}")
    finally:
        gen.close()


def _chat_stream(state: ServerState, gen: Generation, cid: str, include_usage: bool, logprobs: bool,
                 critic: Chain | None = None, parsers: list[CallParser | None] | None = None, transport=None):
    """With self-critique (``critic``: draft and critiques done), ``gen`` is the last revision: the chunk with its
    finish_reason carries ``"cairn": {"self_critique": ...}`` and the usage chunk counts every stage."""
    base = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": state.model_name,
            "system_fingerprint": None}
    tok = state.tokenizer
    opening = [{"index": i, "delta": {"role": "assistant", "content": None if parsers and parsers[i] else ""},
                "logprobs": None, "finish_reason": None} for i in range(len(gen.requests))]

    def token_choice(i: int, ev: TokenEvent) -> dict | None:
        lp = None
        if logprobs and ev.logprobs:
            lp = {"content": [{"token": _piece(tok, t), "logprob": v, "bytes": list(_piece(tok, t).encode()),
                               "top_logprobs": []} for t, v in zip(ev.token_ids, ev.logprobs, strict=False)]}
        texts[i].append(ev.text)
        if parsers and parsers[i] is not None:  # with tools: text and calls as the parser finds them
            delta = _tool_delta(parsers[i].push(ev.text))
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": None} if delta else None
        if not (ev.text or lp):
            return None
        if lp is None:
            return PLAIN
        return {"index": i, "delta": {"content": ev.text}, "logprobs": lp, "finish_reason": None}

    def plain_choice(i: int, text: str) -> dict:
        return {"index": i, "delta": {"content": text}, "logprobs": None, "finish_reason": None}

    def finish_choice(i: int, ev: FinishEvent) -> dict:
        if parsers and parsers[i] is not None:
            p = parsers[i]
            return {"index": i, "delta": _tool_delta(p.push(ev.text) + p.finish()), "logprobs": None,
                    "finish_reason": _finish_reason(ev, p)}
        return {"index": i, "delta": {"content": ev.text} if ev.text else {}, "logprobs": None,
                "finish_reason": FINISH_REASONS.get(ev.reason, "stop")}

    def finish_extra(i: int, ev: FinishEvent) -> dict:
        if critic is None:
            return {}
        critic.record("".join(texts[i]) + ev.text, ev, time.monotonic() - gen.start)
        return {"cairn": {"self_critique": critic.metadata()}}

    texts: list[list[str]] = [[] for _ in gen.requests]
    return _openai_stream(gen, cid, base, include_usage, opening, token_choice, finish_choice,
                          lambda finishes: _usage(finishes, critic), finish_extra, plain_choice, transport)


def _completion_stream(state: ServerState, gen: Generation, cid: str, body: CompletionRequest, include_usage: bool,
                       transport=None):
    base = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": state.model_name}
    tok = state.tokenizer
    opening = [{"index": i, "text": tok.decode(r.prompt_ids, skip_special=False), "logprobs": None,
                "finish_reason": None} for i, r in enumerate(gen.requests)] if body.echo else []

    def token_choice(i: int, ev: TokenEvent) -> dict | None:
        lp = None
        if body.logprobs is not None and ev.logprobs:
            pieces = [_piece(tok, t) for t in ev.token_ids]
            lp = {"tokens": pieces, "token_logprobs": ev.logprobs,
                  "top_logprobs": [{p: v} for p, v in zip(pieces, ev.logprobs, strict=False)],
                  "text_offset": [0] * len(pieces)}
        if not (ev.text or lp):
            return None
        if lp is None:
            return PLAIN
        return {"index": i, "text": ev.text, "logprobs": lp, "finish_reason": None}

    def plain_choice(i: int, text: str) -> dict:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": None}

    def finish_choice(i: int, ev: FinishEvent) -> dict:
        return {"index": i, "text": ev.text, "logprobs": None, "finish_reason": FINISH_REASONS.get(ev.reason, "stop")}

    def usage(finishes: list[FinishEvent]) -> dict:  # a batch of prompts: every prompt counts
        p = sum(len(r.prompt_ids) for r in gen.requests)
        c = sum(f.usage.completion_tokens for f in finishes)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    return _openai_stream(gen, cid, base, include_usage, opening, token_choice, finish_choice, usage,
                          plain_choice=plain_choice, transport=transport)
