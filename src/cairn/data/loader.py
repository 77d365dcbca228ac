"""Batches from packed token shards, with a position that checkpoints save, so a resumed run reads exactly the
batches the uninterrupted run would have read.

Training cuts the token array into non-overlapping windows of ``seq_len + 1`` tokens (inputs and shifted targets
overlap by one), visits them in an order shuffled per epoch from ``(seed, epoch)``, and hands each optimizer step
``batch_size × grad_accum`` windows. The *global* batch does not depend on the number of processes: each
micro-batch of ``batch_size`` rows is split across data-parallel ranks (rank r takes rows r, r + dp, ...), so the
same command under torchrun computes the same gradient as one process.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cairn.errors import CairnError
from cairn.train.objectives import IGNORE, Batch


class PackedBatches:
    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 dp_rank: int = 0, dp_size: int = 1, name: str = "training data"):
        if batch_size % dp_size:
            raise CairnError(
                f"--batch-size {batch_size} is not a multiple of the {dp_size} data-parallel ranks: each micro-batch "
                "is split evenly across them"
            )
        self.tokens = tokens
        self.seq_len, self.batch_size, self.grad_accum = seq_len, batch_size, grad_accum
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise CairnError(
                f"{name} has {len(tokens)} tokens, fewer than one sequence of --seq-len {seq_len} + 1: "
                "use more text or a shorter --seq-len"
            )
        self.epoch, self.pos = 0, 0
        self._order: tuple[int, torch.Tensor] | None = None

    # --------------------------------------------------------------- position
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n_windows"] != self.n_windows or state["seed"] != self.seed:
            raise CairnError(
                "the checkpoint was trained on different data or a different seed/--seq-len "
                f"({state['n_windows']} windows, seed {state['seed']}; now {self.n_windows}, seed {self.seed}): "
                "resume with the run's original data and flags"
            )
        self.epoch, self.pos = state["epoch"], state["pos"]

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.pos / self.n_windows

    # ---------------------------------------------------------------- batches
    def _order_of(self, epoch: int) -> torch.Tensor:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order = (epoch, torch.randperm(self.n_windows, generator=g))
        return self._order[1]

    def _take(self, n: int) -> list[int]:
        ids: list[int] = []
        while len(ids) < n:
            order = self._order_of(self.epoch)
            k = min(n - len(ids), self.n_windows - self.pos)
            ids.extend(order[self.pos:self.pos + k].tolist())
            self.pos += k
            if self.pos == self.n_windows:
                self.epoch, self.pos = self.epoch + 1, 0
        return ids

    def _rows(self, ids: list[int]) -> Batch:
        t = self.seq_len
        rows = np.stack([np.asarray(self.tokens[i * t:i * t + t + 1], dtype=np.int64) for i in ids])
        rows = torch.from_numpy(rows)
        return Batch(rows[:, :-1], rows[:, 1:])

    def next_window(self) -> list[Batch]:
        """This rank's micro-batches of the next optimizer step (``grad_accum`` of ``batch_size / dp`` rows)."""
        ids = self._take(self.batch_size * self.grad_accum)
        out = []
        for m in range(self.grad_accum):
            micro = ids[m * self.batch_size:(m + 1) * self.batch_size]
            out.append(self._rows(micro[self.dp_rank::self.dp_size]))
        return out

    def next_global_window(self) -> Batch:
        """The whole step's rows in micro-batch order (pipeline parallelism splits them into micro-batches)."""
        return self._rows(self._take(self.batch_size * self.grad_accum))


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, max_tokens: int | None = None,
                 dp_rank: int = 0, dp_size: int = 1) -> Iterator[Batch]:
    """Consecutive non-overlapping windows from the start of ``tokens`` (every token predicted once), this rank's
    share of them; at most ``max_tokens`` predicted tokens in all. Every rank gets as many rows (sharded models
    run their collectives once per forward): where the windows do not divide evenly, a rank's last rows are
    padding whose targets are all IGNORE."""
    n = (len(tokens) - 1) // seq_len
    if max_tokens:
        n = min(n, max(1, max_tokens // seq_len))
    mine = list(range(n))[dp_rank::dp_size]
    mine += [-1] * (-(-n // dp_size) - len(mine))
    for s in range(0, len(mine), batch_size):
        ids = mine[s:s + batch_size]
        rows = np.stack([np.asarray(tokens[i * seq_len:i * seq_len + seq_len + 1], dtype=np.int64) if i >= 0
                         else np.zeros(seq_len + 1, dtype=np.int64) for i in ids])
        rows = torch.from_numpy(rows)
        targets = rows[:, 1:].clone()
        targets[[j for j, i in enumerate(ids) if i < 0]] = IGNORE
        yield Batch(rows[:, :-1], targets)
