"""``OUT/metrics.jsonl`` (one JSON object per step) and the loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cairn.weights.native import atomic_write, atomic_write_text


class MetricsLog:
    """Appends one line per step; flushed at once, so a killed run keeps every step it logged."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = None

    def truncate_after(self, step: int) -> None:
        """Keep the lines of steps ``<= step`` (a resumed run rewrites the steps after its checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if rec.get("step", 0) <= step:
                keep.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in keep))

    def write(self, record: dict) -> None:
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")  # noqa: SIM115 - held open for the run
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_metrics(path: Path) -> list[dict]:
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def plot_losses(metrics_path: Path, png: Path, title: str = "") -> None:
    """Training loss per step and validation loss / bits per byte at each validation, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_metrics(metrics_path)
    if not recs:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=0.8, label="train loss (nats/token)")
    val = [r for r in recs if "val_loss" in r]
    handles = ax.get_lines()
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss (nats/token)")
        handles = ax.get_lines()
        if any(math.isfinite(r.get("val_bpb", math.nan)) for r in val):
            ax2 = ax.twinx()
            ax2.plot([r["step"] for r in val], [r["val_bpb"] for r in val], "s--", color="tab:green",
                     label="validation bits/byte (right)")
            ax2.set_ylabel("bits per byte")
            handles = [*handles, *ax2.get_lines()]
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(handles=handles, loc="upper right")  # one legend for both axes
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(Path(png), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
