"""Training objectives: what one micro-batch costs. Every objective plugs into the one loop in ``loop.py``.

An objective maps ``(model, batch)`` to a summed loss and the number of target tokens it was summed over. The loop
adds up the token counts of a whole accumulation window (over every data-parallel rank) before any backward pass
and divides by that total, so a window's gradient is the gradient of its mean per-token loss however the tokens
fall into micro-batches and ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # (torch is imported when a loss is computed: the CLI's parser reads this module without it)
    import torch

IGNORE = -100  # a target that costs nothing (padding, prompt tokens in SFT, ...)


@dataclass
class Batch:
    inputs: torch.Tensor  # [B, T] token ids
    targets: torch.Tensor  # [B, T] the id each position should predict, or IGNORE
    positions: torch.Tensor | None = None  # [B, T] absolute positions (None: 0..T-1)
    segments: torch.Tensor | None = None  # [B, T] sequence ids of packed rows: no attention across them

    def n_targets(self) -> int:
        return int((self.targets != IGNORE).sum())

    def to(self, device: torch.device) -> Batch:
        pos = None if self.positions is None else self.positions.to(device)
        seg = None if self.segments is None else self.segments.to(device)
        return Batch(self.inputs.to(device), self.targets.to(device), pos, seg)


@dataclass
class LossOut:
    loss_sum: torch.Tensor  # 0-d, summed over the batch's target tokens: what backward sees, before scaling
    n_tokens: int  # target tokens the sum is over
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra sums to log (divided by tokens)


class Objective(Protocol):
    name: str

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut: ...


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in fp32 over the targets that are not IGNORE."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def _core(model: torch.nn.Module) -> torch.nn.Module:
    """The Transformer inside DDP / compile wrappers (where ``aux_loss`` lives)."""
    while hasattr(model, "module"):
        model = model.module
    return getattr(model, "_orig_mod", model)


class LanguageModeling:
    """Next-token prediction over the targets that are not IGNORE, attention kept inside each packed segment where
    the batch has segment ids; plus ``aux_coef ×`` the MoE load-balancing loss per target token."""

    name = "lm"

    def __init__(self, aux_coef: float = 0.0):
        self.aux_coef = aux_coef

    def loss(self, model: torch.nn.Module, batch: Batch) -> LossOut:
        extra = {} if batch.segments is None else {"segments": batch.segments}
        logits = model(batch.inputs, positions=batch.positions, **extra)
        ce = token_cross_entropy(logits, batch.targets)
        n = batch.n_targets()
        metrics = {"ce": ce.detach()}
        loss = ce
        if self.aux_coef:
            aux = _core(model).aux_loss
            loss = loss + self.aux_coef * aux * n
            metrics["aux"] = aux.detach() * n
        return LossOut(loss, n, metrics)
