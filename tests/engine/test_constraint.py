"""Grammar-constrained decoding in the engine: outputs match their constraint, masks match a brute-force reference,
constrained and unconstrained requests batch without changing each other's tokens, lazy triggers, errors.

A tiny random model with the default model's tokenizer: its picks are arbitrary, so only the grammar makes them
valid, and it is fast. Constraints are bounded (finite languages) so every output completes."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest
import torch

from cairn.engine import Engine, Request, SamplingParams
from cairn.engine.constraint import ConstraintSpec, allowed_tokens, compile_constraint, fill_masks
from cairn.errors import CairnError
from tests.engine.conftest import tiny
from tests.engine.test_engine import reference_greedy

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "c": {"enum": ["red", "green"]},
        "s": {"type": "string", "maxLength": 4},
        "b": {"type": "boolean"},
        "xs": {"type": "array", "items": {"$ref": "#/$defs/small"}, "maxItems": 2},
        "o": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {"k": {"const": 1}},
                                            "required": ["k"], "additionalProperties": False}]},
    },
    "required": ["n", "c", "s", "b", "xs"],
    "additionalProperties": False,
    "$defs": {"small": {"type": "integer", "minimum": -3, "maximum": 3}},
}
REGEX = r"[a-c]{2,4}-[0-9]{1,3}"
CHOICES = ["yes", "no", "not sure", "über"]


@pytest.fixture(scope="module")
def lm(default_model):
    base = tiny(vocab_size=default_model.config.vocab_size, max_seq_len=1024)
    return dataclasses.replace(base, tokenizer=default_model.tokenizer)


@pytest.fixture(scope="module")
def engine(lm):
    with Engine(lm, quantize="none", block_size=8) as eng:
        yield eng


def prompt(lm, text: str = "Answer:") -> list[int]:
    return lm.tokenizer.encode(text)


def valid(spec: ConstraintSpec, text: str) -> bool:
    if spec.kind == "choice":
        return text in spec.value
    if spec.kind == "regex":
        return re.fullmatch(spec.value, text) is not None
    value = json.loads(text)
    jsonschema.validate(value, spec.value if spec.kind == "json_schema" else {"type": "object"})
    return True


@pytest.mark.parametrize("spec", [ConstraintSpec("json_schema", SCHEMA), ConstraintSpec("regex", REGEX),
                                  ConstraintSpec("choice", CHOICES)], ids=lambda s: s.kind)
def test_sampled_outputs_match_their_constraint(engine, lm, spec):
    reqs = [Request(prompt(lm, f"Example {i}:"), SamplingParams(max_tokens=120, temperature=1.0, seed=i,
                                                                 constraint=spec)) for i in range(6)]
    for c in engine.generate_many(reqs):
        assert c.finish.reason == "eos", c.text  # the grammar completed: the request ended there
        assert valid(spec, c.text), c.text
        assert lm.tokenizer.decode(c.token_ids) == c.text


def test_greedy_choice_matches_the_model_under_a_brute_force_checked_mask(engine, lm):
    """Reference: the model's own forward pass, each step's argmax over the tokens the grammar allows; every allowed
    token is checked by brute force (the text stays a prefix of one of the choices; EOS only on a whole choice).
    llguidance allows fewer where the next bytes are forced (only their canonical tokens), never more."""
    tb = lm.tokenizer.token_bytes
    choices = [c.encode() for c in CHOICES]
    eos = min(lm.tokenizer.eos_ids)
    compiled = compile_constraint(ConstraintSpec("choice", CHOICES), lm.tokenizer, lm.config.vocab_size)
    for text in ("Pick one:", "Is it?", "Well"):
        ids, out, m = prompt(lm, text), b"", compiled.matcher()
        want = []
        with torch.inference_mode():
            while True:
                logits = lm.model(torch.tensor([ids + want]))[0, -1]
                bits = torch.zeros(1, compiled.words, dtype=torch.int32)
                fill_masks([m], bits)
                ok = allowed_tokens(bits, logits.shape[0])[0]
                assert ok.any()
                for t in ok.nonzero().flatten().tolist():
                    assert (out in choices) if t == eos else any(c.startswith(out + tb[t]) for c in choices)
                t = int(logits.masked_fill(~ok, float("-inf")).argmax())
                if t == eos:
                    break
                want.append(t)
                out += tb[t]
                m.advance(t)
        got = engine.generate(Request(ids, SamplingParams(max_tokens=20, temperature=0,
                                                          constraint=ConstraintSpec("choice", CHOICES))))
        assert got.token_ids == want and got.finish.reason == "eos"
        assert got.text.encode() == out and out in choices


def test_a_mixed_batch_gives_each_request_its_tokens_alone(engine, lm):
    specs = [ConstraintSpec("json_schema", SCHEMA), None, ConstraintSpec("regex", REGEX), None,
             ConstraintSpec("choice", CHOICES), None, ConstraintSpec("json_object"), None]
    texts = ["Data:", "Once upon a time", "Code:", "The answer is", "Reply:", "Hello", "JSON:", "x y z"]
    reqs = [Request(prompt(lm, t), SamplingParams(max_tokens=30, temperature=0, constraint=s))
            for t, s in zip(texts, specs, strict=True)]
    alone = [engine.generate(dataclasses.replace(r, id=r.id + "-alone")) for r in reqs]
    together = engine.generate_many(reqs)
    for r, a, b in zip(reqs, alone, together, strict=True):
        assert a.token_ids == b.token_ids and a.finish.reason == b.finish.reason
        if r.params.constraint is None:  # unconstrained rows: exactly the model's greedy continuation
            assert b.token_ids == reference_greedy(lm.model, r.prompt_ids, 30)
    # sampled (seeded) rows too
    seeded = [dataclasses.replace(r, id=r.id + "-s", params=dataclasses.replace(r.params, temperature=0.9, seed=7))
              for r in reqs]
    alone = [engine.generate(dataclasses.replace(r, id=r.id + "-alone")) for r in seeded]
    together = engine.generate_many(seeded)
    assert [c.token_ids for c in alone] == [c.token_ids for c in together]


def test_max_tokens_cuts_an_object_and_says_so(engine, lm):
    spec = ConstraintSpec("json_schema", SCHEMA)
    c = engine.generate(Request(prompt(lm), SamplingParams(max_tokens=4, temperature=0, constraint=spec)))
    assert c.finish.reason == "max_tokens" and len(c.token_ids) == 4
    assert c.text.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(c.text)


def test_lazy_trigger_is_free_until_the_trigger_then_constrained(engine, lm):
    """Trigger "e": most tokens contain an "e" followed by more letters, which the grammar (digits after the "e")
    rejects, so the trigger token is cut at the "e"; the text before the first "e" is free."""
    spec = ConstraintSpec("lark", 'start: "e" /[0-9]{3}/', trigger="e")
    reqs = [Request(prompt(lm, f"Story {i}:"), SamplingParams(max_tokens=60, temperature=1.0, seed=i,
                                                               constraint=spec)) for i in range(6)]
    for c in engine.generate_many(reqs):
        assert c.finish.reason == "eos", c.text
        free, constrained = c.text[:c.text.index("e")], c.text[c.text.index("e"):]
        assert re.fullmatch(r"e[0-9]{3}", constrained), c.text
        assert free and "e" not in free
        assert lm.tokenizer.decode(c.token_ids) == c.text


def test_lazy_trigger_token_with_rejected_bytes_is_cut_at_the_trigger(lm):
    tb = lm.tokenizer.token_bytes
    compiled = compile_constraint(ConstraintSpec("lark", 'start: "<call>" /[0-9]+/ "</call>"', trigger="<call>"),
                                  lm.tokenizer, lm.config.vocab_size)
    m = compiled.matcher()
    assert not m.active
    ids = lm.tokenizer.encode("Sure <call>")
    got = [t for tok in ids for t in m.advance(tok)]
    assert m.active and b"".join(tb[t] for t in got) == b"Sure <call>"
    # a token that completes a trigger and carries more: only the part up to the trigger's end is kept
    m = compiled.matcher()
    head = [t for tok in lm.tokenizer.encode("Sure <call") for t in m.advance(tok)]
    gt = tb.index(b">,")  # ">" then a byte the grammar rejects (it wants digits)
    cut = m.advance(gt)
    assert b"".join(tb[t] for t in head + cut) == b"Sure <call>" and m.active
    for tok in lm.tokenizer.encode("42</call>"):
        m.advance(tok)
    assert m.done and not m.error


@pytest.mark.parametrize("schema, named", [
    ({"not": {"type": "string"}}, "not"),
    ({"if": {"type": "string"}, "then": {"minLength": 2}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "format": "no-such-format"}, "no-such-format"),
    ({"type": "string", "pattern": "(?=a)b"}, "look-around"),
    ({"$ref": "https://example.com/s.json"}, "example.com"),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, "propertyNames"),
])
def test_schema_features_the_grammar_cannot_enforce_are_errors_naming_them(engine, lm, schema, named):
    req = Request(prompt(lm), SamplingParams(max_tokens=5, constraint=ConstraintSpec("json_schema", schema)))
    with pytest.raises(CairnError, match=re.escape(named)):
        engine.check(req)


def test_bad_specs_are_errors(engine, lm):
    with pytest.raises(CairnError, match="unknown constraint kind"):
        ConstraintSpec("yaml", "x")
    with pytest.raises(CairnError, match="choice"):
        ConstraintSpec("choice", [])
    with pytest.raises(CairnError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, constraint=ConstraintSpec("json_object"))
    for spec, named in [(ConstraintSpec("regex", "(a"), "unclosed group"), (ConstraintSpec("lark", "start: foo"),
                                                                            "unknown name")]:
        with pytest.raises(CairnError, match=named):
            engine.check(Request(prompt(lm), SamplingParams(constraint=spec)))


def test_compiled_once_per_spec(lm):
    a = compile_constraint(ConstraintSpec("json_schema", {"type": "object", "properties": {"a": {"type": "integer"},
                                                                                           "b": {"type": "string"}}}),
                           lm.tokenizer, lm.config.vocab_size)
    b = compile_constraint(ConstraintSpec("json_schema", {"properties": {"b": {"type": "string"},
                                                                         "a": {"type": "integer"}}, "type": "object"}),
                           lm.tokenizer, lm.config.vocab_size)
    assert a is b
    assert a.matcher().m is not b.matcher().m  # each request its own state
