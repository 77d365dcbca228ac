"""How the model calls a tool: tools into the prompt, the call grammar, calls out of the generated text.

Both APIs (and the Responses API) turn their requests into the same pieces: ``Tool`` (name, description, JSON
schema of the arguments), a ``Choice`` (auto, none, required/any, one named tool; parallel calls or not) and a
conversation in the HF message convention, where an assistant turn may carry ``tool_calls`` and a ``tool`` turn
carries a result.

The call syntax is the Hermes one that Qwen2.5/3, SmolLM3 and Hermes models are trained on::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Where the model's chat template defines tools in that format (it renders ``tools`` and writes ``<tool_call>``), the
template renders the tools, the earlier calls and the results (``Format.TEMPLATE``). Otherwise (SmolLM2's template
knows no tools) cairn describes the tools and the syntax in the system prompt, writes earlier calls into the
assistant's text and results into a user turn as ``<tool_response>`` blocks (``Format.CAIRN``).

A grammar (``call_constraint``) makes every call well formed: a declared tool's name and arguments valid for its
schema. With ``tool_choice`` auto it is lazy (it takes over once the model writes ``<tool_call>``); with any/required
or a named tool it holds from the first token. ``CallParser`` turns the generated text into text and call events as
it streams; the non-streamed reply is the same parser run over the whole text, so the two always agree.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from enum import Enum
from typing import Any

from cairn.engine.constraint import JSON_OPTIONS, ConstraintSpec
from cairn.serve.errors import APIError
from cairn.serve.prompts import encode_turns

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
_ALPHABET = string.ascii_letters + string.digits


class Format(Enum):
    TEMPLATE = "template"  # the chat template renders tools, calls and results (Hermes <tool_call> syntax)
    CAIRN = "cairn"  # cairn's system prompt describes the tools; calls and results are written as text


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def as_hf(self) -> dict:
        """The HF / OpenAI function-tool shape that chat templates take as ``tools``."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class Choice:
    mode: str = "auto"  # auto | none | required (Anthropic "any") | tool (one named tool)
    name: str | None = None  # the tool, for mode "tool"
    parallel: bool = True  # more than one call in a reply

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "tool")


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # the JSON text exactly as generated (a stream's argument pieces join to it)

    @property
    def input(self) -> dict:
        return json.loads(self.arguments)


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def make_tool(name: Any, description: Any, parameters: Any, where: str) -> Tool:
    """A checked ``Tool``; a bad name or schema is a 400 naming the field."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise APIError(400, f"{where}.name: a tool name is 1-128 letters, digits, '_', '-', '.' or ':' "
                            f"(got {name!r})", param=f"{where}.name")
    if description is not None and not isinstance(description, str):
        raise APIError(400, f"{where}.description: must be a string", param=f"{where}.description")
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise APIError(400, f"{where}: the arguments' JSON schema must be an object", param=where)
    if parameters.get("type", "object") != "object":
        raise APIError(400, f"{where}: a tool's arguments are a JSON object: the schema's type must be 'object' "
                            f"(got {parameters.get('type')!r})", param=where)
    return Tool(name, description or "", parameters)


def check_choice(tools: list[Tool], choice: Choice, where: str) -> None:
    names = [t.name for t in tools]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise APIError(400, f"tools: the tool name {dup!r} is used twice: give each tool a name of its own",
                       param="tools")
    if choice.mode != "none" and choice.mode != "auto" and not tools:
        raise APIError(400, f"{where}: tool_choice {choice.mode!r} needs at least one tool in 'tools'", param=where)
    if choice.mode == "tool" and choice.name not in names:
        raise APIError(400, f"{where}: the tool {choice.name!r} is not among the declared tools "
                            f"({', '.join(names) or 'none'})", param=where)


# ------------------------------------------------------------------------------------------------- prompt
def tool_format(tokenizer) -> Format:
    """``TEMPLATE`` when the model's chat template renders tools in the Hermes ``<tool_call>`` syntax."""
    template = tokenizer.chat_template or ""
    return Format.TEMPLATE if "tools" in template and OPEN in template else Format.CAIRN


def cairn_system_prompt(tools: list[Tool]) -> str:
    """The tools and the call syntax, for a model whose chat template has no tool format of its own."""
    lines = "\n".join(json.dumps(t.as_hf(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{lines}\n</tools>"
            "\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def call_text(name: str, arguments: str | dict) -> str:
    """One call in the model's syntax (what the grammar produces and ``CallParser`` reads)."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {args}}}\n{CLOSE}'


def render_turns(tokenizer, turns: list[dict], tools: list[Tool]) -> tuple[list[dict], list[dict] | None]:
    """(turns for the chat template, its ``tools`` argument or None): the conversation as the model reads it.

    ``turns`` follow the HF convention (assistant ``tool_calls`` with ``function.arguments`` as a dict; ``tool``
    turns with ``content``). With ``Format.TEMPLATE`` they go to the template as they are; with ``Format.CAIRN``
    the tools join the system prompt, calls become assistant text and results user text.
    """
    if tool_format(tokenizer) is Format.TEMPLATE:
        return turns, [t.as_hf() for t in tools] if tools else None
    out: list[dict] = []
    for t in turns:
        if t["role"] == "assistant" and t.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"]["arguments"]) for c in t["tool_calls"]]
            text = "\n".join(([t["content"]] if t.get("content") else []) + calls)
            out.append({"role": "assistant", "content": text})
        elif t["role"] == "tool":
            block = f"<tool_response>\n{t.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1]["content"].endswith("</tool_response>"):
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
        else:
            out.append({"role": t["role"], "content": t.get("content") or ""})
    merged: list[dict] = []  # a result turn next to a user turn: one user turn
    for t in out:
        if merged and merged[-1]["role"] == t["role"] == "user":
            merged[-1] = {"role": "user", "content": merged[-1]["content"] + "\n\n" + t["content"]}
        else:
            merged.append(t)
    if tools:
        prompt = cairn_system_prompt(tools)
        if merged and merged[0]["role"] == "system":
            merged[0] = {"role": "system", "content": merged[0]["content"] + "\n\n" + prompt}
        else:
            merged.insert(0, {"role": "system", "content": prompt})
    return merged, None


def encode(tokenizer, turns: list[dict], tools: list[Tool], prefill: str | None = None) -> list[int]:
    """Prompt token ids for a conversation: with tools or tool turns through ``render_turns``, then the chat
    template; a plain conversation goes to the chat template as it is."""
    if not tools and not has_tool_turns(turns):
        return encode_turns(tokenizer, turns, prefill)
    rendered, template_tools = render_turns(tokenizer, turns, tools)
    return encode_turns(tokenizer, rendered, prefill, template_tools)


def has_tool_turns(turns: list[dict]) -> bool:
    return any(t["role"] == "tool" or t.get("tool_calls") for t in turns)


# ------------------------------------------------------------------------------------------------ grammar
def call_grammar(tools: list[Tool], choice: Choice) -> str:
    """The Lark grammar (llguidance, with ``%json`` for the arguments) of one or more calls to declared tools."""
    allowed = [t for t in tools if choice.mode != "tool" or t.name == choice.name]
    rules = []
    for i, t in enumerate(allowed):
        head = '{"name": ' + json.dumps(t.name, ensure_ascii=False) + ', "arguments": '
        schema = json.dumps({"x-guidance": JSON_OPTIONS, **t.parameters}, ensure_ascii=False)
        rules.append(f"call_{i}: {json.dumps(head, ensure_ascii=False)} %json{schema} " + '"}"')
    body = " | ".join(f"call_{i}" for i in range(len(allowed)))
    start = 'start: tc ("\\n" tc)*' if choice.parallel else "start: tc"
    return "\n".join([start, f'tc: {json.dumps(OPEN + chr(10))} body {json.dumps(chr(10) + CLOSE)}',
                      f"body: {body}", *rules]) + "\n"


def call_constraint(tools: list[Tool], choice: Choice):
    """The engine constraint for ``choice`` (None for tool_choice none or no tools): from the first token when a
    call is forced, else lazily once the model writes ``<tool_call>``."""
    if not tools or choice.mode == "none":
        return None
    return ConstraintSpec(kind="lark", value=call_grammar(tools, choice), trigger=None if choice.forced else OPEN)


# ------------------------------------------------------------------------------------------------- parsing
@dataclass
class Text:
    text: str


@dataclass
class CallStart:
    index: int  # among this reply's calls
    id: str
    name: str


@dataclass
class CallArgs:
    index: int
    text: str  # a piece of the arguments' JSON text


@dataclass
class CallEnd:
    index: int
    call: ToolCall


@dataclass
class _Scan:
    """Where a JSON value's text ends: bracket depth outside strings."""

    depth: int = 0
    in_string: bool = False
    escape: bool = False
    started: bool = False

    def feed(self, ch: str) -> bool:
        """Take one character; True when it closes the value."""
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
            elif ch == '"':
                self.in_string = False
            return False
        if ch == '"':
            self.in_string = True
        elif ch in "{[":
            self.depth += 1
            self.started = True
        elif ch in "}]":
            self.depth -= 1
            return self.depth == 0
        return False


class CallParser:
    """Generated text in, ``Text`` / ``CallStart`` / ``CallArgs`` / ``CallEnd`` events out, as the text streams.

    Text that may be the start of ``<tool_call>`` (and whitespace right before one) is held back until it is
    known not to be. A call whose head is ``{"name": "<declared tool>", "arguments": `` streams its arguments as
    they come; any other call (a model writing without the grammar) is read whole at ``</tool_call>`` and is a call
    only if it is a JSON object naming a declared tool with object arguments; otherwise it stays text. After the
    first call, text that is only whitespace is dropped.
    """

    def __init__(self, names: set[str] | list[str], id_prefix: str = "call_"):
        self.names = set(names)
        self.id_prefix = id_prefix
        self.calls: list[ToolCall] = []
        self.incomplete = False  # the text ended inside a call (max_tokens): that call is not one
        self.cut = ""  # the text of a call cut short after its CallStart
        self._buf = ""
        self._state = "text"  # text | head | args | tail | raw
        self._head_text = ""  # the call's text after <tool_call> that _buf no longer holds
        self._ws = ""  # the whitespace between the text and this <tool_call>
        self._scan = _Scan()
        self._pieces: list[str] = []
        self._cur: CallStart | None = None

    def push(self, text: str) -> list:
        self._buf += text
        out: list = []
        while True:
            before = (self._state, self._buf)
            out += {"text": self._text, "head": self._head, "args": self._args, "tail": self._tail,
                    "raw": self._raw}[self._state]()
            if (self._state, self._buf) == before:
                return out

    def finish(self) -> list:
        """The end of the text: what was held back. A call cut short (``incomplete``: max_tokens ended it) is never a
        call: before its ``CallStart`` it comes back as text; after it, a stream has already shown its beginning, so
        nothing more comes (``cut`` holds its text, which ``feed_all`` returns as text)."""
        out: list = []
        if self._state == "text":
            out = [Text(self._buf)] if self._buf and not (self.calls and not self._buf.strip()) else []
        else:
            self.incomplete = True
            raw = self._ws + OPEN + self._head_text + self._buf
            if self._state in ("head", "raw"):
                out = [Text(raw)]
            else:
                self.cut = raw
        self._buf, self._head_text, self._state = "", "", "text"
        return out

    def called(self, finish_reason: str) -> bool:
        """Whether the reply (its text all pushed, then ``finish``) made calls and ended by itself after them: the
        APIs' ``tool_use`` / ``tool_calls`` stop reason."""
        return bool(self.calls) and not self.incomplete and finish_reason in ("eos", "stop_sequence")

    def feed_all(self, text: str) -> tuple[str, list[ToolCall]]:
        """A whole reply at once: (its text, its calls); a call cut short is text."""
        events = self.push(text) + self.finish()
        return "".join(e.text for e in events if isinstance(e, Text)) + self.cut, list(self.calls)

    # each state consumes what it can of _buf and returns its events
    def _text(self) -> list:
        i = self._buf.find(OPEN)
        if i >= 0:
            before = self._buf[:i].rstrip()
            self._ws, self._buf = self._buf[len(before):i], self._buf[i + len(OPEN):]
            self._state, self._head_text = "head", ""
            return [Text(before)] if before and not (self.calls and not before.strip()) else []
        hold = next((n for n in range(min(len(OPEN) - 1, len(self._buf)), 0, -1)
                     if self._buf.endswith(OPEN[:n])), 0)
        cut = len(self._buf) - hold
        emit = self._buf[:cut].rstrip()  # whitespace before a call belongs to no one: held until the next word
        self._buf = self._buf[len(emit):]
        if self.calls and not emit.strip():
            emit = ""
        return [Text(emit)] if emit else []

    def _head(self) -> list:
        m = _HEAD.match(self._buf)
        if m is not None:
            try:
                name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                name = None
            if name not in self.names:
                self._state = "raw"
                return []
            self._head_text, self._buf = self._buf[:m.end()], self._buf[m.end():]
            self._cur = CallStart(len(self.calls), new_id(self.id_prefix), name)
            self._state, self._scan, self._pieces = "args", _Scan(), []
            return [self._cur]
        if CLOSE in self._buf or not _could_be_head(self._buf):
            self._state = "raw"
        return []

    def _args(self) -> list:
        piece, consumed, done = [], 0, False
        for ch in self._buf:
            if not self._scan.started and not ch.isspace() and ch != "{":
                self._state = "raw"  # arguments that are not an object: read the whole call at its end
                self._buf, self._head_text = self._head_text + "".join(self._pieces) + self._buf, ""
                return []
            consumed += 1
            if not self._scan.started and ch.isspace():
                continue
            piece.append(ch)
            if self._scan.feed(ch):
                done = True
                break
        self._head_text += self._buf[:consumed]
        self._buf = self._buf[consumed:]
        out = []
        if piece:
            self._pieces.append("".join(piece))
            out.append(CallArgs(self._cur.index, self._pieces[-1]))
        if done:
            self._state = "tail"
        return out

    def _tail(self) -> list:
        i = self._buf.find(CLOSE)
        if i < 0:
            return []
        self._buf, self._head_text, self._state = self._buf[i + len(CLOSE):], "", "text"
        call = ToolCall(self._cur.id, self._cur.name, "".join(self._pieces))
        self.calls.append(call)
        return [CallEnd(self._cur.index, call)]

    def _raw(self) -> list:
        i = self._buf.find(CLOSE)
        if i < 0:
            return []
        body, self._buf = self._head_text + self._buf[:i], self._buf[i + len(CLOSE):]
        self._state, self._head_text = "text", ""
        found = _whole_call(body, self.names)
        if found is None:
            return [Text(self._ws + OPEN + body + CLOSE)]
        start = CallStart(len(self.calls), new_id(self.id_prefix), found[0])
        call = ToolCall(start.id, start.name, found[1])
        self.calls.append(call)
        return [start, CallArgs(start.index, call.arguments), CallEnd(start.index, call)]


def _could_be_head(buf: str) -> bool:
    """Whether ``buf`` may still grow into ``{"name": "...", "arguments": `` (the head the grammar writes)."""
    probe = '{"name": "'
    s = buf.lstrip()
    if len(s) <= len(probe):
        return probe.startswith(s) or bool(re.match(r'\{\s*("(n(a(m(e)?)?)?)?)?$', s))
    return bool(re.match(r'\{\s*"name"\s*:\s*"', s))


def _whole_call(body: str, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of a call written whole, or None if it is not a call to a declared tool."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters"))
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)
