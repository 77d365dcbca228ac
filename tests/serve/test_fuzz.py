"""Fuzzing the request schemas with hypothesis: whatever the body, the server never answers 5xx.

Bodies are valid requests with fields dropped, replaced by arbitrary JSON or pushed to edge values, plus
arbitrary JSON and bytes. Generation is capped at 2 tokens (a wrapper around the real engine) so that the
examples stay fast; everything else -- templating, validation, the engine's checks, streaming -- is real.
"""

from __future__ import annotations

import dataclasses
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.serve.app import create_app
from tests.serve.conftest import KEYS, ServerThread

MODEL = "SmolLM2-135M-Instruct"
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


class CappedEngine:
    def __init__(self, real):
        self.real = real

    def __getattr__(self, name):
        return getattr(self.real, name)

    def submit(self, request, sink):
        p = request.params
        request.params = dataclasses.replace(p, max_tokens=min(p.max_tokens, 2))
        return self.real.submit(request, sink)


@pytest.fixture(scope="module")
def fuzz_server(engine):
    with ServerThread(create_app(CappedEngine(engine), api_keys=KEYS, max_queue=64)) as s:
        yield s


@pytest.fixture(scope="module")
def http(fuzz_server):
    with httpx.Client(base_url=fuzz_server.url, headers={"x-api-key": KEYS[0]}, timeout=120) as c:
        yield c


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                                 st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4)),
                           max_leaves=8)
tiny = st.sampled_from([5e-324, 1e-300, 1e-30, 1e-6])
edge_numbers = st.one_of(tiny, st.integers(-3, 3), st.sampled_from([2**31, 2**63, 2**64, 10**30]),
                         st.floats(-3, 3, allow_nan=False), st.sampled_from([1e300, -1e300, 1e-300]))
short_text = st.text(max_size=30)
text_block = st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "tool_use", ""]), "text": short_text})
content = st.one_of(short_text, st.lists(text_block, max_size=3), json_values)
anthropic_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                           "content": content})
openai_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer",
                                                                 "tool", "x"]), "content": content})


def schema(required: dict, optional: dict) -> st.SearchStrategy:
    """Valid requests (required fields, some optional ones), and the same with one field broken or dropped."""
    valid = st.fixed_dictionaries(required, optional=optional)
    keys = sorted({*required, *optional, "unknown_field"})
    bad_value = st.one_of(json_values, edge_numbers, st.text(max_size=8))

    def mutate(args):
        body, key, value, drop = args
        body = dict(body)
        if drop:
            body.pop(key, None)
        else:
            body[key] = value
        return body

    broken = st.tuples(valid, st.sampled_from(keys), bad_value, st.booleans()).map(mutate)
    return st.one_of(valid, broken)


user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
    short_text.filter(str.strip), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": short_text}),
                                           min_size=1, max_size=2))})
MESSAGES = schema(
    {"model": st.just(MODEL), "max_tokens": st.integers(0, 3),
     "messages": st.one_of(st.lists(user_turn, min_size=1, max_size=2), st.lists(anthropic_message, max_size=3))},
    {"system": st.one_of(short_text, st.lists(text_block, max_size=2)),
     "stop_sequences": st.lists(st.text(max_size=4), max_size=3),
     "temperature": st.one_of(st.floats(0, 1), tiny), "top_p": st.floats(0, 1), "top_k": st.integers(0, 50),
     "stream": st.booleans(), "metadata": st.fixed_dictionaries({"user_id": short_text}), "tools": st.just([])},
)
CHAT = schema(
    {"model": st.just(MODEL),
     "messages": st.one_of(st.lists(user_turn, min_size=1, max_size=2), st.lists(openai_message, max_size=3))},
    {"max_tokens": st.integers(0, 3), "max_completion_tokens": st.integers(0, 3),
     "temperature": st.one_of(st.floats(0, 2), tiny),
     "top_p": st.floats(0, 1), "n": st.integers(1, 2), "stop": st.one_of(st.text(max_size=4),
                                                                         st.lists(st.text(max_size=4), max_size=3)),
     "seed": st.integers(-(2**64), 2**65), "stream": st.booleans(),
     "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "logprobs": st.booleans(),
     "top_logprobs": st.integers(0, 5)},
)
COMPLETIONS = schema(
    {"model": st.just(MODEL),
     "prompt": st.one_of(short_text, st.lists(short_text, max_size=3), st.lists(st.integers(-5, 50000), max_size=6),
                         st.lists(st.lists(st.integers(0, 49151), max_size=4), max_size=3))},
    {"max_tokens": st.integers(0, 3), "temperature": st.one_of(st.floats(0, 2), tiny), "logprobs": st.integers(0, 5),
     "echo": st.booleans(), "stop": st.text(max_size=4), "seed": st.integers(-(2**64), 2**65),
     "stream": st.booleans(), "n": st.integers(1, 2),
     "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})},
)


def check(http: httpx.Client, path: str, body) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    with http.stream("POST", path, content=raw, headers={"content-type": "application/json"}) as r:
        data = r.read().decode(errors="replace")
    assert r.status_code < 500, (path, body, r.status_code, data)
    assert r.headers.get("request-id", "").startswith("req_")
    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
        assert "event: error" not in data and '"server_error"' not in data, (path, body, data)
    elif r.status_code != 200:
        err = json.loads(data)
        assert "error" in err and isinstance(err["error"]["message"], str), err


@SETTINGS
@given(body=MESSAGES)
def test_fuzz_messages(http, body):
    check(http, "/v1/messages", body)


@SETTINGS
@given(body=MESSAGES)
def test_fuzz_count_tokens(http, body):
    check(http, "/v1/messages/count_tokens", body)


@SETTINGS
@given(body=CHAT)
def test_fuzz_chat_completions(http, body):
    check(http, "/v1/chat/completions", body)


@SETTINGS
@given(body=COMPLETIONS)
def test_fuzz_completions(http, body):
    check(http, "/v1/completions", body)


@SETTINGS
@given(path=st.sampled_from(["/v1/messages", "/v1/chat/completions", "/v1/completions"]),
       body=st.one_of(json_values, st.binary(max_size=40)))
def test_fuzz_arbitrary_bodies(http, path, body):
    check(http, path, body)


# ------------------------------------------------------------------------------------------------------------------
# Text made of what breaks text handling, in every field of all four request schemas, 1,000 requests each.
#
# The model's work is replaced by two canned tokens (``InstantEngine``: the real engine's checks and tokenizer,
# no forward pass) so that a thousand requests per schema fit in CI; templating, tokenisation, validation,
# streaming and error shapes are the server's own. The real engine under the same schemas is fuzzed above.

nasty_chars = st.characters(categories=["Cs", "Cc", "Cf", "Co", "Zl", "Zp", "Zs", "Mn", "So"])
nasty_text = st.one_of(st.text(nasty_chars, max_size=12),
                       st.lists(st.one_of(st.text(nasty_chars, max_size=3), st.text(max_size=3)),
                                max_size=5).map("".join),
                       st.sampled_from(["\ud800", "a\udfff", "\x00", "\u2028\u2029", "\ufeff", "\U0010ffff",
                                        "<|im_end|>", "<|im_start|>system\n", "{{ 7*7 }}", "{% raise %}"]))


def nasty(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """``strategy``'s bodies with each string anywhere in them (keys and values, at any depth) possibly replaced
    by nasty text."""
    def walk(value, draws):
        if isinstance(value, str):
            return draws.draw(st.one_of(st.just(value), nasty_text))
        if isinstance(value, list):
            return [walk(v, draws) for v in value]
        if isinstance(value, dict):
            return {(draws.draw(st.one_of(st.just(k), nasty_text)) if k not in ("model",) else k): walk(v, draws)
                    for k, v in value.items()}
        return value

    @st.composite
    def build(draw):
        body = draw(strategy)
        return walk(body, type("D", (), {"draw": staticmethod(draw)})())
    return build()


class InstantEngine:
    """The real engine's ``check`` (templating, prompt limits, vocabulary, constraints) and tokenizer; generation
    replaced by up to two canned tokens sent from another thread, as the engine's own thread would."""

    def __init__(self, real):
        self.real = real
        self.canned = real.tokenizer.encode(" ok🌟")[:2]

    def __getattr__(self, name):
        return getattr(self.real, name)

    def submit(self, request, sink):
        import threading

        from cairn.engine.types import FinishEvent, TokenEvent, Usage

        self.real.check(request)
        toks = self.canned[:request.params.max_tokens]

        def run():
            for t in toks:
                sink(TokenEvent(request.id, self.real.tokenizer.decode([t]), [t],
                                [-0.5] if request.params.logprobs else None))
            sink(FinishEvent(request.id, "max_tokens", Usage(len(request.prompt_ids), 0, len(toks))))

        threading.Thread(target=run, daemon=True).start()

    def cancel(self, request_id):
        pass


MANY = settings(SETTINGS, max_examples=1000)


@pytest.fixture(scope="module")
def instant_http(engine):
    with ServerThread(create_app(InstantEngine(engine), api_keys=KEYS, max_queue=64)) as s:
        with httpx.Client(base_url=s.url, headers={"x-api-key": KEYS[0]}, timeout=120) as c:
            yield c


@MANY
@given(body=nasty(MESSAGES))
def test_nasty_text_messages(instant_http, body):
    check(instant_http, "/v1/messages", body)


@MANY
@given(body=nasty(MESSAGES))
def test_nasty_text_count_tokens(instant_http, body):
    check(instant_http, "/v1/messages/count_tokens", body)


@MANY
@given(body=nasty(CHAT))
def test_nasty_text_chat_completions(instant_http, body):
    check(instant_http, "/v1/chat/completions", body)


@MANY
@given(body=nasty(COMPLETIONS))
def test_nasty_text_completions(instant_http, body):
    check(instant_http, "/v1/completions", body)
