"""What every request schema of the server shares: ``null`` for an optional field means its default.

Clients often send every field they know, with ``null`` for the ones their user did not set (``"stream": null``,
``"n": null``, ``"max_tokens": null`` on /v1/completions). Both APIs document such fields as optional, so a null is
read as absent — the field takes its default — rather than refused as the wrong type. A null in a required field is
still an error.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
