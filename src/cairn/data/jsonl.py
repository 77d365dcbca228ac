"""JSON Lines files in: the one reader every data format of cairn's (conversations, preference pairs, prompts,
evaluation sets) parses its lines with, so that each names a missing file, bad encoding or bad JSON the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cairn.errors import CairnError


def read_jsonl(path: str | Path, hint: str, missing: str = "no such file") -> list[tuple[Any, str]]:
    """``(object, "FILE:LINE")`` for each non-blank line of ``path``. ``hint`` says what a line should be (e.g.
    'one {"prompt": ...} object per line'); ``missing`` is how a missing file is described."""
    path = Path(path)
    if not path.is_file():
        raise CairnError(f"{path}: {missing} (JSON Lines: {hint})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise CairnError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}): save it as UTF-8") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            out.append((json.loads(line), where))
        except json.JSONDecodeError as e:
            raise CairnError(f"{where}: not valid JSON ({e.msg}, column {e.colno}): {hint}") from None
    return out
