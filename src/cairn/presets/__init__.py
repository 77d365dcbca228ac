"""Named model configurations: the source articles' models (claims, taken literally) and real open models.

``presets.json`` maps a name to a description and either an HF-style ``config.json`` (``"hf"``) or cairn
``ModelConfig`` fields (``"cairn"``); real models also carry their published parameter counts.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path
from typing import Any

from cairn.config import ModelConfig
from cairn.errors import CairnError


@cache
def _table() -> dict[str, dict[str, Any]]:
    return json.loads((Path(__file__).parent / "presets.json").read_text())


def names() -> list[str]:
    return list(_table())


def describe(name: str) -> dict[str, Any]:
    """The raw preset entry (description, config, published counts)."""
    return _table()[name]


def get(name: str) -> ModelConfig:
    """The ``ModelConfig`` of preset ``name``; an unknown name gets the closest ones in the error."""
    table = _table()
    if name not in table:
        close = difflib.get_close_matches(name, table, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `cairn params --list`"
        raise CairnError(f"unknown model preset {name!r}: {hint}")
    entry = table[name]
    if "cairn" in entry:
        return ModelConfig.from_dict(entry["cairn"])
    from cairn.config_hf import config_from_hf

    cfg = config_from_hf({**entry["hf"], "_name_or_path": name}, source=f"preset {name}")
    return cfg
