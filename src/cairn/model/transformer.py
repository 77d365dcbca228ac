"""The decoder-only transformer: embeddings, pre-norm blocks, final norm, (tied) output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cairn.config import ModelConfig
from cairn.model.layers import MLP, Attention, ForwardContext, make_norm
from cairn.model.rope import Rotary


class Block(nn.Module):
    """``x' = x + Attn(Norm(x))``; ``y = x' + MLP(Norm(x'))``."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, ctx)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.head is None else self.head.weight

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        last_only: bool = False,
        sinks: int = 0,
        attn_probe=None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for ``tokens`` [B, T] at absolute ``positions`` [B, T] (default 0..T-1).

        With ``cache`` (see ``cairn.model.cache``), new keys/values are stored there and attention covers
        everything the cache returns. ``last_only`` computes logits for the last position only ([B, 1, V]).
        """
        b, t = tokens.shape
        if positions is None:
            start = getattr(cache, "length", 0) if cache is not None else 0
            positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
        x = self.embed(tokens)
        rope = self.rotary(positions, x.dtype)
        ctx = ForwardContext(positions, cache, sinks=sinks, attn_probe=attn_probe)
        for block in self.layers:
            x = block(x, rope, ctx)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if self.head is None:
            return F.linear(x, self.embed.weight)
        return self.head(x)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int | None = None) -> Transformer:
        """Normal(0, std) matrices and embeddings, zero biases, unit norms: for training from scratch."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
        return self


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """An uninitialised model (``device="meta"`` allocates nothing)."""
    with torch.device(device):
        model = Transformer(cfg)
    return model.to(dtype)
