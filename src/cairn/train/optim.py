"""AdamW with decoupled weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def decays(name: str, p: torch.Tensor) -> bool:
    """Whether a parameter gets weight decay: matrices and expert tensors do; norms, biases and embeddings don't.

    A tied head is the embedding (one Parameter, listed once under ``embed.weight``), so it is not decayed either.
    """
    leaf = name.rsplit(".", 1)[-1]
    return p.ndim >= 2 and leaf != "bias" and "embed" not in name and "norm" not in name


def param_groups(named: Iterable[tuple[str, torch.Tensor]], weight_decay: float) -> list[dict]:
    decay, rest = [], []
    for name, p in named:
        if p.requires_grad:
            (decay if decays(name, p) else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``model``'s trainable parameters (each shared Parameter once)."""
    return torch.optim.AdamW(param_groups(model.named_parameters(), weight_decay), lr=lr, betas=betas, eps=eps)


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps to ``lr``, then a half cosine down to ``lr * min_ratio`` at ``total``.

    ``step`` counts optimizer steps from 0 (the first step uses ``lr / warmup``).
    """
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
