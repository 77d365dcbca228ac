"""What every request schema of the server shares.

- ``null`` for an optional field means its default. Clients often send every field they know, with ``null`` for the
  ones their user did not set (``"stream": null``, ``"n": null``, ``"max_tokens": null`` on /v1/completions). Both
  APIs document such fields as optional, so a null is read as absent — the field takes its default — rather than
  refused as the wrong type. A null in a required field is still an error.
- A request body (``RequestBody``) refuses top-level fields its schema does not name, as Anthropic's and OpenAI's own
  servers do: a field accepted and silently ignored would give the client a reply that does not honour it. The
  exceptions are listed per schema in ``accepted``: fields that have no effect on this server by their nature (a
  cache hint where every prefix is cached anyway, a tier where there is one), each with the values that are no-ops.
  Nested objects (content blocks, tools) allow extra keys; their handlers check the ones that matter.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


ANY = None  # in ``accepted``: every value of the field is a no-op here


class RequestBody(RequestModel):
    """A whole request body: unknown top-level fields are a 400 naming them."""

    accepted: ClassVar[dict[str, tuple | None]] = {}

    @model_validator(mode="after")
    def _refuse_unknown(self):
        extra = self.model_extra or {}
        unknown = sorted(k for k in extra if k not in self.accepted)
        if unknown:
            raise PydanticCustomError(
                "unsupported_field",
                "unsupported field(s) {names}: this server does not implement {them}, and would not honour {them} "
                "silently; leave {them} out", {"names": ", ".join(repr(k) for k in unknown),
                                               "them": "it" if len(unknown) == 1 else "them"})
        for k, v in extra.items():
            noop = self.accepted[k]
            if noop is not ANY and v is not None and v not in noop:
                raise PydanticCustomError(
                    "unsupported_value", "{name}: {value} is not supported by this server (it takes only {ok}, a "
                    "no-op here); leave it out", {"name": k, "value": repr(v)[:80],
                                                            "ok": " or ".join(repr(x) for x in noop)})
        return self
