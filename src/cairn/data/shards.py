"""Prepared token shards: the directory ``cairn data prepare`` writes and the training loop reads.

```
meta.json          {"format": 1, "dtype": "uint16"|"uint32", "vocab_size", "bos_id",
                    "splits": {"train": {"file", "index", "tokens", "documents", "bytes"}, "val": {...}}}
train.bin val.bin  flat token arrays (raw, memory-mappable); each document is [bos_id] + its tokens
train.idx.npy ...  int64: each document's first position (its BOS) in the .bin
tokenizer/         the tokenizer the tokens came from
report.json        what curation removed and why (prepare.log: datatrove's own log)
```

meta.json is written last, so a directory without it is incomplete (an interrupted prepare).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cairn.errors import CairnError

FORMAT = 1
SPLITS = ("train", "val")
_RUN = "run `cairn data prepare --tokenizer DIR --out DIR`"


def dtype_for(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def is_prepared(path: Path | str) -> bool:
    """Whether ``path`` looks like a complete prepared directory (meta.json of a known format)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Prepared:
    path: Path
    meta: dict[str, Any]

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def bos_id(self) -> int:
        return int(self.meta["bos_id"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.meta["splits"]:
            raise CairnError(f"{self.path}: no split {split!r} (it has {', '.join(self.meta['splits'])})")
        return self.meta["splits"][split]

    def tokens(self, split: str) -> np.memmap | np.ndarray:
        """The split's tokens, memory-mapped read-only."""
        s = self._split(split)
        if s["tokens"] == 0:  # np.memmap refuses empty files
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(self.path / s["file"], dtype=self.meta["dtype"], mode="r", shape=(s["tokens"],))

    def doc_starts(self, split: str) -> np.ndarray:
        """Each document's first position (its BOS) in ``tokens(split)``, int64."""
        return np.load(self.path / self._split(split)["index"])


def load_prepared(path: Path | str) -> Prepared:
    """Open a prepared directory, checking that every file is there and has the size meta.json says."""
    path = Path(path)
    if not path.is_dir():
        raise CairnError(f"{path}: no such directory ({_RUN} to make one)")
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise CairnError(f"{path}: not a prepared data directory, or an interrupted one (no meta.json): {_RUN}")
    try:
        meta = json.loads(meta_path.read_text())
        fmt, dtype, splits = meta["format"], np.dtype(meta["dtype"]), meta["splits"]
        int(meta["vocab_size"]), int(meta["bos_id"])
    except (ValueError, KeyError, TypeError) as e:
        raise CairnError(f"{meta_path}: corrupt ({type(e).__name__}: {e}); {_RUN} again") from None
    if fmt != FORMAT:
        raise CairnError(f"{meta_path}: format {fmt}, this cairn reads format {FORMAT}; {_RUN} again")
    if dtype not in (np.uint16, np.uint32):
        raise CairnError(f"{meta_path}: dtype {dtype.name} (expected uint16 or uint32); {_RUN} again")
    for name in SPLITS:
        if name not in splits:
            raise CairnError(f"{meta_path}: no {name!r} split; {_RUN} again")
        s = splits[name]
        try:
            binf, idxf, n_tokens, n_docs = path / s["file"], path / s["index"], int(s["tokens"]), int(s["documents"])
        except (KeyError, TypeError, ValueError) as e:
            raise CairnError(f"{meta_path}: split {name!r} is corrupt ({e}); {_RUN} again") from None
        if not binf.is_file():
            raise CairnError(f"{binf}: missing (meta.json lists it); {_RUN} again")
        if binf.stat().st_size != n_tokens * dtype.itemsize:
            raise CairnError(
                f"{binf}: {binf.stat().st_size} bytes, but meta.json says {n_tokens} {dtype.name} tokens "
                f"({n_tokens * dtype.itemsize} bytes): the file is truncated or from another run; {_RUN} again"
            )
        if not idxf.is_file():
            raise CairnError(f"{idxf}: missing (meta.json lists it); {_RUN} again")
        try:
            idx = np.load(idxf, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise CairnError(f"{idxf}: not a .npy file ({e}); {_RUN} again") from None
        if idx.shape != (n_docs,) or idx.dtype != np.int64:
            raise CairnError(f"{idxf}: {idx.dtype}{list(idx.shape)}, expected int64[{n_docs}]; {_RUN} again")
    return Prepared(path, meta)
