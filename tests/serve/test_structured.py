"""Structured outputs through real clients against a real server: the OpenAI and Anthropic SDKs' ``parse`` helpers,
LangChain's ``with_structured_output`` (ChatOpenAI, ChatAnthropic), ``llm --schema``; hypothesis-generated schemas
(every 200 validates with ``jsonschema``, every feature the grammar cannot enforce is a 400); refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from enum import StrEnum
from pathlib import Path

import anthropic
import jsonschema
import openai
import pydantic
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cairn.engine import Engine
from cairn.serve.app import create_app
from tests.engine.conftest import tiny
from tests.serve.conftest import KEYS, ServerThread

MODEL = "SmolLM2-135M-Instruct"
ALICE = [{"role": "user", "content": "Alice is 30 and lives in Paris (zip code 75001). Her hobbies are chess and "
                                     "tennis, and her favourite colour is green. Give her details as JSON."}]


class Colour(StrEnum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(pydantic.BaseModel):
    city: str
    zip_code: int


class Person(pydantic.BaseModel):  # nested objects ($defs), an array, an enum, bounded numbers, an optional field
    name: str
    age: int = pydantic.Field(ge=0, le=150)
    favourite_colour: Colour
    hobbies: list[str] = pydantic.Field(max_length=4)
    address: Address
    nickname: str | None = None


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEYS[0], max_retries=0)


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEYS[0], max_retries=0)


def check_person(text: str, parsed) -> None:
    assert isinstance(parsed, Person)
    jsonschema.validate(json.loads(text), Person.model_json_schema())  # the independent validator agrees
    assert parsed.name == "Alice" and parsed.address.city == "Paris"


# ------------------------------------------------------------------------------------------------ OpenAI SDK
def test_openai_parse_returns_the_object_and_the_stream_matches(oai):
    r = oai.chat.completions.parse(model=MODEL, messages=ALICE, response_format=Person, temperature=0,
                                   max_tokens=150)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop"
    check_person(msg.content, msg.parsed)
    with oai.chat.completions.stream(model=MODEL, messages=ALICE, response_format=Person, temperature=0,
                                     max_tokens=150) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == msg.content and final.choices[0].message.parsed == msg.parsed


def test_openai_json_object_and_max_tokens_cut(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ALICE, response_format={"type": "json_object"},
                                    temperature=0, max_tokens=120)
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    # cut short: finish_reason says so and parse() refuses to present the prefix as an object
    with pytest.raises(openai.LengthFinishReasonError):
        oai.chat.completions.parse(model=MODEL, messages=ALICE, response_format=Person, temperature=0, max_tokens=8)
    r = oai.chat.completions.create(model=MODEL, messages=ALICE, response_format={"type": "json_object"},
                                    temperature=0, max_tokens=8)
    assert r.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_openai_completions_take_response_format_too(oai):
    r = oai.completions.create(model=MODEL, prompt="The answer, yes or no:", max_tokens=10, temperature=0,
                               extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                   "name": "answer", "schema": {"enum": ["yes", "no"]}}}})
    assert r.choices[0].text in ('"yes"', '"no"') and r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("fmt, named", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}, "not"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "format": "zip"}}}, "zip"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}}, "strict"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "text", "json_schema": {}}, "json_schema"),
])
def test_openai_refuses_what_it_cannot_enforce(oai, fmt, named):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=MODEL, messages=ALICE, response_format=fmt, max_tokens=5)
    assert named in e.value.body["message"]
    assert e.value.body["param"].startswith("response_format")


def test_response_format_text_is_plain_text(oai):
    r = oai.chat.completions.create(model=MODEL, messages=ALICE, response_format={"type": "text"}, temperature=0,
                                    max_tokens=12)
    plain = oai.chat.completions.create(model=MODEL, messages=ALICE, temperature=0, max_tokens=12)
    assert r.choices[0].message.content == plain.choices[0].message.content


# --------------------------------------------------------------------------------------------- Anthropic SDK
def test_anthropic_parse_returns_the_object_and_the_stream_matches(claude):
    greedy = {"temperature": 0}  # (this SDK's parse and stream have no temperature argument)
    m = claude.messages.parse(model=MODEL, max_tokens=150, messages=ALICE, output_format=Person, extra_body=greedy)
    assert m.stop_reason == "end_turn"
    check_person(m.content[0].text, m.parsed_output)
    with claude.messages.stream(model=MODEL, max_tokens=150, messages=ALICE, extra_body=greedy,
                                output_config={"format": {"type": "json_schema",
                                                          "schema": anthropic.transform_schema(Person)}}) as s:
        streamed = s.get_final_message()
    assert streamed.content[0].text == m.content[0].text


def test_anthropic_max_tokens_cut_and_refusals(claude):
    m = claude.messages.create(model=MODEL, max_tokens=6, messages=ALICE, extra_body={"temperature": 0},
                               output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})
    assert m.stop_reason == "max_tokens"
    with pytest.raises(json.JSONDecodeError):
        json.loads(m.content[0].text)
    bad = [
        ({"output_config": {"format": {"type": "json_schema", "schema": {"if": {}, "then": {}}}}}, "if"),
        ({"output_config": {"format": {"type": "json_object"}}}, "output_config.format.type"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
        ({"output_config": {"effort": "high"}}, "effort"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking"),
        ({"thinking": {"type": "adaptive"}}, "thinking"),
    ]
    for extra, named in bad:
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model=MODEL, max_tokens=5, messages=ALICE, extra_body=extra)
        assert named in e.value.body["error"]["message"], extra
    # disabled thinking is what the model does anyway
    m = claude.messages.create(model=MODEL, max_tokens=3, messages=ALICE, extra_body={"thinking": {"type": "disabled"}})
    assert m.stop_reason in ("max_tokens", "end_turn")
    # a prefill cannot start the reply when the format's JSON must
    with pytest.raises(anthropic.BadRequestError, match="prefill"):
        claude.messages.create(model=MODEL, max_tokens=5, messages=ALICE + [{"role": "assistant", "content": "{"}],
                               output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})


# ------------------------------------------------------------------------------------------- LangChain, llm
def test_langchain_with_structured_output(server):
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    question = ALICE[0]["content"]
    gpt = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key=KEYS[0], temperature=0, max_tokens=150,
                     max_retries=0)
    person = gpt.with_structured_output(Person).invoke(question)  # method="json_schema" (response_format)
    assert isinstance(person, Person) and person.name == "Alice"
    loose = gpt.with_structured_output(Person.model_json_schema(), method="json_mode").invoke(question)
    assert isinstance(loose, dict)
    claude = ChatAnthropic(model=MODEL, base_url=server.url, api_key=KEYS[0], temperature=0, max_tokens=150,
                           max_retries=0)
    person = claude.with_structured_output(Person, method="json_schema").invoke(question)  # output_config.format
    assert isinstance(person, Person) and person.name == "Alice"


def test_llm_cli_schema(server, tmp_path):
    home = tmp_path / "llm"
    home.mkdir()
    (home / "extra-openai-models.yaml").write_text(
        f"- model_id: cairn\n  model_name: {MODEL}\n  api_base: {server.url}/v1\n  api_key_name: cairn\n"
        "  supports_schema: true\n")
    env = {**os.environ, "LLM_USER_PATH": str(home), "LLM_LOAD_PLUGINS": ""}  # no plugins: only the OpenAI client
    llm = Path(sys.executable).with_name("llm")
    out = subprocess.run([str(llm), "-m", "cairn", "--no-log", "--key", KEYS[0], "-o", "temperature", "0",
                          "--schema", "name, age int, city", ALICE[0]["content"]],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    value = json.loads(out.stdout)
    jsonschema.validate(value, {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                                 "city": {"type": "string"}},
                                "required": ["name", "age", "city"]})
    assert value["name"] == "Alice"


# ---------------------------------------------------------------------------------- hypothesis-made schemas
@pytest.fixture(scope="module")
def tiny_server(engine):
    """A tiny random model with the default tokenizer: its picks are arbitrary, so only the grammar makes its
    output valid; fast. Schemas below are bounded, so every output can complete."""
    base = tiny(vocab_size=engine.config.vocab_size, max_seq_len=2048)
    eng = Engine(dataclasses.replace(base, tokenizer=engine.tokenizer), quantize="none")
    with ServerThread(create_app(eng, api_keys=KEYS)) as s:
        yield s
    eng.close()


names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=6)
leaves = st.one_of(
    st.builds(lambda lo, n: {"type": "integer", "minimum": lo, "maximum": lo + n},
              st.integers(-1000, 1000), st.integers(0, 500)),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.builds(lambda xs: {"enum": xs}, st.lists(st.one_of(names, st.integers(-5, 5), st.booleans()), min_size=1,
                                                   max_size=4, unique=True)),
    st.builds(lambda k: {"type": "string", "maxLength": k}, st.integers(0, 6)),
    st.builds(lambda s: {"type": "string", "pattern": f"^{s}[0-9]{{2}}$"}, names),
    st.builds(lambda c: {"const": c}, st.one_of(names, st.integers(-9, 9))),
)


def _object(props: dict, required: list[bool]) -> dict:
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": [k for k, r in zip(props, required, strict=False) if r]}


schemas = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.builds(lambda it, k: {"type": "array", "items": it, "maxItems": k}, inner, st.integers(0, 3)),
        st.builds(_object, st.dictionaries(names, inner, min_size=1, max_size=4), st.lists(st.booleans(), max_size=4)),
        st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner),
    ),
    max_leaves=6,
)
UNSUPPORTED = [
    ("not", {"not": {"type": "string"}}),
    ("uniqueItems", {"type": "array", "uniqueItems": True}),
    ("contains", {"type": "array", "contains": {"type": "integer"}}),
    ("if", {"if": {"type": "integer"}, "then": {"minimum": 1}}),
    ("propertyNames", {"type": "object", "propertyNames": {"maxLength": 3}}),
    ("dependentRequired", {"type": "object", "dependentRequired": {"a": ["b"]}}),
    ("no-such-format", {"type": "string", "format": "no-such-format"}),
]


@st.composite
def requests(draw):
    """A top-level object schema (its fields maybe through $defs), and maybe one unsupported feature inside."""
    props = draw(st.dictionaries(names, schemas, min_size=1, max_size=4))
    schema = _object(props, draw(st.lists(st.booleans(), max_size=4)))
    if draw(st.booleans()):  # move a field's schema into $defs
        key = next(iter(props))
        schema["$defs"] = {"Def": props[key]}
        props[key] = {"$ref": "#/$defs/Def"}
    bad = None
    if draw(st.integers(0, 3)) == 0:
        bad, piece = draw(st.sampled_from(UNSUPPORTED))
        props[draw(names) + "_x"] = piece
    return schema, bad


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=requests(), seed=st.integers(0, 2**31))
def test_generated_schemas_validate_or_are_refused(tiny_server, case, seed):
    schema, bad = case
    client = openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=KEYS[0], max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    try:
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                           response_format=fmt, temperature=1.0, seed=seed, max_tokens=400)
    except openai.BadRequestError as e:
        assert bad is not None, f"refused a supported schema {schema}: {e.body['message']}"
        assert bad in e.body["message"] and e.body["param"] == "response_format"
        event("refused")
        return
    assert bad is None, f"accepted an unsupported feature ({bad}) in {schema}"
    text = r.choices[0].message.content
    event(f"finish: {r.choices[0].finish_reason}")
    if r.choices[0].finish_reason == "length":  # cut short: never a complete object
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
        return
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)
