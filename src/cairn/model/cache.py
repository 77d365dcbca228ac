"""The KV-cache interface the model talks to, and the simplest cache that implements it.

The model never owns its cache. Each attention layer hands its new keys and values (already rotated) to
``cache.update(layer, k, v)`` and gets back everything it should attend over, plus the absolute position of each
key (``-1`` for an empty slot), from which the layer builds its causal / sliding-window mask. The inference
engine implements the same protocol with paged blocks; ``DenseKVCache`` is the contiguous one used by simple
generation and by tests.
"""

from __future__ import annotations

from typing import Protocol

import torch


class KVCache(Protocol):
    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store ``k, v`` [B, Hkv, T, D] at ``positions`` [B, T]; return all keys, values [B, Hkv, S, D] and
        their positions [B, S] (or None when they are exactly 0..S-1 for every row, with no gaps)."""
        ...


class DenseKVCache:
    """One contiguous [B, Hkv, max_len, D] buffer per layer; every row holds positions 0..length-1."""

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.length = 0  # tokens stored (same for every row)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        t = k.shape[2]
        start = self.length
        end = start + t
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens > capacity {self.max_len}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if layer == len(self.k) - 1:
            self.length = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end], None

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
