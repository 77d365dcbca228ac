"""LoRA's command-line flags and their defaults, apart from ``cairn.train.lora`` (which needs torch): building the
CLI's parser imports no torch, so a wrong flag is answered at once and a server's start overlaps its model's
conversion with torch's import."""

from __future__ import annotations

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_RANK, DEFAULT_ALPHA, DEFAULT_DROPOUT = 8, 16.0, 0.0


def add_args(g) -> None:
    """``--lora`` and its settings (an argparse group of the training loop's flags)."""
    g.add_argument("--lora", action="store_true",
                   help="train LoRA adapters on the frozen model instead of every weight; OUT/ gets the adapter in "
                        "PEFT's layout and checkpoints hold only the adapter and its optimizer state")
    g.add_argument("--lora-rank", type=int, default=DEFAULT_RANK, help="LoRA rank r (default %(default)s)")
    g.add_argument("--lora-alpha", type=float, default=DEFAULT_ALPHA,
                   help="LoRA alpha: the update is scaled by alpha / r (default %(default)g)")
    g.add_argument("--lora-dropout", type=float, default=DEFAULT_DROPOUT,
                   help="dropout on the adapters' input (default %(default)g)")
    g.add_argument("--lora-targets", default=",".join(TARGETS),
                   help="comma-separated projections to adapt, cairn's names (default %(default)s: those the model "
                        "has)")
