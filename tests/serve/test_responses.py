"""The Responses API (POST /v1/responses) through the official openai SDK against a real server (greedy)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from tests.serve.conftest import KEYS
from tests.serve.test_fuzz import MODEL, SETTINGS, check, fuzz_server, http, json_values, schema, short_text

__all__ = ["fuzz_server", "http"]  # the fuzzing server's fixtures, used here too

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "get_weather", "description": "The current weather in a city",
          "parameters": WEATHER, "strict": True}]
QUESTION = "What is the weather in Paris, in celsius?"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0)


def test_text_in_text_out_streamed_the_same(client):
    kw = dict(model="default", input="Name a colour.", instructions="Answer in one word.", max_output_tokens=200,
              temperature=0, store=False)
    r = client.responses.create(**kw)
    assert r.object == "response" and r.status == "completed" and r.store is False
    assert r.output_text and r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.input_tokens > 0 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    with client.responses.stream(**kw) as stream:
        events = [ev.type for ev in stream]
        final = stream.get_final_response()
    assert final.output_text == r.output_text and final.status == "completed"
    assert events[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                          "response.content_part.added"]
    assert events[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                           "response.completed"]
    # the instructions are the system prompt: a different one gives a different prompt
    other = client.responses.create(**{**kw, "instructions": "Answer in French, at length."})
    assert other.usage.input_tokens != r.usage.input_tokens


def test_max_output_tokens_makes_an_incomplete_response(client):
    r = client.responses.create(model="default", input="Tell me a long story.", max_output_tokens=5, temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 5
    with client.responses.stream(model="default", input="Tell me a long story.", max_output_tokens=5,
                                 temperature=0) as stream:
        last = [ev for ev in stream][-1]
    assert last.type == "response.incomplete" and last.response.output[0].content[0].text == r.output_text


def test_forced_function_call_round_trip(client):
    kw = dict(model="default", input=QUESTION, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              temperature=0, max_output_tokens=120)
    r = client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    with client.responses.stream(**kw) as stream:
        deltas = "".join(ev.delta for ev in stream if ev.type == "response.function_call_arguments.delta")
        final = stream.get_final_response()
    streamed = [o for o in final.output if o.type == "function_call"]
    assert [(c.name, c.arguments) for c in streamed] == [(c.name, c.arguments) for c in calls]
    assert deltas == calls[0].arguments
    # the call and its output go back as input items (stateless): the model answers in text
    follow = [{"role": "user", "content": QUESTION}, calls[0].model_dump(exclude_none=True),
              {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 24 C"}]
    answer = client.responses.create(model="default", input=follow, tools=TOOLS, tool_choice="none",
                                     temperature=0, max_output_tokens=30)
    assert [o.type for o in answer.output] == ["message"] and answer.output_text
    bare = client.responses.create(model="default", input=follow[:1], tools=TOOLS, tool_choice="none",
                                   temperature=0, max_output_tokens=1)
    assert answer.usage.input_tokens > bare.usage.input_tokens  # the call and its result are in the prompt


def test_text_format_json_schema_parses(client):
    class City(BaseModel):
        name: str = Field(max_length=30)
        population: int = Field(ge=0, le=100_000_000)
        capital: bool

    r = client.responses.parse(model="default", input="Describe Paris.", text_format=City, temperature=0,
                               max_output_tokens=120)
    assert r.status == "completed" and isinstance(r.output_parsed, City)
    jsonschema.validate(json.loads(r.output_text), City.model_json_schema())


@pytest.mark.parametrize("change, fragment", [
    ({"store": True}, "store"),
    ({"previous_response_id": "resp_123"}, "stateless"),
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"tools": [{"type": "web_search"}]}, "only 'function' tools"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, "cannot be combined"),
    ({"input": [{"type": "function_call_output", "call_id": "call_x", "output": "1"}]}, "answers no function_call"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "only text parts"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"extra_body": {"cairn": {"self_critique": True}}}, "cairn"),
])
def test_refusals_name_the_field(client, change, fragment):
    body = {"model": "default", "input": "hi", "max_output_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError, match=fragment):
        client.responses.create(**body)


def test_stored_responses_do_not_exist(client):
    with pytest.raises(openai.NotFoundError, match="stateless"):
        client.responses.retrieve("resp_123")


# ------------------------------------------------------------------------------------------------- fuzzing
item = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "x"]),
                           "content": st.one_of(short_text, json_values,
                                                st.lists(st.fixed_dictionaries({
                                                    "type": st.sampled_from(["input_text", "output_text",
                                                                             "input_image", "x"]),
                                                    "text": short_text}), max_size=2))},
                          optional={"type": st.sampled_from(["message", "x"])}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": st.sampled_from(["call_1", "call_2"]),
                           "name": st.sampled_from(["get_weather", "x"]),
                           "arguments": st.one_of(st.just('{"city": "Paris", "unit": "celsius"}'), short_text)}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": st.sampled_from(["call_1", "x"]),
                           "output": st.one_of(short_text, json_values)}),
    json_values)
RESPONSES = schema(
    {"model": st.just(MODEL), "input": st.one_of(short_text, st.lists(item, max_size=4))},
    {"instructions": short_text, "max_output_tokens": st.integers(0, 3), "temperature": st.floats(0, 2),
     "top_p": st.floats(0, 1), "stream": st.booleans(), "store": st.booleans(),
     "tools": st.one_of(st.just(TOOLS), st.lists(json_values, max_size=2)),
     "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required", "x"]),
                              st.fixed_dictionaries({"type": st.just("function"),
                                                     "name": st.sampled_from(["get_weather", "x"])}), json_values),
     "parallel_tool_calls": st.booleans(),
     "text": st.one_of(st.just({"format": {"type": "json_schema", "name": "w", "schema": WEATHER}}),
                       st.fixed_dictionaries({"format": json_values})),
     "metadata": st.dictionaries(st.text(max_size=5), short_text, max_size=2), "truncation": short_text,
     "reasoning": json_values, "include": json_values},
)


@SETTINGS
@given(body=RESPONSES)
def test_fuzz_responses(http, body):
    check(http, "/v1/responses", body)
