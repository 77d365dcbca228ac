"""Chat turns to prompt token ids, through the model's own chat template (``Tokenizer.apply_chat_template``)."""

from __future__ import annotations

from cairn.errors import CairnError
from cairn.serve.errors import APIError


def encode_turns(tokenizer, turns: list[dict], prefill: str | None = None, tools: list[dict] | None = None
                 ) -> list[int]:
    """Token ids for ``turns`` (role/content dicts) plus the generation prompt.

    With ``prefill`` (the text of a final assistant turn), the reply continues that text: the template renders the
    earlier turns with the generation prompt and the prefill is appended verbatim, so the model picks up mid-turn.
    ``tools``: the template's ``tools`` argument (HF function-tool dicts), for templates that render tools
    (``cairn.serve.tools`` decides).
    """
    try:
        if prefill is None and tools is None:
            return tokenizer.encode_chat(turns, add_generation_prompt=True)
        extra = {"tools": tools} if tools is not None else {}
        text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, **extra) + (prefill or "")
    except CairnError as e:
        raise APIError(400, str(e)) from None
    except Exception as e:  # a template's own raise/type errors on odd input are the request's fault
        raise APIError(400, f"the chat template cannot render these messages: {e}") from None
    ids = tokenizer.encode(text, add_bos=False)
    if tokenizer.add_bos and tokenizer.bos_token and not text.startswith(tokenizer.bos_token):
        ids = [tokenizer.bos_id] + ids
    return ids


def temperature(value: float | None, default: float = 1.0) -> float:
    """The sampling temperature: the API's default when absent (the engine treats a vanishing one as greedy)."""
    return default if value is None else float(value)


def merge_turns(turns: list[dict]) -> list[dict]:
    """Consecutive turns of the same role become one (their texts joined by a blank line), as Anthropic does."""
    out: list[dict] = []
    for t in turns:
        if out and out[-1]["role"] == t["role"] != "tool":  # (each tool turn is one call's result)
            merged = {"role": t["role"], "content": _join(out[-1]["content"], t["content"])}
            calls = out[-1].get("tool_calls", []) + t.get("tool_calls", [])
            out[-1] = {**merged, "tool_calls": calls} if calls else merged
        else:
            out.append(dict(t))
    return out


def _join(a: str, b: str) -> str:
    return a + "\n\n" + b if a and b else a or b
