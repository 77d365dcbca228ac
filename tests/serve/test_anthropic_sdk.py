"""The official ``anthropic`` SDK against a real cairn server."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.serve.conftest import KEYS

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is 2+2? Answer in one sentence."}]
# SDK 2.x has no temperature argument any more; the API still takes it, so it goes in the body.
GREEDY = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEYS[0], max_retries=0)


@pytest.fixture(scope="module")
def reference(client):
    """The greedy reply to QUESTION, with no stop sequences."""
    msg = client.messages.create(model=MODEL, max_tokens=40, **GREEDY, messages=QUESTION)
    text = msg.content[0].text
    assert len(text) > 12
    return msg


def _text(msg) -> str:
    return "".join(b.text for b in msg.content if b.type == "text")


def test_create(reference):
    assert reference.type == "message" and reference.role == "assistant" and reference.model == MODEL
    assert reference.id.startswith("msg_")
    assert reference.stop_reason in ("end_turn", "max_tokens")
    assert reference.stop_sequence is None
    assert reference.usage.output_tokens > 0
    assert reference.usage.input_tokens + (reference.usage.cache_read_input_tokens or 0) > 10


def test_stream_equals_create(client, reference):
    with client.messages.stream(model=MODEL, max_tokens=40, **GREEDY, messages=QUESTION) as stream:
        deltas = [t for t in stream.text_stream]
        final = stream.get_final_message()
    assert len(deltas) > 1
    assert "".join(deltas) == _text(final) == _text(reference)
    assert final.stop_reason == reference.stop_reason and final.stop_sequence == reference.stop_sequence
    assert final.usage.output_tokens == reference.usage.output_tokens
    total = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
    assert total == reference.usage.input_tokens + (reference.usage.cache_read_input_tokens or 0)


def test_stream_event_sequence(server):
    """Every frame has an event: line, in the API's order."""
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "stream": True, "messages": QUESTION}
    with httpx.stream("POST", server.url + "/v1/messages?beta=true", json=body, headers={"x-api-key": KEYS[1]},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["request-id"].startswith("req_")
        raw = r.read().decode()
    frames = [f for f in raw.split("\n\n") if f.strip()]
    events = []
    for f in frames:
        lines = f.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), f
        events.append(lines[0][len("event: "):])
    core = [e for e in events if e != "ping"]
    assert core[:2] == ["message_start", "content_block_start"]
    assert core[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(core[2:-3]) == {"content_block_delta"}


def _straddling_stop(text: str, tokenizer) -> str:
    """A stop string made of the end of one token and the start of the next, in the middle of ``text``."""
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    for k in range(1, len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        if len(a.strip()) >= 2 and len(b.strip()) >= 2:
            return a[-2:] + b[:2]
    raise AssertionError(f"no two adjacent word tokens in {pieces}")


def test_stop_sequence_straddling_tokens(client, reference, engine):
    ref = _text(reference)
    stop = _straddling_stop(ref, engine.tokenizer)
    expected = ref[: ref.index(stop)]
    kw = dict(model=MODEL, max_tokens=40, **GREEDY, messages=QUESTION, stop_sequences=["@@never@@", stop])
    msg = client.messages.create(**kw)
    assert _text(msg) == expected
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == stop
    with client.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == _text(final) == expected
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_held_back_text_is_released(client, reference):
    """A stop string whose start matches the end of the reply is held back, then released, not lost."""
    ref = _text(reference)
    stop = ref[-3:] + "\u2603\u2603"
    kw = dict(model=MODEL, max_tokens=40, **GREEDY, messages=QUESTION, stop_sequences=[stop])
    assert _text(client.messages.create(**kw)) == ref
    with client.messages.stream(**kw) as stream:
        assert "".join(stream.text_stream) == ref
        assert stream.get_final_message().stop_reason == reference.stop_reason


def test_max_tokens_reason(client):
    msg = client.messages.create(model=MODEL, max_tokens=3, **GREEDY, messages=QUESTION)
    assert msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 3


def test_prefill_continues_the_reply(client, reference):
    ref = _text(reference)
    head = ref.split(" ")[0] + " " + ref.split(" ")[1]
    msg = client.messages.create(model=MODEL, max_tokens=40, **GREEDY,
                                 messages=QUESTION + [{"role": "assistant", "content": head}])
    assert head + _text(msg) == ref


def test_system_blocks_and_merged_turns(client):
    kw = dict(model=MODEL, max_tokens=5, **GREEDY)
    a = client.messages.create(**kw, system=[{"type": "text", "text": "You are terse."}],
                               messages=[{"role": "user", "content": [{"type": "text", "text": "Hi."}]},
                                         {"role": "user", "content": "Who are you?"}])
    b = client.messages.create(**kw, system="You are terse.",
                               messages=[{"role": "user", "content": "Hi.\n\nWho are you?"}])
    assert _text(a) == _text(b)
    n = client.messages.count_tokens(model=MODEL, system="You are terse.",
                                     messages=[{"role": "user", "content": "Hi.\n\nWho are you?"}])
    assert n.input_tokens == b.usage.input_tokens + (b.usage.cache_read_input_tokens or 0)


def test_count_tokens(client, reference):
    n = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    assert n.input_tokens == reference.usage.input_tokens + (reference.usage.cache_read_input_tokens or 0)


def test_models(client):
    page = client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    m = client.models.retrieve(MODEL)
    assert m.id == MODEL and m.type == "model" and m.display_name == MODEL
    with pytest.raises(anthropic.NotFoundError) as e:
        client.models.retrieve("claude-nonexistent")
    assert e.value.body["error"]["type"] == "not_found_error"


def test_max_tokens_zero(client):
    """max_tokens=0 generates nothing (the API's cache pre-warming), streamed or not."""
    msg = client.messages.create(model=MODEL, max_tokens=0, messages=QUESTION)
    assert _text(msg) == "" and msg.stop_reason == "max_tokens" and msg.usage.output_tokens == 0
    with client.messages.stream(model=MODEL, max_tokens=0, messages=QUESTION) as stream:
        final = stream.get_final_message()
    assert _text(final) == "" and final.stop_reason == "max_tokens" and final.usage == msg.usage


def test_streamed_usage_equals_created_usage_at_every_event(client):
    """With the prompt in the prefix cache for both, message_start's input and cache-read counts and message_delta's
    whole usage equal the non-streamed message's (input_tokens excludes cache reads, as in the API)."""
    messages = [{"role": "user", "content": "Name three colours of the rainbow, comma-separated, no more."}]
    kw = dict(model=MODEL, max_tokens=12, **GREEDY, messages=messages)
    client.messages.create(**kw)  # puts the prompt's prefix in the cache
    created = client.messages.create(**kw).usage
    assert created.cache_read_input_tokens > 0 and created.input_tokens > 0
    events = list(client.messages.create(**kw, stream=True))
    [start] = [e for e in events if e.type == "message_start"]
    [delta] = [e for e in events if e.type == "message_delta"]
    for field in ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"):
        assert getattr(start.message.usage, field) == getattr(created, field), field
        assert getattr(delta.usage, field) == getattr(created, field), field
    assert delta.usage.output_tokens == created.output_tokens
