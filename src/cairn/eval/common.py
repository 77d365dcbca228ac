"""What every ``cairn eval`` verb shares: the ``--out DIR`` it writes into, progress bars, and the JSON and PNG files
it leaves there (written atomically: a killed eval never leaves a half-written result)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path

from cairn.errors import CairnError
from cairn.weights.native import atomic_write, atomic_write_text


def add_out_arg(p, default: str) -> None:
    """``--out DIR`` on an eval's parser (``default``: a folder under the current directory)."""
    p.add_argument("--out", default=default, metavar="DIR",
                   help="folder for the JSON results and the PNG pictures (default %(default)s; created if missing)")


def out_dir(path: str | Path) -> Path:
    """``--out``'s folder, created if missing; a path that is a file is a clear error."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CairnError(f"--out {out}: is a file, not a folder; give a folder for the results")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data, indent: int | None = 2) -> Path:
    """``indent=None``: one compact line (for large arrays such as attention weights)."""
    atomic_write_text(Path(path), json.dumps(data, indent=indent, ensure_ascii=False) + "\n")
    return Path(path)


def save_png(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG (atomically) and close it."""
    import matplotlib.pyplot as plt

    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))
    plt.close(fig)
    return Path(path)


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (evals run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def progress(items: Iterable, desc: str, total: int | None = None, enabled: bool = True):
    """A tqdm bar on stderr over ``items`` (``enabled=False``: the items as they are, e.g. under ``--json``)."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, file=sys.stderr, leave=False, dynamic_ncols=True)
