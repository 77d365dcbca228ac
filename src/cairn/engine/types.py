"""What goes into the engine (requests) and what comes out (events).

The CLI, the server and the evals all speak this vocabulary; nothing outside ``cairn.engine`` needs to know how
requests are batched or where their KV lives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from cairn.errors import CairnError

if TYPE_CHECKING:
    from cairn.engine.constraint import ConstraintSpec

FinishReason = Literal["eos", "max_tokens", "stop_sequence", "context_full", "cancelled"]
_ids = itertools.count()


@dataclass
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` turn those off."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # report the chosen token's log-probability in each TokenEvent
    constraint: ConstraintSpec | None = None  # hold the output to a schema/regex/choice/grammar (engine/constraint.py)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise CairnError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise CairnError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise CairnError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise CairnError(f"top_p must be in (0, 1], got {self.top_p}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise CairnError("stop sequences must be non-empty strings")
        if self.constraint is not None:
            from cairn.engine.constraint import ConstraintSpec

            if not isinstance(self.constraint, ConstraintSpec):
                raise CairnError(f"constraint must be a ConstraintSpec, got {type(self.constraint).__name__}")
            if self.ignore_eos:
                raise CairnError("ignore_eos cannot be combined with a constraint: the grammar decides where the "
                                 "output ends")


@dataclass
class Request:
    """One generation: prompt token ids (already templated) or chat messages, and how to sample the continuation."""

    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    messages: list[dict] | None = None  # chat messages: the engine renders them when prompt_ids is empty


@dataclass
class Usage:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    completion_tokens: int = 0


@dataclass
class TokenEvent:
    """Newly produced text. ``text`` never ends inside a UTF-8 character or a possible stop sequence."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    usage: Usage | None = None  # on a request's first TokenEvent: the prompt's usage, known once it is prefilled


@dataclass
class FinishEvent:
    request_id: str
    reason: FinishReason
    usage: Usage
    stop_sequence: str | None = None  # which stop string ended the text, for reason == "stop_sequence"
    text: str = ""  # held-back text released at the end (already stop-trimmed)


Event = TokenEvent | FinishEvent
