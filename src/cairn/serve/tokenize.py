"""The tokenizer endpoints vLLM serves (``GET /tokenizer_info``, ``POST /tokenize``, ``POST /detokenize``), with the
served model's own tokenizer.

lm-evaluation-harness's API models (``local-completions``, ``local-chat-completions``) look for them first and, when
they answer, tokenize through the server ("remote" tokenizer backend): a client then scores the served model with no
tokenizer files of its own, and with exactly the token ids the server itself uses. Like every route that runs the
model's code they need an API key when the server has keys.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from cairn.errors import CairnError
from cairn.serve.errors import APIError
from cairn.serve.runtime import ServerState

PATHS = ("/tokenizer_info", "/tokenize", "/detokenize")


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    prompt: str | None = None
    messages: list[_Message] | None = None
    add_special_tokens: bool = True  # vLLM's default: the tokenizer's BOS when it adds one
    add_generation_prompt: bool = True  # with messages: end with the assistant's header, as a chat request does


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)


def router(server: ServerState) -> APIRouter:
    r = APIRouter()

    def tokenizer(state):
        if state.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: send token ids to /v1/completions instead")
        return state.tokenizer

    @r.get("/tokenizer_info")
    async def info(model: str | None = None) -> dict:
        state = server.select(model)
        tok = tokenizer(state)
        return {"tokenizer_class": type(tok.tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
                "pad_token": None, "add_bos_token": tok.add_bos, "chat_template": tok.chat_template,
                "model_max_length": state.max_context, "vocab_size": tok.vocab_size}

    @r.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        state = server.select(body.model)
        tok = tokenizer(state)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give either prompt (text) or messages (a chat), not both or neither")
        try:
            if body.prompt is not None:
                add_bos = None if body.add_special_tokens else False  # None: as the tokenizer does
                ids = await state.off_loop(lambda: tok.encode(body.prompt, add_bos=add_bos))
            else:
                turns = [m.model_dump() for m in body.messages]
                text = await state.off_loop(lambda: tok.apply_chat_template(
                    turns, add_generation_prompt=body.add_generation_prompt))
                ids = await state.off_loop(lambda: tok.encode(text, add_bos=False))
        except CairnError as e:
            raise APIError(400, str(e)) from None
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_context}

    @r.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        state = server.select(body.model)
        tok = tokenizer(state)
        vocab = state.engine.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"tokens: ids must be in [0, {vocab}), got {bad[:5]}", param="tokens")
        return {"prompt": tok.decode(body.tokens, skip_special=False)}

    return r
