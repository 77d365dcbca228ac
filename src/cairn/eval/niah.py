"""Needle in a haystack: can the model repeat one fact hidden at a given depth of a long context?

Each cell of the grid (context length × needle depth) builds a prompt of about ``length`` tokens: an instruction, a
haystack (by default the filler of Mohtashami & Jaggi's pass-key test, or the sentences of any text file), the
needle ``The pass key is NNNNN. Remember it. NNNNN is the pass key.`` put between two sentences at ``depth`` (0 = the
start of the haystack, 1 = its end), and the question. The model answers greedily; a cell's recall is the fraction
of its trials whose answer contains the key. Every prompt and answer goes into the JSON, and the grid into a heatmap.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cairn.errors import CairnError

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n\n")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class Cell:
    length: int  # asked-for prompt length in tokens
    depth: float
    trial: int
    key: str
    prompt_ids: list[int]
    needle_token: int  # where the needle starts, in tokens from the start of the prompt


def sentences(text: str) -> list[str]:
    """A haystack text's sentences (split after ., ! or ? followed by white space, and at line breaks), blank ones
    dropped."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    return [s for s in parts if s]


def parse_lengths(text: str) -> list[int]:
    """``1k,2k,4096`` → ``[1024, 2048, 4096]``."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n = int(float(part[:-1]) * 1024) if part.endswith("k") else int(part)
        except ValueError:
            raise CairnError(f"--lengths: {part!r} is not a number of tokens (e.g. 1k,2k,4096)") from None
        if n < 1:
            raise CairnError(f"--lengths: {part!r} must be a positive number of tokens")
        out.append(n)
    if not out:
        raise CairnError("--lengths is empty: give context lengths in tokens, e.g. 1k,2k,4k")
    return sorted(set(out))


def parse_depths(text: str) -> list[float]:
    try:
        out = sorted({float(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise CairnError(f"--depths: {text!r} must be fractions between 0 and 1, e.g. 0,0.5,1") from None
    if not out or not all(0 <= d <= 1 for d in out):
        raise CairnError(f"--depths: {text!r} must be fractions between 0 and 1, e.g. 0,0.5,1")
    return out


class Haystack:
    """Builds the grid's prompts from a haystack's sentences, counting tokens with the model's tokenizer."""

    def __init__(self, tokenizer, text: str | None = None):
        self.tok = tokenizer
        sents = sentences(text if text is not None else FILLER)
        if not sents:
            raise CairnError("the haystack has no sentences: give a text file with some prose")
        self.sents = sents
        self.sent_tokens = [len(tokenizer.encode(" " + s, add_bos=False)) for s in sents]

    def build(self, length: int, depth: float, key: str) -> tuple[list[int], int]:
        """``(prompt ids, needle start)`` for a prompt of about ``length`` tokens (a sentence at most either way)."""
        needle = NEEDLE.format(key=key)
        fixed = len(self.tok.encode(INTRO + needle + QUESTION))
        budget = length - fixed
        if budget < 0:
            raise CairnError(f"a context of {length} tokens is shorter than the instruction, needle and question "
                             f"({fixed} tokens): use longer --lengths")
        hay, used, i = [], 0, 0
        while used < budget:  # the haystack's sentences, round and round, until the budget is spent
            j = i % len(self.sents)
            if used + self.sent_tokens[j] > budget and hay:
                break
            hay.append(self.sents[j])
            used += self.sent_tokens[j]
            i += 1
        at = round(depth * len(hay))
        before = INTRO + " ".join(hay[:at])
        text = (before + (" " if at else "") + needle + (" " if at < len(hay) else "") + " ".join(hay[at:])
                + QUESTION)
        ids = self.tok.encode(text)
        return ids, len(self.tok.encode(before))


def make_cells(hay: Haystack, lengths: list[int], depths: list[float], trials: int, seed: int,
               cap: int | None = None) -> list[Cell]:
    """The grid's prompts; ``cap``: the most tokens a prompt may have (the context less the answer), so that a length
    equal to the context fills it."""
    rng = random.Random(seed)
    cells = []
    for length in lengths:
        for depth in depths:
            for t in range(trials):
                key = str(rng.randrange(10000, 100000))
                ids, at = hay.build(min(length, cap) if cap else length, depth, key)
                cells.append(Cell(length, depth, t, key, ids, at))
    return cells


def found(answer: str, key: str) -> bool:
    """The answer recalls the key: its digits, not run into other digits (``712`` is not ``71234``)."""
    return re.search(rf"(?<!\d){re.escape(key)}(?!\d)", answer) is not None


def evaluate(cells: list[Cell], answer: Callable[[list[int]], str], progress: Callable | None = None) -> dict:
    """Ask each cell's question through ``answer(prompt ids) -> text`` and score it; recall per (length, depth)."""
    items = progress(cells, "needle in a haystack", len(cells)) if progress else cells
    rows = []
    for c in items:
        text = answer(c.prompt_ids)
        rows.append({"length": c.length, "tokens": len(c.prompt_ids), "depth": c.depth, "trial": c.trial,
                     "key": c.key, "needle_token": c.needle_token, "answer": text, "found": found(text, c.key)})
    lengths = sorted({r["length"] for r in rows})
    depths = sorted({r["depth"] for r in rows})
    grid = []
    for d in depths:
        line = []
        for n in lengths:
            hits = [r["found"] for r in rows if r["depth"] == d and r["length"] == n]
            line.append(sum(hits) / len(hits))
        grid.append(line)
    return {"lengths": lengths, "depths": depths, "recall": grid,
            "mean_recall": sum(r["found"] for r in rows) / len(rows), "cells": rows}


def heatmap(report: dict, title: str, plt):
    """Recall by context length (columns) and needle depth (rows), numbers in the cells."""
    import numpy as np

    grid = np.array(report["recall"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(report["lengths"]) + 2.4, 0.55 * len(report["depths"]) + 1.8))
    im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(report["lengths"])), [_k(n) for n in report["lengths"]])
    ax.set_yticks(range(len(report["depths"])), [f"{d:.0%}" for d in report["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.0%}", ha="center", va="center", fontsize=8)
    native = report.get("native_context")
    if native:
        past = [j for j, n in enumerate(report["lengths"]) if n > native]
        if past:
            ax.axvline(past[0] - 0.5, color="black", lw=1.5, ls="--")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="recall", fraction=0.05)
    return fig


def _k(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def read_haystack(path: str | None) -> str | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CairnError(f"--haystack {p}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CairnError(f"--haystack {p}: not UTF-8 text ({e})") from None
