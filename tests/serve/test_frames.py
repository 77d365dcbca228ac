"""A streamed token's frame from a template is the frame rendered whole (the per-token fast path of both APIs)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cairn.serve.anthropic import _delta, _sse
from cairn.serve.openai import _chunk
from cairn.serve.runtime import FrameTemplate

BASE = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "system_fingerprint": None}


def openai(text: str) -> str:
    return _chunk({**BASE, "choices": [{"index": 2, "delta": {"content": text}, "logprobs": None,
                                        "finish_reason": None}], "usage": None})


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_a_template_renders_what_the_whole_frame_renders(text):
    assert FrameTemplate(openai)(text) == openai(text)
    assert _delta(text, 3) == _sse("content_block_delta", {"type": "content_block_delta", "index": 3,
                                                          "delta": {"type": "text_delta", "text": text}})


@pytest.mark.parametrize("text", ["", "a\"b\\c", "line\nbreak\t", "\x00\x1f\x7f", "é中😀", "\ud800", "\u2028"])
def test_hard_strings(text):
    frame = FrameTemplate(openai)(text)
    assert frame == openai(text)
    assert json.loads(frame[6:])["choices"][0]["delta"]["content"] == text


def test_a_frame_without_exactly_one_slot_is_refused():
    with pytest.raises(ValueError):
        FrameTemplate(lambda t: "data: {}\n\n")
    with pytest.raises(ValueError):
        FrameTemplate(lambda t: json.dumps([t, t]))
