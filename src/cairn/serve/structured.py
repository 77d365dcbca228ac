"""Structured outputs: the APIs' output-format fields read as engine constraints (``engine.constraint``).

- OpenAI chat completions ``response_format`` (also taken by cairn's /v1/completions, as vLLM does):
  ``{"type": "text"}``, ``{"type": "json_object"}``, ``{"type": "json_schema", "json_schema": {"name", "schema",
  "strict", "description"}}``;
- Anthropic ``output_config.format`` (and the beta's top-level ``output_format``):
  ``{"type": "json_schema", "schema": {...}}``.

The schema is always enforced in full by the grammar, whatever ``strict`` says; what the grammar cannot enforce is
a 400 naming the keyword (from ``compile_constraint``, via ``ServerState.compile``). Every other malformed field is a
400 naming the field and what it takes.
"""

from __future__ import annotations

import re
from typing import Any

from cairn.engine.constraint import ConstraintSpec
from cairn.serve.errors import APIError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
SCHEMA_FIELDS = {"name", "schema", "strict", "description"}


def _json_schema(spec: Any, where: str, fields: set[str]) -> ConstraintSpec:
    """``spec``: the object holding name/schema/strict/description (``fields`` the keys it may have)."""
    if not isinstance(spec, dict):
        raise APIError(400, f"{where}: an object with name, schema and (optionally) strict and description",
                       param=where)
    unknown = sorted(set(spec) - fields)
    if unknown:
        raise APIError(400, f"{where}: unsupported field(s) {', '.join(unknown)} (takes {', '.join(sorted(fields))})",
                       param=where)
    name = spec.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise APIError(400, f"{where}.name: required, 1 to 64 letters, digits, underscores or dashes (got {name!r})",
                       param=f"{where}.name")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise APIError(400, f"{where}.strict: must be true or false", param=f"{where}.strict")
    if spec.get("description") is not None and not isinstance(spec["description"], str):
        raise APIError(400, f"{where}.description: must be a string", param=f"{where}.description")
    schema = spec.get("schema")
    if schema is None:  # no schema: any JSON value
        schema = {}
    if not isinstance(schema, dict):
        raise APIError(400, f"{where}.schema: a JSON schema (an object)", param=f"{where}.schema")
    return ConstraintSpec("json_schema", schema)


def response_format(fmt: Any, where: str = "response_format") -> ConstraintSpec | None:
    """OpenAI chat completions' ``response_format`` as a constraint (None: plain text)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise APIError(400, f"{where}: an object with a type: text, json_object or json_schema", param=where)
    kind = fmt["type"]
    extra = sorted(set(fmt) - ({"type", "json_schema"} if kind == "json_schema" else {"type"}))
    if extra:
        raise APIError(400, f"{where}: unsupported field(s) {', '.join(extra)} for type {kind!r}", param=where)
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object")
    if kind == "json_schema":
        if "json_schema" not in fmt:
            raise APIError(400, f"{where}.json_schema: required for type 'json_schema' (name, schema, strict)",
                           param=f"{where}.json_schema")
        return _json_schema(fmt["json_schema"], f"{where}.json_schema", SCHEMA_FIELDS)
    raise APIError(400, f"{where}.type: must be one of text, json_object, json_schema (got {kind!r})",
                   param=f"{where}.type")


def output_format(output_config: Any, beta_format: Any = None) -> ConstraintSpec | None:
    """Anthropic's ``output_config`` (its ``format``; ``effort`` is refused: the model has no effort setting) and
    the structured-outputs beta's top-level ``output_format``, as a constraint (None: plain text)."""
    fmt, where = None, "output_config.format"
    if output_config is not None:
        if not isinstance(output_config, dict):
            raise APIError(400, "output_config: an object with format", param="output_config")
        if output_config.get("effort") is not None:
            raise APIError(400, "output_config.effort: not supported (cairn's model has no effort setting): leave it "
                                "out", param="output_config.effort")
        unknown = sorted(set(output_config) - {"format", "effort"})
        if unknown:
            raise APIError(400, f"output_config: unsupported field(s) {', '.join(unknown)} (takes format)",
                           param="output_config")
        fmt = output_config.get("format")
    if beta_format is not None:
        if fmt is not None and fmt != beta_format:
            raise APIError(400, "output_format and output_config.format disagree: send only output_config.format",
                           param="output_format")
        fmt, where = beta_format, "output_format"
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        got = fmt.get("type") if isinstance(fmt, dict) else fmt
        raise APIError(400, f"{where}.type: must be 'json_schema' (got {got!r})", param=f"{where}.type")
    unknown = sorted(set(fmt) - {"type", "schema"})
    if unknown:
        raise APIError(400, f"{where}: unsupported field(s) {', '.join(unknown)} (takes type and schema)",
                       param=where)
    if not isinstance(fmt.get("schema"), dict):
        raise APIError(400, f"{where}.schema: required, a JSON schema (an object)", param=f"{where}.schema")
    return ConstraintSpec("json_schema", fmt["schema"])


def refuse_thinking(thinking: Any) -> None:
    """Anthropic's ``thinking``: cairn's model has no thinking mode, so anything but ``{"type": "disabled"}`` is a
    400 (never accepted and ignored)."""
    if thinking is None:
        return
    if isinstance(thinking, dict) and thinking.get("type") == "disabled" and set(thinking) == {"type"}:
        return
    raise APIError(400, "thinking: extended thinking is not supported (cairn's model has no thinking mode): leave "
                        'thinking out or send {"type": "disabled"}', param="thinking")


async def compile_format(state, spec: ConstraintSpec | None, where: str) -> None:
    """Compile ``spec`` off the event loop (``ServerState.compile``); its 400 names ``where``."""
    try:
        await state.compile(spec)
    except APIError as e:
        if e.status == 400 and e.param is None:
            e.param, e.message = where, f"{where}: {e.message}"
            e.args = (e.message,)
        raise


def text_format(fmt: Any, where: str = "text.format") -> ConstraintSpec | None:
    """The Responses API's ``text.format`` as a constraint (None: plain text): ``{"type": "text"}``,
    ``{"type": "json_object"}``, or ``{"type": "json_schema", "name", "schema", "strict", "description"}`` (the
    schema's fields beside its type, where chat completions nest them under ``json_schema``)."""
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise APIError(400, f"{where}: an object with a type: text, json_object or json_schema", param=where)
    kind = fmt["type"]
    if kind == "json_schema":
        return _json_schema(fmt, where, SCHEMA_FIELDS | {"type"})
    if set(fmt) != {"type"}:
        raise APIError(400, f"{where}: unsupported field(s) {', '.join(sorted(set(fmt) - {'type'}))} for type "
                            f"{kind!r}", param=where)
    if kind == "text":
        return None
    if kind == "json_object":
        return ConstraintSpec("json_object")
    raise APIError(400, f"{where}.type: must be one of text, json_object, json_schema (got {kind!r})",
                   param=f"{where}.type")
