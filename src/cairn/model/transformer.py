"""The decoder-only transformer: embeddings, pre-norm blocks, final norm, (tied) output head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cairn.config import ModelConfig
from cairn.model.layers import MLP, Attention, ForwardContext, make_norm, positions_in_segments
from cairn.model.moe import MoE, load_balancing_loss
from cairn.model.rope import Rotary


class Block(nn.Module):
    """``x' = x + Attn(Norm(x))``; ``y = x' + FFN(Norm(x'))``, the FFN a dense MLP or a mixture of experts."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer) else MLP(cfg)

    def forward(self, x: torch.Tensor, rope, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, ctx)
        if isinstance(self.mlp, MoE):
            return x + self.mlp(self.mlp_norm(x), ctx.router_stats)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Embeddings, pre-norm blocks, final norm, (tied) head.

    FFN weight sharing (``cfg.ffn_share_group`` > 1): the layers of a group hold the *same* MLP module, so its
    parameters are one set of Parameter objects (``model.parameters()`` yields them once; ``state_dict()`` lists
    them under every layer's name). After each forward pass, ``model.aux_loss`` holds the MoE load-balancing
    loss of that pass (unweighted; a 0-d zero tensor for dense models): see ``cairn.model.moe``.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.check_runnable()
        self.cfg = cfg
        # An explicit weight skips nn.Embedding's random init: on the meta device that init pulls in torch._dynamo
        # (~2 s of imports) for values a loader replaces anyway; init_weights() initialises for training.
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model, _weight=torch.empty(cfg.vocab_size, cfg.d_model))
        if not self.embed.weight.is_meta:
            nn.init.normal_(self.embed.weight)  # nn.Embedding's own default
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        for group in cfg.ffn_share_groups():
            for i in group[1:]:
                self.layers[i].mlp = self.layers[group[0]].mlp
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rotary = Rotary(cfg)
        self.aux_loss: torch.Tensor = torch.zeros(())

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
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for ``tokens`` [B, T] at absolute ``positions`` [B, T] (default 0..T-1).

        With ``cache`` (see ``cairn.model.cache``), new keys/values are stored there and attention covers
        everything the cache returns. ``last_only`` computes logits for the last position only ([B, 1, V]).
        ``segments`` [B, T] (training on packed rows): the sequence id of each token; attention stays inside a
        sequence and positions restart at each (unless ``positions`` are given).
        """
        x = self.hidden(tokens, positions, cache, sinks, attn_probe, segments)
        if last_only:
            x = x[:, -1:]
        if self.head is None:
            return F.linear(x, self.embed.weight)
        return self.head(x)

    def hidden(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache=None,
        sinks: int = 0,
        attn_probe=None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normed hidden states [B, T, d_model] that the head turns into logits (``forward``'s
        arguments); for heads of other kinds, such as a reward model's scalar."""
        b, t = tokens.shape
        from_zero = False
        if positions is None and segments is not None:
            positions = positions_in_segments(segments)
        elif positions is None:
            start = getattr(cache, "length", 0) if cache is not None else 0
            positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
            from_zero = isinstance(start, int) and start == 0
        x = self.embed(tokens)
        rope = self.rotary(positions, x.dtype)
        ctx = ForwardContext(positions, cache, sinks=sinks, attn_probe=attn_probe, from_zero=from_zero,
                             segments=segments)
        ctx.router_stats = [] if self.cfg.n_experts else None
        for block in self.layers:
            x = block(x, rope, ctx)
        self.aux_loss = (
            load_balancing_loss(ctx.router_stats, self.cfg.n_experts) if ctx.router_stats else x.new_zeros(())
        )
        return self.norm(x)

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
