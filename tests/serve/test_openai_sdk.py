"""The official ``openai`` SDK against a real cairn server: chat completions and completions."""

from __future__ import annotations

import math

import openai
import pytest

from tests.serve.conftest import KEYS

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[1], max_retries=0)


@pytest.fixture(scope="module")
def reference(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0)
    assert len(r.choices[0].message.content) > 12
    return r


def test_chat(reference):
    c = reference.choices[0]
    assert reference.object == "chat.completion" and reference.model == MODEL
    assert c.message.role == "assistant" and c.finish_reason in ("stop", "length")
    assert reference.usage.completion_tokens > 0
    assert reference.usage.total_tokens == reference.usage.prompt_tokens + reference.usage.completion_tokens


def test_chat_stream_equals_create(client, reference):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert text == reference.choices[0].message.content
    assert finish == [reference.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])


def test_chat_stop_straddling_tokens(client, reference, engine):
    ref = reference.choices[0].message.content
    ids = engine.tokenizer.encode(ref)
    pieces = [engine.tokenizer.decode([i]) for i in ids]
    k = next(k for k in range(1, len(pieces) - 1) if len(pieces[k].strip()) >= 2 and len(pieces[k + 1].strip()) >= 2)
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    expected = ref[: ref.index(stop)]
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0, stop=stop)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=0,
                                            stop=["@@", stop], stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == expected


def test_chat_seed_is_reproducible(client):
    kw = dict(model=MODEL, messages=QUESTION, max_tokens=12, temperature=1.0, seed=1234)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_chat_length(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_completion_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 2


def test_completions_echo_logprobs(client, engine):
    """What lm-evaluation-harness's local-completions sends to score a continuation."""
    ids = engine.tokenizer.encode("The capital of France is Paris")
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None
    assert all(x <= 0 and math.isfinite(x) for x in lp.token_logprobs[1:])
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    # greedy: the generated token is the top-1 choice at the last position
    assert max(lp.top_logprobs[-1].values()) == pytest.approx(lp.token_logprobs[-1], abs=1e-5)
    assert c.text.startswith("The capital of France is Paris")
    # scoring only: max_tokens=0 returns the prompt's log-probabilities
    r0 = client.completions.create(model=MODEL, prompt="The capital of France is Paris", max_tokens=0, echo=True,
                                   logprobs=0)
    assert r0.choices[0].logprobs.token_logprobs == pytest.approx(lp.token_logprobs[: len(ids)], abs=1e-4)


def test_completions_plain_and_stream(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    streamed = "".join(ch.choices[0].text for ch in client.completions.create(**kw, stream=True) if ch.choices)
    assert streamed == r.choices[0].text


def test_models(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nonexistent")


def test_tiny_temperature_is_greedy(client, reference):
    """A temperature so small that logits / T overflow samples greedily instead of failing."""
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=40, temperature=1e-300)
    assert r.choices[0].message.content == reference.choices[0].message.content


def test_completions_batch_of_prompts(client, engine):
    """Several token-id prompts in one request (as lm-evaluation-harness batches them): one choice each, in order."""
    prompts = [engine.tokenizer.encode(t) for t in ("The sky is blue", "Paris is in France", "One two three")]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=1, temperature=0, logprobs=1, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for p, c in zip(prompts, r.choices, strict=True):
        assert len(c.logprobs.token_logprobs) == len(p) + 1
        alone = client.completions.create(model=MODEL, prompt=[p], max_tokens=1, temperature=0, logprobs=1, echo=True)
        assert c.logprobs.token_logprobs == pytest.approx(alone.choices[0].logprobs.token_logprobs, abs=1e-4)


def test_completions_logprobs_include_the_eos_token(client, engine, reference):
    """When the text ends at end-of-sequence, the logprobs end with that token, as OpenAI lists <|endoftext|>;
    lm-evaluation-harness drops the last token of echo+logprobs answers, assuming it is the generated one."""
    tok = engine.tokenizer
    ids = tok.encode_chat(QUESTION) + tok.encode(reference.choices[0].message.content)
    r = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, temperature=0, logprobs=1, echo=True)
    c = r.choices[0]
    assert c.finish_reason == "stop" and r.usage.completion_tokens == 0
    assert len(c.logprobs.tokens) == len(ids) + 1 and c.logprobs.tokens[-1] == tok.eos_token
    assert max(c.logprobs.top_logprobs[-1].values()) == pytest.approx(c.logprobs.token_logprobs[-1], abs=1e-5)


def test_streamed_usage_equals_created_usage(client):
    """With the prompt in the prefix cache for both, the usage chunk of a stream is the non-streamed usage, cached
    tokens included (chat), and the same holds for completions."""
    messages = [{"role": "user", "content": "Name three colours of the rainbow, comma-separated, no more."}]
    kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    client.chat.completions.create(**kw)  # puts the prompt's prefix in the cache
    created = client.chat.completions.create(**kw).usage
    assert created.prompt_tokens_details.cached_tokens > 0
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert [ch.usage for ch in chunks if ch.usage is not None] == [created]
    kw = dict(model=MODEL, prompt="The colours of the rainbow are", max_tokens=12, temperature=0)
    created = client.completions.create(**kw).usage
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert [ch.usage for ch in chunks if ch.usage is not None] == [created]
