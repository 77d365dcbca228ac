"""Token memory (``cairn.serve.memory``): a conversation over its budget is compacted — the oldest turns folded into a
model-written summary of bounded size, the newest kept verbatim — on /v1/chat/completions and /v1/messages (plain
and streamed) and in ``cairn chat``; the next turn reuses the summary and the engine's prefix cache serves its
tokens; without the option an over-long prompt is the 400 it always was. A tiny random model with a BPE tokenizer
(ChatML template) trained here keeps it fast: its summaries are noise, the mechanism is what is tested."""

from __future__ import annotations

import json
import random

import httpx
import pytest

from cairn.engine import Engine
from cairn.errors import CairnError
from cairn.serve import memory
from cairn.serve.app import create_app
from cairn.weights import load_model
from tests.serve.conftest import ServerThread

CONTEXT = 512
WORDS = "the river stone cairn path hill snow wind bread lamp red green seven nine old new map boat".split()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import torch

    from cairn.config import ModelConfig
    from cairn.data.tokenizer_train import train_tokenizer
    from cairn.model import build_model
    from cairn.weights.native import save_checkpoint

    d = tmp_path_factory.mktemp("memory_tiny")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(300)]
    lines += [memory.SUMMARY_HEADER, memory.SUMMARY_PROMPT, "You are a guide who remembers the map. turn 0 1 2 3"] * 30
    (d / "text.txt").write_text("\n".join(lines))
    tok = train_tokenizer([d / "text.txt"], 600, d / "tok", progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=CONTEXT, tie_embeddings=True, arch="llama", name="tiny")
    torch.manual_seed(0)
    return save_checkpoint(d / "model", build_model(cfg).init_weights(seed=0), cfg, tok)


@pytest.fixture(scope="module")
def server(checkpoint):
    engine = Engine(load_model(checkpoint), quantize="none")
    with ServerThread(create_app(engine)) as s:
        yield s
    engine.close()


def conversation(n_turns: int, seed: int = 0, words: int = 14) -> list[dict]:
    rng = random.Random(seed)
    turns = [{"role": "system", "content": "You are a guide who remembers the map."}]
    for i in range(n_turns):
        turns.append({"role": "user" if i % 2 == 0 else "assistant",
                      "content": f"turn {i}: " + " ".join(rng.choice(WORDS) for _ in range(words))})
    return turns


def chat(server, messages, cairn=None, **kw) -> httpx.Response:
    body = {"model": "cairn", "messages": messages, "max_tokens": 8, "temperature": 0, **kw}
    if cairn is not None:
        body["cairn"] = cairn
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)


OPTION = {"memory": {"budget": 200, "summary_max_tokens": 24}}


def test_plan_keeps_the_newest_turns_verbatim_and_the_prompt_under_budget(server):
    engine = server.state.engine
    tok = engine.tokenizer
    turns = conversation(21)
    ids = tok.encode_chat(turns)
    settings = memory.Settings(budget=200, summary_max_tokens=24)
    assert len(ids) > 200
    c = memory.run(engine, memory.plan(tok, engine, turns, ids, tok.encode_chat, settings, CONTEXT, 8))
    assert isinstance(c, memory.Compaction) and c.done and not c.reused
    out = c.messages()
    kept = len(turns) - 1 - c.fold
    assert kept >= settings.keep_last and c.fold >= 1
    assert out[1:] == turns[-kept:]  # the newest turns, word for word
    assert out[1]["role"] == "user"  # the kept part starts at a user message
    assert out[0]["content"].startswith(turns[0]["content"] + "\n\n" + memory.SUMMARY_HEADER)
    assert len(c.ids) <= 200 and c.ids == tok.encode_chat(out)
    # folded down to the low-water mark (its estimate counts the summary's full bound), or as far as allowed (one
    # message more when the newest keep_last start with the assistant's)
    assert len(c.ids) <= settings.low_water * 200 or kept <= settings.keep_last + 1
    assert c.stages and all(f.usage.completion_tokens <= 24 for f, _ in c.stages)  # the summary's bound
    # planned again: the summary is found, nothing is generated
    again = memory.plan(tok, engine, turns, ids, tok.encode_chat, settings, CONTEXT, 8)
    assert again.reused and again.done and again.summary == c.summary and again.ids == c.ids


def test_plan_refuses_what_cannot_fit(server):
    engine = server.state.engine
    tok = engine.tokenizer
    turns = conversation(3, words=120)  # the newest two messages alone are over the budget
    with pytest.raises(CairnError, match="keep_last|even with all but the newest"):
        memory.plan(tok, engine, turns, tok.encode_chat(turns), tok.encode_chat,
                    memory.Settings(budget=100, summary_max_tokens=16), CONTEXT, 8)
    fits = conversation(3)
    assert isinstance(memory.plan(tok, engine, fits, tok.encode_chat(fits), tok.encode_chat,
                                  memory.Settings(budget=400), CONTEXT, 8), memory.Unchanged)


def test_chat_completions_compacts_then_reuses_the_summary_from_the_prefix_cache(server):
    turns = conversation(25, seed=1)
    first = chat(server, turns, OPTION)
    assert first.status_code == 200, first.text
    d1 = first.json()
    m1 = d1["cairn"]["memory"]
    assert m1["compacted"] and not m1["summary_reused"] and m1["summary_generations"] >= 1
    assert m1["original_prompt_tokens"] > 200 >= m1["prompt_tokens"]
    assert m1["folded_messages"] + m1["kept_messages"] == len(turns) - 1
    # usage: the reply's prompt is the compacted one; the summary's generations are counted besides it
    su = m1["summary_usage"]
    assert d1["usage"]["prompt_tokens"] == m1["prompt_tokens"] + su["prompt_tokens"]
    assert d1["usage"]["completion_tokens"] == len_completion(d1) + su["completion_tokens"]
    tok = server.state.tokenizer
    kept = turns[-m1["kept_messages"]:]
    expected = tok.encode_chat(memory.with_summary(turns[:1], m1["summary"], kept))
    assert len(expected) == m1["prompt_tokens"]

    turns2 = turns + [{"role": "assistant", "content": d1["choices"][0]["message"]["content"]},
                      {"role": "user", "content": "and the boat?"}]
    second = chat(server, turns2, OPTION)
    assert second.status_code == 200, second.text
    d2 = second.json()
    m2 = d2["cairn"]["memory"]
    assert m2["compacted"] and m2["summary_reused"] and m2["summary_generations"] == 0
    assert m2["summary"] == m1["summary"] and m2["folded_messages"] == m1["folded_messages"]
    assert m2["prompt_tokens"] <= 200
    # the previous compacted prompt is a prefix of this one: the engine serves it from its prefix cache
    block = 16
    assert d2["usage"]["prompt_tokens_details"]["cached_tokens"] >= (m1["prompt_tokens"] // block - 1) * block > 0
    assert d2["usage"]["prompt_tokens"] == m2["prompt_tokens"]


def len_completion(d: dict) -> int:
    return d["usage"]["completion_tokens"] - d["cairn"]["memory"]["summary_usage"]["completion_tokens"]


def test_without_memory_an_overlong_prompt_is_a_400_and_with_it_fits_the_context(server):
    turns = conversation(61, seed=2)
    assert len(server.state.tokenizer.encode_chat(turns)) > CONTEXT
    off = chat(server, turns)
    assert off.status_code == 400 and "context is 512 tokens" in off.json()["error"]["message"]
    on = chat(server, turns, {"memory": True})
    assert on.status_code == 200, on.text
    m = on.json()["cairn"]["memory"]
    assert m["compacted"] and m["budget"] == CONTEXT - 8 and m["prompt_tokens"] <= m["budget"]
    small = chat(server, conversation(3), {"memory": True})
    assert small.json()["cairn"]["memory"] == {"compacted": False, "budget": CONTEXT - 8,
                                               "prompt_tokens": small.json()["usage"]["prompt_tokens"]}


def test_messages_api_plain_and_streamed(server):
    turns = conversation(25, seed=3)
    body = {"model": "cairn", "system": turns[0]["content"], "messages": turns[1:], "max_tokens": 8,
            "temperature": 0, "cairn": OPTION}
    r = httpx.post(f"{server.url}/v1/messages", json=body, timeout=120)
    assert r.status_code == 200, r.text
    m = r.json()["cairn"]["memory"]
    assert m["compacted"] and m["prompt_tokens"] <= 200
    u = r.json()["usage"]
    su = m["summary_usage"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] == m["prompt_tokens"] + su["prompt_tokens"]
    with httpx.stream("POST", f"{server.url}/v1/messages", json={**body, "stream": True}, timeout=120) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    delta = next(e for e in events if e["type"] == "message_delta")
    assert delta["cairn"]["memory"]["summary_reused"] and delta["cairn"]["memory"]["summary"] == m["summary"]
    assert events[-1]["type"] == "message_stop"


def test_chat_completions_streamed_carries_the_report(server):
    turns = conversation(25, seed=4)
    body = {"model": "cairn", "messages": turns, "max_tokens": 8, "temperature": 0, "cairn": OPTION, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    m = final["cairn"]["memory"]
    assert m["compacted"] and m["prompt_tokens"] <= 200
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] == m["prompt_tokens"] + m["summary_usage"]["prompt_tokens"]


@pytest.mark.parametrize("option,message", [
    ({"memory": {"budget": 3}}, "budget must be a whole number of at least 16"),
    ({"memory": {"budgett": 300}}, "cairn.memory.budgett: unknown field"),
    ({"memory": "yes"}, "cairn.memory: must be true, false or an object"),
])
def test_bad_options_are_400s(server, option, message):
    r = chat(server, conversation(3), option)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_completions_refuse_memory(server):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "cairn", "prompt": "the river", "max_tokens": 2,
                                                         "cairn": {"memory": True}}, timeout=60)
    assert r.status_code == 400 and "cairn.memory: token memory compacts chat conversations" in r.text


def test_server_default_and_a_request_turning_it_off(checkpoint):
    engine = Engine(load_model(checkpoint), quantize="none")
    app = create_app(engine)
    app.state.cairn.memory = memory.Settings(budget=200, summary_max_tokens=16)  # what `cairn serve --memory` sets
    try:
        with ServerThread(app) as s:
            turns = conversation(25, seed=5)
            on = chat(s, turns)
            assert on.status_code == 200 and on.json()["cairn"]["memory"]["compacted"]
            off = chat(s, conversation(61, seed=5), {"memory": False})
            assert off.status_code == 400 and "context is 512 tokens" in off.json()["error"]["message"]
    finally:
        engine.close()


def test_cairn_chat_memory(checkpoint, monkeypatch, capsys):
    import io

    from cairn.cli import main

    lines = [" ".join(random.Random(i).choice(WORDS) for _ in range(12)) for i in range(10)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", str(checkpoint), "--memory", "--memory-budget", "150", "--memory-summary-tokens", "16",
                 "--max-tokens", "6", "--temperature", "0", "--no-history"]) == 0
    notes = [x for x in capsys.readouterr().err.splitlines() if "memory:" in x]
    assert notes and "summarised" in notes[0] and any("summary reused" in n for n in notes)
    for n in notes:
        used, budget = n.split("-> ")[1].split(" tokens of ")
        assert int(used) <= int(budget.rstrip("]")) == 150
    assert main(["chat", str(checkpoint), "--memory-budget", "150", "-p", "hi"]) == 2
    assert "add --memory" in capsys.readouterr().err
