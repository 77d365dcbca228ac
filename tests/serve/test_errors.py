"""Every error type, in each API's shape and status, with a request-id header; auth included."""

from __future__ import annotations

import json
import threading
import time

import anthropic
import httpx
import openai
import pytest

from tests.serve.conftest import KEYS

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]


def ant(server, key=KEYS[0]):
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def oai(server, key=KEYS[0]):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def check_anthropic(exc, status: int, kind: str) -> str:
    assert exc.status_code == status
    assert exc.body["type"] == "error" and exc.body["error"]["type"] == kind, exc.body
    assert exc.request_id and exc.request_id.startswith("req_")
    assert exc.response.headers["request-id"] == exc.request_id
    return exc.body["error"]["message"]


def check_openai(exc, status: int) -> str:
    assert exc.status_code == status
    assert exc.response.headers["x-request-id"].startswith("req_")
    assert isinstance(exc.body, dict) and "message" in exc.body, exc.body  # the SDK unwraps {"error": {...}}
    return exc.body["message"]


# ------------------------------------------------------------------------------------------------- 401
def test_auth_anthropic(server):
    with pytest.raises(anthropic.AuthenticationError) as e:
        ant(server, "wrong-key").messages.create(model=MODEL, max_tokens=1, messages=HI)
    assert "not valid" in check_anthropic(e.value, 401, "authentication_error")
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "max_tokens": 1, "messages": HI})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert "no API key" in r.json()["error"]["message"] and r.headers["request-id"].startswith("req_")
    # both header styles work with either key
    for headers in ({"x-api-key": KEYS[1]}, {"authorization": f"Bearer {KEYS[0]}"}):
        r = httpx.post(server.url + "/v1/messages/count_tokens", json={"model": MODEL, "messages": HI},
                       headers=headers)
        assert r.status_code == 200, r.text


def test_auth_openai(server):
    with pytest.raises(openai.AuthenticationError) as e:
        oai(server, "sk-wrong").chat.completions.create(model=MODEL, max_tokens=1, messages=HI)
    check_openai(e.value, 401)
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200


# ------------------------------------------------------------------------------------------------- 400
def test_invalid_request(server):
    with pytest.raises(anthropic.BadRequestError) as e:
        ant(server).messages.create(model=MODEL, max_tokens=1, messages=[])
    check_anthropic(e.value, 400, "invalid_request_error")
    r = httpx.post(server.url + "/v1/messages", json={"model": MODEL, "messages": HI},
                   headers={"x-api-key": KEYS[0]})  # max_tokens missing
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/messages", content=b"{not json", headers={"x-api-key": KEYS[0]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        ant(server).messages.create(model=MODEL, max_tokens=1, messages=HI, stop_sequences=[""])
    check_anthropic(e.value, 400, "invalid_request_error")
    with pytest.raises(openai.BadRequestError) as e:
        oai(server).chat.completions.create(model=MODEL, messages=HI, temperature=5)
    check_openai(e.value, 400)


@pytest.mark.parametrize("path,body", [
    ("/v1/messages", {"model": MODEL, "max_tokens": 2,
                      "messages": HI + [{"role": "assistant", "content": "a\ud800"}]}),  # a prefill
    ("/v1/messages/count_tokens", {"model": MODEL, "messages": [{"role": "user", "content": "a\udfff b"}]}),
    ("/v1/completions", {"model": MODEL, "prompt": "x\ud800", "max_tokens": 2}),
    ("/v1/chat/completions", {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "\ud83d"}]}),
])
def test_lone_surrogates_are_a_400_naming_them(server, path, body):
    """JSON can carry a lone UTF-16 surrogate (\\ud800), which no tokenizer takes: these were 500s."""
    r = httpx.post(server.url + path, content=json.dumps(body).encode(),  # ASCII JSON: the \\u escapes as sent
                   headers={"x-api-key": KEYS[0], "content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "lone surrogate code point" in r.json()["error"]["message"]


def test_prompt_too_long(server, engine):
    long = "hello " * (engine.max_context + 10)
    with pytest.raises(anthropic.BadRequestError) as e:
        ant(server).messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": long}])
    msg = check_anthropic(e.value, 400, "invalid_request_error")
    assert f"context is {engine.max_context} tokens" in msg and "the prompt has" in msg
    with pytest.raises(openai.BadRequestError) as e:
        oai(server).chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": long}])
    assert str(engine.max_context) in check_openai(e.value, 400)


# ------------------------------------------------------------------------------------------------- 404
def test_not_found(server):
    with pytest.raises(anthropic.NotFoundError) as e:
        ant(server).messages.create(model="claude-none", max_tokens=1, messages=HI)
    assert MODEL in check_anthropic(e.value, 404, "not_found_error")
    with pytest.raises(openai.NotFoundError) as e:
        oai(server).chat.completions.create(model="gpt-none", max_tokens=1, messages=HI)
    check_openai(e.value, 404)
    r = httpx.get(server.url + "/v1/nothing-here", headers={"x-api-key": KEYS[0], "anthropic-version": "2023-06-01"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# ------------------------------------------------------------------------------------------------- 413
def test_request_too_large(strict_server):
    big = [{"role": "user", "content": "x" * 10_000}]
    with pytest.raises(anthropic.APIStatusError) as e:
        ant(strict_server, KEYS[1]).messages.create(model=MODEL, max_tokens=1, messages=big)
    check_anthropic(e.value, 413, "request_too_large")
    with pytest.raises(openai.APIStatusError) as e:
        oai(strict_server, KEYS[1]).chat.completions.create(model=MODEL, max_tokens=1, messages=big)
    check_openai(e.value, 413)


# ------------------------------------------------------------------------------------------------- 429
def test_rate_limited(strict_server):
    client = ant(strict_server, KEYS[0])
    for _ in range(3):  # the bucket holds 3 requests
        client.messages.count_tokens(model=MODEL, messages=HI)
    with pytest.raises(anthropic.RateLimitError) as e:
        client.messages.count_tokens(model=MODEL, messages=HI)
    check_anthropic(e.value, 429, "rate_limit_error")
    assert int(e.value.response.headers["retry-after"]) >= 1


# ------------------------------------------------------------------------------------------------- 529
def test_overloaded(gated_server, test_engine):
    """max_queue=1: while one request is in flight (held at the engine's gate), the next gets 529."""
    client = ant(gated_server)
    test_engine.gate.clear()
    try:
        with client.messages.stream(model=MODEL, max_tokens=3, messages=HI) as held:
            deadline = time.monotonic() + 30  # the 200 came; the request is admitted and waits at the gate
            while gated_server.state.in_flight < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(anthropic.APIStatusError) as e:
                client.messages.create(model=MODEL, max_tokens=3, messages=HI)
            assert isinstance(e.value, anthropic.OverloadedError)
            check_anthropic(e.value, 529, "overloaded_error")
            assert e.value.response.headers["retry-after"] == "1"
            with pytest.raises(openai.APIStatusError) as e:
                oai(gated_server).chat.completions.create(model=MODEL, max_tokens=3, messages=HI)
            check_openai(e.value, 529)
            test_engine.gate.set()
            assert held.get_final_message().usage.output_tokens > 0
    finally:
        test_engine.gate.set()
    assert client.messages.create(model=MODEL, max_tokens=2, messages=HI).usage.output_tokens > 0


# ------------------------------------------------------------------------------------------------- 500
@pytest.fixture
def faulty(test_engine):
    lock = threading.Lock()
    with lock:
        yield test_engine
        test_engine.fail = None


def test_internal_error(gated_server, faulty):
    faulty.fail = "submit"
    with pytest.raises(anthropic.InternalServerError) as e:
        ant(gated_server).messages.create(model=MODEL, max_tokens=3, messages=HI)
    check_anthropic(e.value, 500, "api_error")
    with pytest.raises(openai.InternalServerError) as e:
        oai(gated_server).chat.completions.create(model=MODEL, max_tokens=3, messages=HI)
    check_openai(e.value, 500)
    faulty.fail = "midway"  # the engine fails after the 200: non-streaming -> 500; streaming -> event: error
    with pytest.raises(anthropic.InternalServerError) as e:
        ant(gated_server).messages.create(model=MODEL, max_tokens=20, messages=HI)
    check_anthropic(e.value, 500, "api_error")
    with pytest.raises(anthropic.APIStatusError) as e:
        with ant(gated_server).messages.stream(model=MODEL, max_tokens=20, messages=HI) as s:
            s.get_final_message()
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "api_error"
    with pytest.raises(openai.APIError) as e:
        list(oai(gated_server).chat.completions.create(model=MODEL, max_tokens=20, messages=HI, stream=True))
    assert e.value.body["type"] == "server_error"


# ------------------------------------------------------------------------------------------------ ping
def test_ping_while_waiting(gated_server, test_engine):
    """A streamed reply that waits (queue, long prefill) keeps the connection alive with SSE comments until the
    prompt is prefilled: only then is message_start sent, its usage known (the prefix cache's share of the prompt)."""
    body = {"model": MODEL, "max_tokens": 3, "stream": True, "messages": HI}
    test_engine.gate.clear()
    events, comments = [], 0
    try:
        with httpx.stream("POST", gated_server.url + "/v1/messages", json=body, headers={"x-api-key": KEYS[0]},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith(": "):
                    assert not events  # comments come before message_start
                    comments += 1
                    if comments == 3:
                        test_engine.gate.set()
                if line.startswith("event: "):
                    events.append(line[7:])
    finally:
        test_engine.gate.set()
    assert comments >= 3
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


# ------------------------------------------------------------------------------------------ disconnect
def test_non_streaming_client_leaves(gated_server, test_engine):
    """A client that gives up on a non-streamed request cancels it: the server lets go of it at once."""
    state = gated_server.state
    before = state.metrics.finished.get("cancelled", 0)
    test_engine.gate.clear()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gated_server.url + "/v1/messages", headers={"x-api-key": KEYS[0]}, timeout=1.0,
                       json={"model": MODEL, "max_tokens": 50, "messages": HI})
        deadline = time.monotonic() + 60
        while state.in_flight and time.monotonic() < deadline:  # the request is still held at the gate
            time.sleep(0.02)
        assert state.in_flight == 0
    finally:
        test_engine.gate.set()
    # the engine confirms the cancellation (its FinishEvent) once the gate lets the request through; the metrics
    # count it then, as the engine's own counters do
    deadline = time.monotonic() + 60
    while state.metrics.finished.get("cancelled", 0) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.metrics.finished.get("cancelled", 0) == before + 1


def test_request_too_large_chunked(strict_server):
    """A body sent without content-length (chunked) is cut off at the limit too."""

    def body():
        yield b'{"model": "SmolLM2-135M-Instruct", "max_tokens": 1, "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}]}'

    r = httpx.post(strict_server.url + "/v1/messages", content=body(), headers={"x-api-key": KEYS[1]})
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large", r.text
    assert r.headers["request-id"].startswith("req_")


def test_server_edges_null_max_tokens_method_labels_and_schema_auth(server):
    """Issue 14, item 8 in part: "max_tokens": null on /v1/completions means the documented 16 (it generated to
    the end of the context); odd HTTP method names do not each become a metrics series; the API schema and its
    pages need the API's key when one is set."""
    h = {"x-api-key": KEYS[0]}
    r = httpx.post(server.url + "/v1/completions", headers=h, timeout=120,
                   json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": None, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16
    for i in range(5):
        httpx.request(f"BREW{i}", server.url + "/v1/messages", headers=h)
    metrics = httpx.get(server.url + "/metrics", headers=h).text
    assert "BREW" not in metrics and 'method="other"' in metrics
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 401
        assert httpx.get(server.url + path, headers=h).status_code == 200


def test_keyless_server_refuses_other_host_names(engine):
    """DNS rebinding: a page on evil.example whose name resolves to 127.0.0.1 would reach a keyless local server;
    without keys, a Host that is not one of the server's names is a 403 (with keys, the key is the guard)."""
    from argparse import Namespace

    from cairn.serve.app import create_app
    from cairn.serve.cli import _allowed_hosts
    from tests.serve.conftest import ServerThread

    names = _allowed_hosts(Namespace(host="127.0.0.1", allowed_host=["cairn.lan"]))
    assert _allowed_hosts(Namespace(host="0.0.0.0", allowed_host=[])) is None
    with ServerThread(create_app(engine, allowed_hosts=names)) as s:
        port = s.url.rsplit(":", 1)[1]
        for host, status in [(f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200), ("[::1]", 200),
                             ("CAIRN.lan:80", 200), ("evil.example", 403), (f"evil.example:{port}", 403)]:
            r = httpx.get(s.url + "/v1/models", headers={"host": host})
            assert r.status_code == status, (host, r.text)
        assert "--allowed-host" in r.json()["error"]["message"]
    with ServerThread(create_app(engine, api_keys=KEYS, allowed_hosts=names)) as s:
        r = httpx.get(s.url + "/v1/models", headers={"host": "evil.example", "x-api-key": KEYS[0]})
        assert r.status_code == 200


def test_a_large_count_tokens_body_does_not_stall_the_server(engine):
    """A 20 MiB count_tokens once froze every stream for 25 s: tokenising ran on the event loop, holding the GIL.
    It now runs in a worker thread (the tokenizer's batch call releases the GIL) and is admitted like a
    generation: while it is in flight, /health still answers."""
    import threading

    from cairn.serve.app import create_app
    from tests.serve.conftest import ServerThread

    text = "All the world's a stage, and all the men and women merely players. " * 60000  # 4 MB
    with ServerThread(create_app(engine, max_body_bytes=64 << 20)) as s:
        got = {}
        big = threading.Thread(target=lambda: got.setdefault("r", httpx.post(
            s.url + "/v1/messages/count_tokens", timeout=300,
            json={"model": MODEL, "messages": [{"role": "user", "content": text}]})))
        big.start()
        while s.state.in_flight == 0 and big.is_alive():  # admitted: tokenising now
            time.sleep(0.005)
        assert httpx.get(s.url + "/health", timeout=60).status_code == 200
        assert s.state.in_flight == 1 and "r" not in got  # answered while the count was still running
        big.join()
        assert got["r"].status_code == 200 and got["r"].json()["input_tokens"] > 800_000
        assert s.state.in_flight == 0


NULL_BODIES = {
    "/v1/messages": {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}],
                     "system": None, "stop_sequences": None, "temperature": None, "top_p": None, "top_k": None,
                     "stream": None, "metadata": None, "tools": None},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "system": None,
                                  "tools": None},
    "/v1/chat/completions": {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi",
                                                                            "name": None}],
                             "max_completion_tokens": None, "temperature": None, "top_p": None, "n": None,
                             "stop": None, "seed": None, "stream": None, "stream_options": None, "user": None,
                             "logprobs": None, "top_logprobs": None, "tools": None},
    "/v1/completions": {"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": None, "top_p": None,
                        "n": None, "stop": None, "seed": None, "stream": None, "stream_options": None,
                        "logprobs": None, "echo": None, "suffix": None, "user": None},
}


@pytest.mark.parametrize("path", sorted(NULL_BODIES))
def test_null_means_the_default_for_every_optional_field(server, path):
    """Issue 14's Build: ``null`` in an optional field is the field's default, on all four request schemas (a
    null in a required field is still a clear 400)."""
    h = {"x-api-key": KEYS[0]}
    r = httpx.post(server.url + path, headers=h, json=NULL_BODIES[path], timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")  # "stream": null is not a stream
    required = "messages" if "messages" in NULL_BODIES[path] else "prompt"
    r = httpx.post(server.url + path, headers=h, json={**NULL_BODIES[path], required: None}, timeout=120)
    assert r.status_code == 400 and required in r.json()["error"]["message"]


@pytest.mark.parametrize("path,body,field", [
    ("/v1/chat/completions", {"messages": HI, "top_k": 5}, "'top_k'"),
    ("/v1/chat/completions", {"messages": HI, "frequency_penalty": 0.5}, "frequency_penalty: 0.5"),
    ("/v1/chat/completions", {"messages": HI, "store": True}, "store: True"),
    ("/v1/completions", {"prompt": "Hi", "best_of": 3, "max_tokens": 2}, "best_of: 3"),
    ("/v1/completions", {"prompt": "Hi", "min_p": 0.1, "max_tokens": 2}, "'min_p'"),
    ("/v1/messages", {"messages": HI, "max_tokens": 2, "mcp_servers": []}, "'mcp_servers'"),
    ("/v1/messages/count_tokens", {"messages": HI, "max_tokens": 2}, "'max_tokens'"),
])
def test_fields_the_server_would_not_honour_are_refused_by_name(server, path, body, field):
    """A request field accepted and silently ignored is a reply that does not do what was asked: unknown top-level
    fields get a 400 naming them (as the real APIs answer), and no-op fields take only their no-op values."""
    r = httpx.post(server.url + path, headers={"x-api-key": KEYS[0]}, json={"model": MODEL, **body}, timeout=120)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"]


def test_no_op_fields_with_no_op_values_are_accepted(server):
    h = {"x-api-key": KEYS[0]}
    r = httpx.post(server.url + "/v1/chat/completions", headers=h, timeout=120, json={
        "model": MODEL, "messages": HI, "max_tokens": 2, "store": False, "frequency_penalty": 0,
        "presence_penalty": 0.0, "logit_bias": {}, "service_tier": "auto", "prompt_cache_key": "k", "metadata": {}})
    assert r.status_code == 200, r.text
    r = httpx.post(server.url + "/v1/messages/count_tokens", headers=h, timeout=120, json={
        "model": MODEL, "messages": HI, "thinking": {"type": "disabled"}})
    assert r.status_code == 200, r.text
