"""Loads cairn's multiple-choice questions (cairn_mc.jsonl beside this file) for lm-evaluation-harness, offline: the
task YAMLs name ``utils.load`` as their ``custom_dataset``, so no hub download and no path relative to the
current directory is involved."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent
LETTERS = "ABCD"


def load(**_metadata) -> dict:
    rows = [json.loads(line) for line in (HERE / "cairn_mc.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    for r in rows:
        r["options"] = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(r["choices"]))
        r["letter"] = LETTERS[r["answer"]]
    return {"test": datasets.Dataset.from_list(rows)}
