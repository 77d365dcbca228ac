"""Grammar-constrained decoding: a request's output held to a JSON schema, a regex, a choice list or a grammar.

The API (stable; the servers and the tool-call code build on it)::

    spec = ConstraintSpec("json_schema", {"type": "object", ...})      # or:
    ConstraintSpec("json_object")                  # any JSON object
    ConstraintSpec("regex", r"\\d{3}-\\d{4}")       # the whole output matches the regex
    ConstraintSpec("choice", ["yes", "no"])        # the output is exactly one of the strings
    ConstraintSpec("lark", 'start: "<call>" %json{"type": "object"} "</call>"')   # llguidance's lark dialect
    ConstraintSpec("lark", grammar, trigger="<tool_call>")                         # lazy: see below

    SamplingParams(..., constraint=spec)           # the engine does the rest, per request, inside the batch
    compile_constraint(spec, tokenizer)            # -> CompiledConstraint; cached (LRU) by spec; raises CairnError
                                                   #    naming what cannot be enforced (the servers answer 400)
    compiled.matcher()                             # -> Matcher: one request's state (the engine makes it)

``Engine.check`` compiles a request's constraint (a cache hit after the first time), so a bad schema fails at
submit time with a ``CairnError``; servers may call ``compile_constraint`` off their event loop first.

What the engine guarantees for a constrained request:

- every token it picks keeps the output a prefix of a string the grammar accepts (the logits of all other
  tokens are masked to -inf before sampling; greedy and sampled rows alike);
- end-of-sequence is allowed only where the grammar accepts, and the request finishes (reason ``"eos"``) as soon
  as the grammar cannot continue, so a complete output is exactly a string of the language;
- ``max_tokens`` (or a stop string) can still cut the output short: the finish reason then says so
  (``"max_tokens"``), and the text is a prefix only — nothing presents it as complete.

Lazy constraints (``trigger``): generation is free until the output contains ``trigger``; from then on the
grammar constrains the output *starting at the trigger's first character*, so the grammar must itself begin with
the trigger text (e.g. ``start: "<tool_call>" %json{...} "</tool_call>"``). If the token that completes the
trigger also carries bytes after it that the grammar rejects, that token is replaced by the tokens of its text up
to the end of the trigger (the grammar then picks what follows). Triggers match printed text (not special tokens).

JSON output is compact with ``", "`` and ``": "`` separators (one space, no newlines: a small model cannot pad it
with endless whitespace). Schema keywords llguidance cannot enforce (``not``, ``if``/``then``, ``uniqueItems``,
``contains``, ``propertyNames``, ``dependentRequired``, ``unevaluatedProperties``, unknown ``format``\\s, remote
``$ref``\\s, look-around in ``pattern``...) are a ``CairnError`` naming them, never ignored.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cairn.errors import CairnError

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]
KINDS = ("json_schema", "json_object", "regex", "choice", "lark")
# compact JSON with json.dumps' separators; x-guidance in a schema may change these, never "lenient" (see _grammar)
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 256


@dataclass(frozen=True, eq=False)
class ConstraintSpec:
    """What a request's output must match. ``value``: the schema (dict) for ``json_schema``, nothing for
    ``json_object``, the pattern for ``regex``, the strings for ``choice``, the grammar text for ``lark``."""

    kind: ConstraintKind
    value: Any = None
    trigger: str | None = None

    def __post_init__(self) -> None:
        k, v = self.kind, self.value
        if k not in KINDS:
            raise CairnError(f"unknown constraint kind {k!r}: use one of {', '.join(KINDS)}")
        if k == "json_schema" and not isinstance(v, dict):
            raise CairnError("a json_schema constraint needs the schema as a JSON object")
        if k == "json_object" and v is not None:
            raise CairnError("a json_object constraint takes no value")
        if k in ("regex", "lark") and (not isinstance(v, str) or not v):
            raise CairnError(f"a {k} constraint needs a non-empty string")
        if k == "choice" and (not isinstance(v, list | tuple) or not v
                              or any(not isinstance(s, str) or not s for s in v)):
            raise CairnError("a choice constraint needs a non-empty list of non-empty strings")
        if self.trigger is not None and (not isinstance(self.trigger, str) or not self.trigger):
            raise CairnError("a constraint's trigger must be a non-empty string")

    def key(self) -> str:
        """The cache key: the spec as canonical JSON."""
        value = list(self.value) if self.kind == "choice" else self.value
        return json.dumps([self.kind, value, self.trigger], sort_keys=True, ensure_ascii=False)


def _llg():
    try:
        import llguidance
    except ImportError as e:  # a dependency of cairn; only a broken install lacks it
        raise CairnError(f"constrained decoding needs the llguidance package ({e}): pip install llguidance") from None
    return llguidance


def _grammar(spec: ConstraintSpec) -> str:
    """The llguidance grammar (its JSON form) for ``spec``."""
    LLMatcher = _llg().LLMatcher
    if spec.kind in ("json_schema", "json_object"):
        schema = spec.value if spec.kind == "json_schema" else {"type": "object"}
        try:
            return LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS, overrides={"lenient": False})
        except ValueError as e:
            raise CairnError(f"the JSON schema is not valid: {e}") from None
    if spec.kind == "regex":
        return LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":  # JSON string escapes are lark's string-literal escapes
        alternatives = " | ".join(json.dumps(s, ensure_ascii=False) for s in spec.value)
        return LLMatcher.grammar_from_lark(f"start: {alternatives}")
    return LLMatcher.grammar_from_lark(spec.value)


# --------------------------------------------------------------- tokenizers
_lltok: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lltok_lock = threading.Lock()


def llg_tokenizer(tokenizer, n_vocab: int | None = None):
    """llguidance's view of cairn's tokenizer (HF ``tokenizers`` underneath), made once per tokenizer and vocab
    width (the model's logits may be wider than the tokenizer's vocabulary: the extra ids are never allowed)."""
    n = max(n_vocab or 0, tokenizer.vocab_size)
    with _lltok_lock:
        per = _lltok.setdefault(tokenizer, {})
        if n not in per:
            llg = _llg()
            try:
                per[n] = llg.LLTokenizer(tokenizer.tok.to_str(), n_vocab=n, eos_token=sorted(tokenizer.eos_ids))
            except Exception as e:  # the Rust side raises plain exceptions
                raise CairnError(f"constrained decoding cannot use this model's tokenizer: {e}") from None
        return per[n]


# ------------------------------------------------------------------ compile
class CompiledConstraint:
    """A spec compiled for one tokenizer: the validated grammar and a prototype matcher that requests copy."""

    def __init__(self, spec: ConstraintSpec, tokenizer, lltok):
        llg = _llg()
        self.spec = spec
        self.tokenizer = tokenizer
        self.lltok = lltok
        self.grammar = _grammar(spec)
        is_error, messages = llg.LLMatcher.validate_grammar_with_warnings(self.grammar, lltok)
        if is_error or messages:
            raise CairnError(f"the {_what(spec)} cannot be enforced: {'; '.join(m.strip() for m in messages)}")
        self._proto = llg.LLMatcher(lltok, self.grammar, log_level=0)
        if self._proto.is_error():
            raise CairnError(f"the {_what(spec)} cannot be enforced: {self._proto.get_error()}")
        self.trigger = spec.trigger.encode() if spec.trigger else None
        self.words = (lltok.vocab_size + 31) // 32  # int32 words of one token bitmask

    def matcher(self) -> Matcher:
        return Matcher(self)


def _what(spec: ConstraintSpec) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object format", "regex": "regex",
            "choice": "choice list", "lark": "grammar"}[spec.kind]


_cache: OrderedDict[tuple, CompiledConstraint] = OrderedDict()
_cache_lock = threading.Lock()


def compile_constraint(spec: ConstraintSpec, tokenizer, n_vocab: int | None = None) -> CompiledConstraint:
    """``spec`` compiled for ``tokenizer`` (cached: the last ``CACHE_SIZE`` specs); CairnError if it cannot be
    enforced. ``n_vocab``: the model's logits width when it exceeds the tokenizer's vocabulary."""
    if tokenizer is None:
        raise CairnError("constrained decoding needs the model's tokenizer (this model has none)")
    lltok = llg_tokenizer(tokenizer, n_vocab)
    key = (id(lltok), spec.key())
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    compiled = CompiledConstraint(spec, tokenizer, lltok)  # outside the lock: llguidance drops the GIL to build
    with _cache_lock:
        _cache[key] = compiled
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return compiled


def cache_clear() -> None:
    with _cache_lock:
        _cache.clear()


# ------------------------------------------------------------------ matcher
class Matcher:
    """One request's position in its grammar. The engine asks ``active`` (is a mask needed for the next token),
    fills the mask (``fill_masks``), then ``advance``\\s with the token it picked."""

    def __init__(self, compiled: CompiledConstraint):
        self.compiled = compiled
        self.m = compiled._proto.deep_copy()
        self.waiting = compiled.trigger is not None  # lazy and the trigger not seen yet: generation is free
        self.tail = b""  # while waiting: the output's last bytes (enough to find a trigger across tokens)

    @property
    def active(self) -> bool:
        return not self.waiting

    @property
    def done(self) -> bool:
        """The grammar cannot continue: the output is complete (or the matcher failed: see ``error``)."""
        return self.active and self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.active and self.m.is_accepting()

    @property
    def error(self) -> str:
        return _first_line(self.m.get_error()) if self.m.is_error() else ""

    def advance(self, token: int) -> list[int]:
        """Take the picked ``token``; return the tokens the output really gets (``[token]``, except when a lazy
        trigger is completed by a token whose remaining bytes the grammar rejects: its text up to the trigger's end).
        EOS tokens are not passed here."""
        if not self.waiting:
            if not self.m.consume_token(token):
                raise CairnError(f"token {token} does not fit the constraint: {_first_line(self.m.get_error())}")
            return [token]
        c = self.compiled
        raw = c.tokenizer.token_bytes[token] if 0 <= token < len(c.tokenizer.token_bytes) else b""
        buf = self.tail + raw
        start = len(self.tail)  # where this token's bytes begin in buf
        at = buf.find(c.trigger)
        if at < 0:
            self.tail = buf[-(len(c.trigger) - 1):] if len(c.trigger) > 1 else b""
            return [token]
        self.waiting = False
        self.tail = b""
        if self.m.try_consume_tokens(ids := c.lltok.tokenize_bytes(buf[at:])) == len(ids):
            return [token]
        # the bytes after the trigger do not fit: keep the token's text up to the trigger's end only
        self.m.reset()
        cut = c.lltok.tokenize_bytes(raw[:at + len(c.trigger) - start])
        trig = c.lltok.tokenize_bytes(c.trigger)
        if self.m.try_consume_tokens(trig) != len(trig):
            raise CairnError("the lazy grammar does not begin with its trigger text")
        return cut


def _first_line(message: str) -> str:
    """llguidance's errors go on with a dump of the parser state: the first line says what went wrong."""
    return message.strip().splitlines()[0] if message.strip() else message


def fill_masks(matchers: list[Matcher], bitmask: torch.Tensor) -> None:
    """Row ``i`` of ``bitmask`` [n, words] (int32) := the tokens allowed next by ``matchers[i]`` (a set bit per
    allowed id). llguidance computes the rows in parallel on its own threads, without the GIL."""
    from llguidance.torch import fill_next_token_bitmask_par

    fill_next_token_bitmask_par(_executor(), [(m.m, i) for i, m in enumerate(matchers)], bitmask)


_exec = None


def _executor():
    global _exec
    if _exec is None:
        _exec = _llg().LLExecutor()
    return _exec


class MaskWorker:
    """Computes a step's token masks on a background thread, so they are ready when the forward pass ends: llguidance
    and torch both run without the GIL, and unconstrained requests never wait for them."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None

    def start(self, matchers: list[Matcher], vocab: int) -> Future:
        """A future of bool [len(matchers), vocab]: the tokens each matcher allows next."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="cairn-masks")
        return self._pool.submit(self._masks, matchers, vocab)

    @staticmethod
    def _masks(matchers: list[Matcher], vocab: int) -> torch.Tensor:
        bitmask = torch.zeros(len(matchers), matchers[0].compiled.words, dtype=torch.int32)
        fill_masks(matchers, bitmask)
        return allowed_tokens(bitmask, vocab)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


_BITS = torch.arange(32, dtype=torch.int32)


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bool [n, vocab]: the bits of ``bitmask`` [n, words] unpacked (bit ``j`` of word ``w`` is token ``32w + j``)."""
    bits = (bitmask.unsqueeze(-1) >> _BITS) & 1
    return bits.view(bitmask.shape[0], -1)[:, :vocab].bool()
