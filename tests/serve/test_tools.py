"""Tool use: prompt rendering (against HF transformers), call parsing, the call grammar, and both APIs through the
official SDKs and LangChain against a real server (the default model, greedy)."""

from __future__ import annotations

import json
import random

import anthropic
import jsonschema
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cairn.engine.constraint import compile_constraint
from cairn.serve.errors import APIError
from cairn.serve.tools import (
    CallArgs,
    CallEnd,
    CallParser,
    CallStart,
    Choice,
    Text,
    Tool,
    call_constraint,
    call_grammar,
    call_text,
    encode,
    render_turns,
    tool_format,
)
from cairn.tokenizer import Tokenizer
from tests.serve.conftest import KEYS
from tests.serve.test_fuzz import MODEL, SETTINGS, check, fuzz_server, http, json_values, schema, short_text

__all__ = ["fuzz_server", "http"]  # the fuzzing server's fixtures, used here too

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"},
                                         "hours": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [Tool("get_weather", "The current weather in a city", WEATHER), Tool("get_time", "The time in a zone", TIME)]
QUESTION = "What is the weather in Paris, in celsius?"
ODD = {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}  # not enforceable

# Qwen2.5-Instruct's chat template (Hermes-style tools), the convention HF `apply_chat_template(tools=...)` follows
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are \
provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

HISTORY = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": QUESTION},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "Europe/Paris"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 24 C"},
    {"role": "tool", "tool_call_id": "call_2", "name": "get_time", "content": "14:05"},
]


@pytest.fixture(scope="module")
def tokenizer(engine):
    return engine.tokenizer


def _with_template(tok: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tok.tok, chat_template=template, bos_token=tok.bos_token, eos_token=tok.eos_token)


# ------------------------------------------------------------------------------------------------ rendering
def test_template_tools_render_as_hf_transformers_does(tokenizer):
    """A template with a tool format renders tools, calls and results itself, exactly as HF's
    apply_chat_template(tools=...) renders them."""
    from transformers import PreTrainedTokenizerFast

    qwen = _with_template(tokenizer, QWEN25)
    assert tool_format(qwen).value == "template"
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.tok, chat_template=QWEN25)
    want = hf.apply_chat_template(HISTORY, tools=[t.as_hf() for t in TOOLS], tokenize=False,
                                  add_generation_prompt=True)
    ids = encode(qwen, HISTORY, TOOLS)
    assert qwen.decode(ids, skip_special=False) == want
    assert '{"type": "function", "function": {"name": "get_weather"' in want and "<tool_response>\nsunny" in want


def test_cairn_format_for_a_template_without_tools(tokenizer):
    """SmolLM2's template knows no tools: cairn's system prompt lists them, calls are assistant text, results a
    user turn of <tool_response> blocks."""
    assert tool_format(tokenizer).value == "cairn"
    turns, template_tools = render_turns(tokenizer, HISTORY, TOOLS)
    assert template_tools is None
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Answer briefly.\n\n# Tools")
    assert json.dumps(TOOLS[0].as_hf()) in turns[0]["content"]
    assert turns[2]["content"] == (call_text("get_weather", {"city": "Paris", "unit": "celsius"}) + "\n"
                                   + call_text("get_time", {"zone": "Europe/Paris"}))
    assert turns[3]["content"] == "<tool_response>\nsunny, 24 C\n</tool_response>\n<tool_response>\n14:05\n" \
                                  "</tool_response>"
    # what the model writes for a call is what the parser reads
    text, calls = CallParser({"get_weather", "get_time"}).feed_all(turns[2]["content"])
    assert text == "" and [(c.name, c.input) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}), ("get_time", {"zone": "Europe/Paris"})]


# -------------------------------------------------------------------------------------------------- parsing
SAMPLES = [
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa}r\\"is", "unit": "celsius"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris"}}\n</tool_call>',
    "no call here, only a <tool mention",
    '<tool_call>\n{"arguments": {"zone": "Asia/Tokyo"}, "name": "get_time"}\n</tool_call>',  # keys out of order
    '<tool_call>\n{"name": "launch", "arguments": {}}\n</tool_call> undeclared',
    'cut short <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa',
]


@pytest.mark.parametrize("sample", SAMPLES)
def test_parser_streamed_in_any_pieces_gives_the_whole_text_result(sample):
    names = {"get_weather", "get_time"}
    whole = CallParser(names)
    text, calls = whole.feed_all(sample)
    rng = random.Random(0)
    for _ in range(100):
        p = CallParser(names)
        cuts = sorted(rng.sample(range(1, len(sample)), rng.randint(0, min(10, len(sample) - 1))))
        events, last = [], 0
        for c in [*cuts, len(sample)]:
            events += p.push(sample[last:c])
            last = c
        events += p.finish()
        assert "".join(e.text for e in events if isinstance(e, Text)) + p.cut == text
        assert [(c.name, c.arguments) for c in p.calls] == [(c.name, c.arguments) for c in calls]
        args: dict[int, str] = {}
        for e in events:
            if isinstance(e, CallArgs):
                args[e.index] = args.get(e.index, "") + e.text
        assert [args[i] for i in range(len(calls))] == [c.arguments for c in calls]
        ends = [e.index for e in events if isinstance(e, CallEnd)]
        if p.cut:  # cut short after its head: the stream showed the call's start, never its end
            assert [e.index for e in events if isinstance(e, CallStart)] == [*ends, len(ends)]
        else:
            assert [e.index for e in events if isinstance(e, CallStart)] == ends
    if sample.startswith("Let me"):
        assert text == "Let me look." and [c.input for c in calls] == [{"city": 'Pa}r"is', "unit": "celsius"},
                                                                        {"zone": "Europe/Paris"}]
    elif "Asia" in sample:
        assert text == "" and calls[0].input == {"zone": "Asia/Tokyo"}
    else:  # no call, an undeclared tool, a call cut short: all text, nothing lost
        assert calls == [] and text == sample
        assert whole.incomplete == sample.startswith("cut short")


def test_call_grammar_compiles_and_refuses_what_it_cannot_enforce(tokenizer):
    for choice in (Choice(), Choice("required"), Choice("tool", "get_time", parallel=False)):
        spec = call_constraint(TOOLS, choice)
        assert spec.trigger == (None if choice.forced else "<tool_call>")
        compile_constraint(spec, tokenizer)
    assert call_constraint(TOOLS, Choice("none")) is None and call_constraint([], Choice()) is None
    grammar = call_grammar(TOOLS, Choice("tool", "get_time", parallel=False))
    assert "get_weather" not in grammar and grammar.startswith("start: tc\n")
    bad = [Tool("odd", "", ODD)]
    with pytest.raises(Exception, match="no-such-format"):
        compile_constraint(call_constraint(bad, Choice("required")), tokenizer)


def test_tool_checks():
    from cairn.serve.tools import check_choice, make_tool

    with pytest.raises(APIError, match="tools.0.name"):
        make_tool("has space", "", None, "tools.0")
    with pytest.raises(APIError, match="type must be 'object'"):
        make_tool("f", "", {"type": "string"}, "tools.0")
    with pytest.raises(APIError, match="used twice"):
        check_choice([TOOLS[0], TOOLS[0]], Choice(), "tool_choice")
    with pytest.raises(APIError, match="not among the declared tools"):
        check_choice(TOOLS, Choice("tool", "nope"), "tool_choice")
    with pytest.raises(APIError, match="needs at least one tool"):
        check_choice([], Choice("required"), "tool_choice")


# ------------------------------------------------------------------------------------------ Anthropic SDK
def _anthropic(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=KEYS[0], max_retries=0)


A_TOOLS = [{"name": t.name, "description": t.description, "input_schema": t.parameters} for t in TOOLS]


@pytest.mark.parametrize("tool_choice", [{"type": "tool", "name": "get_time"}, {"type": "any"}])
def test_anthropic_forced_call_is_valid_and_streams_the_same(server, tool_choice):
    client = _anthropic(server)
    kw = dict(model="default", max_tokens=120, messages=[{"role": "user", "content": QUESTION}], tools=A_TOOLS,
              tool_choice={**tool_choice, "disable_parallel_tool_use": True}, extra_body={"temperature": 0})
    msg = client.messages.create(**kw)
    uses = [b for b in msg.content if b.type == "tool_use"]
    assert msg.stop_reason == "tool_use" and len(uses) == 1
    schema = {t["name"]: t["input_schema"] for t in A_TOOLS}
    assert uses[0].id.startswith("toolu_")
    if tool_choice["type"] == "tool":
        assert uses[0].name == "get_time"
    jsonschema.validate(uses[0].input, schema[uses[0].name])
    partial: dict[int, str] = {}
    with client.messages.stream(**kw) as stream:
        for ev in stream:
            if ev.type == "content_block_delta" and ev.delta.type == "input_json_delta":
                partial[ev.index] = partial.get(ev.index, "") + ev.delta.partial_json
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in final.content] == \
        [(b.type, getattr(b, "name", None), getattr(b, "input", None)) for b in msg.content]
    index = next(i for i, b in enumerate(final.content) if b.type == "tool_use")
    assert json.loads(partial[index]) == uses[0].input


def test_anthropic_round_trip_with_tool_result(server):
    """call -> tool_result (string, content blocks, is_error) -> a text answer; streamed and not alike."""
    client = _anthropic(server)
    first = client.messages.create(model="default", max_tokens=120, tools=A_TOOLS,
                                   tool_choice={"type": "tool", "name": "get_weather"},
                                   messages=[{"role": "user", "content": QUESTION}], extra_body={"temperature": 0})
    use = next(b for b in first.content if b.type == "tool_use")
    for result in ("sunny, 24 C", [{"type": "text", "text": "sunny"}, {"type": "text", "text": "24 C"}]):
        messages = [{"role": "user", "content": QUESTION},
                    {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result,
                                                  "is_error": False}]}]
        kw = dict(model="default", max_tokens=24, tools=A_TOOLS, messages=messages, extra_body={"temperature": 0})
        answer = client.messages.create(**kw)
        assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
        with client.messages.stream(**kw) as stream:
            streamed = stream.get_final_message()
        assert [b.model_dump(exclude={"id"}) for b in streamed.content] == \
            [b.model_dump(exclude={"id"}) for b in answer.content]
        assert streamed.stop_reason == answer.stop_reason
    # the results are in the prompt: more tokens with them, and the tools are counted too
    count = client.messages.count_tokens(model="default", tools=A_TOOLS, messages=messages).input_tokens
    without = client.messages.count_tokens(model="default", messages=[{"role": "user", "content": QUESTION}])
    with_tools = client.messages.count_tokens(model="default", tools=A_TOOLS,
                                              messages=[{"role": "user", "content": QUESTION}])
    assert count > with_tools.input_tokens > without.input_tokens + 50


@pytest.mark.parametrize("change, fragment", [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tool"),
    ({"tool_choice": {"type": "tool", "name": "nope"}}, "not among the declared tools"),
    ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}, "cache_me": True}]}, "cache_me"),
    ({"tools": [{"name": "f", "input_schema": ODD}], "tool_choice": {"type": "any"}}, "tools: .*no-such-format"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]},
     "answers no tool_use block"),
])
def test_anthropic_tool_errors(server, change, fragment):
    body = {"model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tools": A_TOOLS,
            **change}
    with pytest.raises(anthropic.BadRequestError, match=fragment):
        _anthropic(server).messages.create(**body)


# --------------------------------------------------------------------------------------------- OpenAI SDK
O_TOOLS = [t.as_hf() for t in TOOLS]


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_openai_forced_call_is_valid_and_streams_the_same(server, tool_choice):
    client = _openai(server)
    kw = dict(model="default", max_tokens=120, messages=[{"role": "user", "content": QUESTION}], tools=O_TOOLS,
              tool_choice=tool_choice, parallel_tool_calls=False, temperature=0)
    done = client.chat.completions.create(**kw)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.type == "function"
    if isinstance(tool_choice, dict):
        assert call.function.name == "get_time"
    schema = {t.name: t.parameters for t in TOOLS}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)
    with client.chat.completions.stream(**kw) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    got = final.choices[0]
    assert got.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in got.message.tool_calls] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert got.message.content == choice.message.content


def test_openai_round_trip_with_tool_message(server):
    client = _openai(server)
    first = client.chat.completions.create(model="default", max_tokens=120, temperature=0, tools=O_TOOLS,
                                           tool_choice="required",
                                           messages=[{"role": "user", "content": QUESTION}])
    calls = first.choices[0].message.tool_calls
    messages = [{"role": "user", "content": QUESTION}, first.choices[0].message.model_dump(exclude_none=True)]
    messages += [{"role": "tool", "tool_call_id": c.id, "content": f"result {k}: sunny, 24 C"}
                 for k, c in enumerate(calls)]
    kw = dict(model="default", max_tokens=24, temperature=0, tools=O_TOOLS, messages=messages)
    answer = client.chat.completions.create(**kw)
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (answer.choices[0].message.content or "")
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


@pytest.mark.parametrize("change, fragment", [
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "only 'function' tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the declared tools"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "deprecated"),
    ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "answers no tool call"),
    ({"logprobs": True}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": ODD}}]}, "tools: .*no-such-format"),
])
def test_openai_tool_errors(server, change, fragment):
    body = {"model": "default", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], "tools": O_TOOLS,
            **change}
    with pytest.raises(openai.BadRequestError, match=fragment):
        _openai(server).chat.completions.create(**body)


# ---------------------------------------------------------------------------------------------- LangChain
def test_langchain_bind_tools_openai_and_anthropic(server):
    from langchain_anthropic import ChatAnthropic
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str, unit: str) -> str:
        """The current weather in a city, in celsius or fahrenheit."""
        return "sunny"

    models = [ChatOpenAI(model="default", base_url=server.url + "/v1", api_key=KEYS[0], temperature=0,
                         max_tokens=120, max_retries=0),
              ChatAnthropic(model="default", base_url=server.url, api_key=KEYS[0], temperature=0,
                            max_tokens=120, max_retries=0)]
    for model in models:
        bound = model.bind_tools([get_weather], tool_choice="get_weather")
        reply = bound.invoke(QUESTION)
        assert reply.tool_calls and {c["name"] for c in reply.tool_calls} == {"get_weather"}, type(model).__name__
        for call in reply.tool_calls:  # (the small model may call it more than once: parallel calls are allowed)
            assert set(call["args"]) == {"city", "unit"} and all(isinstance(v, str) for v in call["args"].values())


# ------------------------------------------------------------------------------------------------- fuzzing
tool_use = st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.sampled_from(["toolu_1", "toolu_2"]),
                                  "name": st.sampled_from(["get_weather", "x"]),
                                  "input": st.one_of(st.just({"city": "Paris"}), json_values)})
tool_result = st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.sampled_from(["toolu_1", "x"]),
                                     "content": st.one_of(short_text, json_values), "is_error": json_values})
A_MESSAGES = schema(
    {"model": st.just(MODEL), "max_tokens": st.integers(0, 3),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                 "content": st.lists(st.one_of(tool_use, tool_result), max_size=2)}),
                          min_size=1, max_size=3)},
    {"tools": st.one_of(st.just(A_TOOLS), st.lists(json_values, max_size=2)),
     "tool_choice": st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["auto", "any", "tool", "none", "x"])},
                                                    optional={"name": st.sampled_from(["get_time", "x"]),
                                                              "disable_parallel_tool_use": json_values}),
                              json_values),
     "stream": st.booleans()},
)
O_CHAT = schema(
    {"model": st.just(MODEL),
     "messages": st.lists(st.one_of(
         st.fixed_dictionaries({"role": st.just("assistant"), "tool_calls": st.lists(st.one_of(
             st.fixed_dictionaries({"id": st.just("call_1"), "type": st.just("function"), "function": st.one_of(
                 st.just({"name": "get_time", "arguments": '{"zone": "Europe/Paris"}'}), json_values)}),
             json_values), max_size=2)}),
         st.fixed_dictionaries({"role": st.just("tool"), "tool_call_id": st.sampled_from(["call_1", "x"]),
                                "content": st.one_of(short_text, json_values)}),
         st.fixed_dictionaries({"role": st.just("user"), "content": short_text})), min_size=1, max_size=3)},
    {"max_tokens": st.integers(0, 3), "tools": st.one_of(st.just(O_TOOLS), st.lists(json_values, max_size=2)),
     "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), json_values,
                              st.just({"type": "function", "function": {"name": "get_time"}})),
     "parallel_tool_calls": json_values, "stream": st.booleans(), "n": st.integers(1, 2)},
)


@SETTINGS
@given(body=A_MESSAGES)
def test_fuzz_anthropic_tools(http, body):
    check(http, "/v1/messages", body)


@SETTINGS
@given(body=O_CHAT)
def test_fuzz_openai_tools(http, body):
    check(http, "/v1/chat/completions", body)


class _TemplatedEngine:
    """The real engine, its tokenizer carrying another chat template (the server renders prompts with it)."""

    def __init__(self, real, tokenizer):
        self.real, self.tokenizer = real, tokenizer

    def __getattr__(self, name):
        return getattr(self.real, name)


def test_a_template_with_tools_is_used_end_to_end(engine):
    """With a template that has a tool format (Qwen2.5's), the server renders tools and results through it and
    reads the model's calls back, on both APIs."""
    from cairn.serve.app import create_app
    from tests.serve.conftest import ServerThread

    qwen = _with_template(engine.tokenizer, QWEN25)
    with ServerThread(create_app(_TemplatedEngine(engine, qwen), api_keys=KEYS)) as s:
        client = _openai(s)
        r = client.chat.completions.create(model="default", max_tokens=120, temperature=0, tools=O_TOOLS,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           messages=[{"role": "user", "content": QUESTION}])
        call = r.choices[0].message.tool_calls[0]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        a = _anthropic(s)
        counted = a.messages.count_tokens(model="default", tools=A_TOOLS,
                                          messages=[{"role": "user", "content": QUESTION}]).input_tokens
        want = encode(qwen, [{"role": "user", "content": QUESTION}], TOOLS)
        assert counted == len(want) and "You are Qwen" in qwen.decode(want)
