"""Self-critique at inference (CAI stage III): draft → critique → revision, in both APIs, streamed or not, and in
``cairn chat``. Every answer is checked against the chain recomputed independently with the engine at temperature
0 from the constitution's prompts (``cai.critique_messages`` / ``cai.revision_messages``)."""

from __future__ import annotations

import io
import json
import random

import anthropic
import httpx
import openai
import pytest

from cairn.engine.types import Request, SamplingParams
from cairn.errors import CairnError
from cairn.serve import self_critique as sc
from cairn.serve.app import create_app
from cairn.train.cai import critique_messages, load_constitution, revision_messages
from tests.serve.conftest import KEYS, ServerThread

MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"
MESSAGES = [{"role": "user", "content": QUESTION}]
MAX, CRIT = 24, 40  # reply and critique budgets (tokens): short, so each chain takes about a second here
ON = {"self_critique": {"principles": ["honesty"], "critique_max_tokens": CRIT}}


def recompute(engine, messages: list[dict], principles: list[str], max_tokens: int = MAX, crit: int = CRIT):
    """The chain, independently: (draft, [{principle, critique, revision}], [usage of each stage])."""
    tok, constitution = engine.tokenizer, load_constitution()

    def greedy(ids, n):
        return engine.generate(Request(ids, SamplingParams(max_tokens=n, temperature=0)))

    draft = greedy(tok.encode_chat(messages), max_tokens)
    request, reply, usage, rounds = messages[-1]["content"], draft.text, [draft.finish.usage], []
    for pid in principles:
        p = constitution.get(pid)
        c = greedy(tok.encode_chat(critique_messages(request, reply.strip(), p)), crit)
        r = greedy(tok.encode_chat(revision_messages(request, reply.strip(), c.text.strip(), p)), max_tokens)
        rounds.append({"principle": pid, "critique": c.text, "revision": r.text})
        usage += [c.finish.usage, r.finish.usage]
        reply = r.text
    return draft.text, rounds, usage


@pytest.fixture(scope="module")
def expected(engine):
    return recompute(engine, MESSAGES, ["honesty"])


@pytest.fixture(scope="module")
def on_server(engine):
    """A server with self-critique on by default (`cairn serve --self-critique --critique-principles honesty`)."""
    settings = sc.Settings(load_constitution(), principles=("honesty",), critique_max_tokens=CRIT)
    with ServerThread(create_app(engine, api_keys=KEYS, self_critique=True, critique_settings=settings)) as s:
        yield s


def ant(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEYS[0], max_retries=0)


def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0)


def check_chain(meta: dict, text: str, expected) -> None:
    draft, rounds, usage = expected
    assert meta["draft"] == draft
    assert meta["critiques"] == rounds
    assert text == rounds[-1]["revision"]
    assert meta["revised"] == (text != draft)
    stages = meta["stages"]
    assert [s["stage"] for s in stages] == ["draft"] + ["critique", "revision"] * len(rounds)
    assert [s["prompt_tokens"] for s in stages] == [u.prompt_tokens for u in usage]
    assert [s["completion_tokens"] for s in stages] == [u.completion_tokens for u in usage]


def totals(expected) -> tuple[int, int]:
    """(prompt tokens, generated tokens) of the whole chain."""
    usage = expected[2]
    return sum(u.prompt_tokens for u in usage), sum(u.completion_tokens for u in usage)


# ------------------------------------------------------------------------------------------------- Anthropic
def test_anthropic_per_request_on_equals_the_recomputed_chain(server, expected):
    client = ant(server)  # the main server: self-critique off by default
    msg = client.messages.create(model=MODEL, max_tokens=MAX, messages=MESSAGES,
                                 extra_body={"temperature": 0, "cairn": ON})
    meta = msg.model_extra["cairn"]["self_critique"]
    check_chain(meta, msg.content[0].text, expected)
    prompt, generated = totals(expected)
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == prompt  # every stage's tokens
    assert msg.usage.output_tokens == generated
    # the server's default (off) still applies to the next request: the plain reply, which is the draft
    plain = client.messages.create(model=MODEL, max_tokens=MAX, messages=MESSAGES, extra_body={"temperature": 0})
    assert "cairn" not in (plain.model_extra or {})
    assert plain.content[0].text == expected[0]
    assert plain.usage.output_tokens == expected[2][0].completion_tokens


def test_anthropic_stream(on_server, expected):
    client = ant(on_server)  # on by default
    with client.messages.stream(model=MODEL, max_tokens=MAX, messages=MESSAGES,
                                extra_body={"temperature": 0}) as stream:
        deltas, meta, usage = [], None, None
        for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.text)
            elif event.type == "message_delta":
                meta, usage = event.model_extra["cairn"]["self_critique"], event.usage
        final = stream.get_final_message()
    text = "".join(deltas)
    assert text == final.content[0].text
    check_chain(meta, text, expected)
    prompt, generated = totals(expected)
    assert usage.input_tokens + usage.cache_read_input_tokens == prompt and usage.output_tokens == generated
    assert on_server.state.in_flight == 0


def test_anthropic_two_drawn_rounds(server, engine):
    """rounds=2 with a seed: two different principles drawn (reproducibly), round 2 critiques round 1's revision."""
    option = {"self_critique": {"rounds": 2, "seed": 11, "critique_max_tokens": 16}}
    msg = ant(server).messages.create(model=MODEL, max_tokens=12, messages=MESSAGES,
                                      extra_body={"temperature": 0, "cairn": option})
    meta = msg.model_extra["cairn"]["self_critique"]
    drawn = [r["principle"] for r in meta["critiques"]]
    constitution = load_constitution()
    assert drawn == [p.id for p in random.Random(11).sample(list(constitution.principles), 2)]
    assert len(set(drawn)) == 2
    check_chain(meta, msg.content[0].text, recompute(engine, MESSAGES, drawn, max_tokens=12, crit=16))


# ---------------------------------------------------------------------------------------------------- OpenAI
def test_openai_default_on_and_per_request_off(on_server, expected):
    client = oai(on_server)
    r = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=MAX, messages=MESSAGES)
    check_chain(r.model_extra["cairn"]["self_critique"], r.choices[0].message.content, expected)
    prompt, generated = totals(expected)
    assert r.usage.prompt_tokens == prompt and r.usage.completion_tokens == generated
    assert r.usage.total_tokens == prompt + generated
    off = client.chat.completions.create(model=MODEL, temperature=0, max_tokens=MAX, messages=MESSAGES,
                                         extra_body={"cairn": {"self_critique": False}})
    assert "cairn" not in (off.model_extra or {})
    assert off.choices[0].message.content == expected[0]  # the plain reply is the draft
    assert off.usage.completion_tokens == expected[2][0].completion_tokens


def test_openai_stream(server, expected):
    chunks = list(oai(server).chat.completions.create(
        model=MODEL, temperature=0, max_tokens=MAX, messages=MESSAGES, stream=True,
        stream_options={"include_usage": True}, extra_body={"cairn": ON}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    check_chain(last.model_extra["cairn"]["self_critique"], text, expected)
    prompt, generated = totals(expected)
    assert chunks[-1].usage.prompt_tokens == prompt and chunks[-1].usage.completion_tokens == generated
    assert server.state.in_flight == 0


# ----------------------------------------------------------------------------------------------------- errors
BAD = [
    ("yes", "cairn: must be an object"),
    ({"self_critique": "yes"}, "cairn.self_critique: must be true, false or an object"),
    ({"critic": True}, "cairn.critic: unknown option"),
    ({"self_critique": {"colour": 1}}, "cairn.self_critique.colour: unknown field"),
    ({"self_critique": {"principles": ["nope"]}}, "no principle 'nope'"),
    ({"self_critique": {"principles": "harm"}}, "principles must be a non-empty list"),
    ({"self_critique": {"rounds": 0}}, "rounds must be a whole number from 1 to 8"),
    ({"self_critique": {"rounds": 2, "principles": ["harm"]}}, "rounds and principles disagree"),
    ({"self_critique": {"critique_max_tokens": 0}}, "critique_max_tokens must be"),
    ({"self_critique": {"seed": "x"}}, "seed must be an integer"),
]


@pytest.mark.parametrize("option,message", BAD)
def test_bad_options_are_400_in_each_api_shape(server, option, message):
    headers = {"x-api-key": KEYS[0]}
    r = httpx.post(server.url + "/v1/messages", headers=headers, timeout=30,
                   json={"model": MODEL, "max_tokens": 8, "messages": MESSAGES, "cairn": option})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert message in body["error"]["message"], body
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, timeout=30,
                   json={"model": MODEL, "max_tokens": 8, "messages": MESSAGES, "cairn": option})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "cairn" and message in err["message"]


def test_what_self_critique_cannot_honour_is_refused(on_server):
    with pytest.raises(openai.BadRequestError) as e:
        oai(on_server).chat.completions.create(model=MODEL, max_tokens=8, messages=MESSAGES, n=2)
    assert e.value.body["param"] == "n" and "self-critique makes one reply" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai(on_server).chat.completions.create(model=MODEL, max_tokens=8, messages=MESSAGES, logprobs=True)
    assert e.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as e:
        oai(on_server).chat.completions.create(model=MODEL, max_tokens=8, messages=MESSAGES,
                                               response_format={"type": "json_object"},
                                               extra_body={"cairn": {"self_critique": True}})
    assert e.value.body["param"] == "response_format"
    # ... and the server's default does not apply to structured output (a revision is prose, not the format)
    r = oai(on_server).chat.completions.create(model=MODEL, max_tokens=8, messages=MESSAGES,
                                               response_format={"type": "json_object"})
    assert r.choices[0].message.content.startswith("{") and "cairn" not in (r.model_extra or {})
    with pytest.raises(openai.BadRequestError) as e:  # raw completions: asking is refused ...
        oai(on_server).completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                          extra_body={"cairn": {"self_critique": True}})
    assert "not on raw text completions" in e.value.body["message"]
    # ... and the server's default does not apply to them
    assert oai(on_server).completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None
    with pytest.raises(anthropic.BadRequestError) as e:  # a prefill cannot be revised
        ant(on_server).messages.create(model=MODEL, max_tokens=8,
                                       messages=[*MESSAGES, {"role": "assistant", "content": "The"}])
    assert "prefill" in e.value.body["error"]["message"]
    # turned off, the same requests work
    off = {"cairn": {"self_critique": False}}
    r = oai(on_server).chat.completions.create(model=MODEL, max_tokens=2, messages=MESSAGES, n=2, extra_body=off)
    assert len(r.choices) == 2
    m = ant(on_server).messages.create(model=MODEL, max_tokens=2, extra_body=off,
                                       messages=[*MESSAGES, {"role": "assistant", "content": "The"}])
    assert m.stop_reason == "max_tokens"
    assert on_server.state.in_flight == 0


def test_settings_and_options():
    c = load_constitution()
    s = sc.Settings(c)
    assert sc.requested(False, s, None) is None and sc.requested(True, s, None) is s
    assert sc.requested(True, s, {"self_critique": None}) is s and sc.requested(True, s, {}) is s
    assert sc.requested(True, s, {"self_critique": False}) is None
    assert sc.requested(False, s, {"self_critique": True}) is s
    assert sc.requested(True, s, None, chat=False) is None
    fixed = sc.requested(False, s, {"self_critique": {"principles": ["harm", "privacy"], "seed": 3}})
    assert fixed.principles == ("harm", "privacy") and fixed.seed == 3
    assert [p.id for p in fixed.pick(random.Random())] == ["harm", "privacy"]
    drawn = sc.requested(False, fixed, {"self_critique": {"rounds": 3}})  # rounds alone: draw, not the fixed ids
    assert drawn.principles == () and drawn.rounds == 3
    picks = [p.id for p in drawn.pick(drawn.rng())]
    assert len(set(picks)) == 3 and picks == [p.id for p in drawn.pick(drawn.rng())]  # seed 3: reproducible
    assert [p.id for p in s.pick(s.rng(5))] == [p.id for p in s.pick(s.rng(5))]  # the request's seed
    with pytest.raises(CairnError, match="from 1 to 8"):
        sc.Settings(c, rounds=9)
    with pytest.raises(CairnError, match="--critique-principles"):
        sc.load_settings(principles=" , ")
    assert sc.load_settings(principles="harm, honesty").rounds == 2
    with pytest.raises(CairnError, match="disagree"):
        sc.load_settings(principles="harm,honesty", rounds=3)
    assert sc.request_text(MESSAGES) == QUESTION
    convo = [{"role": "system", "content": "Be brief."}, *MESSAGES, {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Germany?"}]
    assert sc.request_text(convo) == f"User: {QUESTION}\nAssistant: Paris.\nUser: And of Germany?"


# ------------------------------------------------------------------------------------------------ cairn chat
class Borrowed:
    """The test engine, lent to `cairn chat` (which closes its engine at the end)."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def close(self):
        pass


def chat(monkeypatch, capsys, engine, *argv, stdin: str | None = None):
    import cairn.cli

    monkeypatch.setattr(cairn.cli, "_engine", lambda args: Borrowed(engine))
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = cairn.cli.main(["chat", "--temperature", "0", "--max-tokens", str(MAX), *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_chat_cli(monkeypatch, capsys, engine, expected, tmp_path):
    draft, [r], _ = expected
    code, out, err = chat(monkeypatch, capsys, engine, "--self-critique", "--critique-principles", "honesty",
                          "--critique-max-tokens", str(CRIT), "-p", QUESTION)
    assert code == 0, err
    assert out == r["revision"] + "\n"  # stdout: the revision, the reply
    assert f"[draft] {draft}\n" in err and f"[critique: honesty] {r['critique']}\n" in err  # stderr: the trail
    # a constitution of one's own; multi-turn from stdin, each reply a revision
    path = tmp_path / "mine.yaml"
    path.write_text(json.dumps({"principles": [{"id": "brief", "principle": "The reply is short.",
                                                "critique": "Is the reply longer than it needs to be?",
                                                "revision": "Rewrite the reply in one sentence."}]}))
    code, out, err = chat(monkeypatch, capsys, engine, "--self-critique", "--constitution", str(path),
                          "--critique-max-tokens", "16", stdin=f"{QUESTION}\nAnd of Germany?\n/exit\n")
    assert code == 0, err
    assert err.count("[draft] ") == 2 and err.count("[critique: brief] ") == 2
    assert len(out.strip().splitlines()) >= 2


def test_chat_cli_errors(monkeypatch, capsys, engine, tmp_path):
    code, _, err = chat(monkeypatch, capsys, engine, "--self-critique", "--constitution", str(tmp_path / "no.yaml"),
                        "-p", "Hi")
    assert code == 2 and "no.yaml: no such file" in err
    code, _, err = chat(monkeypatch, capsys, engine, "--critique-rounds", "2", "-p", "Hi")
    assert code == 2 and "add --self-critique" in err
    code, _, err = chat(monkeypatch, capsys, engine, "--self-critique", "--critique-principles", "kind", "-p", "Hi")
    assert code == 2 and "no principle 'kind'" in err


def test_serve_flags(tmp_path):
    """`cairn serve --self-critique ...` reaches the app; a bad constitution fails before the model loads."""
    from cairn.cli import build_parser
    from cairn.serve.cli import build_app

    args = build_parser().parse_args(["serve", "--self-critique", "--constitution", str(tmp_path / "x.yaml")])
    with pytest.raises(CairnError, match="x.yaml: no such file"):
        build_app(args)
    args = build_parser().parse_args(["serve", "--critique-principles", "harm,privacy", "--critique-max-tokens", "9"])
    assert sc.settings_from_args(args) == sc.Settings(load_constitution(), ("harm", "privacy"), 2, None, 9)
    assert args.self_critique is False


def test_chat_page_toggle(server, on_server):
    """The chat page's self-critique checkbox starts as the server's default and is sent with each request."""
    off, on = httpx.get(server.url + "/").text, httpx.get(on_server.url + "/").text
    assert 'id="self-critique" type="checkbox" >' in off and 'id="self-critique" type="checkbox" checked>' in on
    script = httpx.get(on_server.url + "/static/chat.js").text  # the page's own script
    assert 'cairn: {self_critique: $("self-critique").checked}' in script
