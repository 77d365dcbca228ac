"""Mixture of experts: a top-k softmax router over E experts (SwiGLU, or GELU like the config's MLP), optional
shared experts, and the load-balancing statistics the auxiliary loss is computed from.

Numerically the same as HF's Mixtral and Qwen2-MoE blocks: ``p = softmax(x Wr)`` over all experts, the top-k
experts by ``p`` are run, and their outputs are summed with weights ``p_topk`` (renormalised to sum to 1 when
``norm_topk_prob``). Shared experts (fused into one MLP, as DeepSeek does) see every token; Qwen2-MoE gates their
output with ``sigmoid(x · w)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cairn.config import ModelConfig
from cairn.model.layers import MLP


class Experts(nn.Module):
    """E experts stored as 3-D tensors: ``gate``, ``up`` [E, F, D] and ``down`` [E, D, F]; SwiGLU like the dense
    MLP, or ``down(GELU(up x))`` (no ``gate``) when the config's MLP is GELU."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, swiglu: bool = True):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(n_experts, d_ff, d_model)) if swiglu else None
        self.up = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.down = nn.Parameter(torch.empty(n_experts, d_model, d_ff))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``x`` [N, D]; ``idx``, ``weights`` [N, k]: the experts each token goes to and their weights."""
        out = torch.zeros_like(x)
        for e in idx.unique().tolist():
            token, slot = torch.where(idx == e)
            h = x[token]
            if self.gate is not None:
                h = F.silu(F.linear(h, self.gate[e])) * F.linear(h, self.up[e])
            else:
                h = F.gelu(F.linear(h, self.up[e]), approximate="tanh")
            h = F.linear(h, self.down[e])
            out.index_add_(0, token, (h * weights[token, slot, None]).to(out.dtype))
        return out


class MoE(nn.Module):
    """Router + routed experts (+ shared experts): the FFN of a MoE layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts, self.top_k, self.norm_topk = cfg.n_experts, cfg.experts_per_token, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.d_model, cfg.n_experts, bias=False)
        self.experts = Experts(cfg.n_experts, cfg.d_model, cfg.moe_d_ff, swiglu=cfg.mlp == "swiglu")
        self.shared = None
        self.shared_gate = None
        if cfg.n_shared_experts:
            self.shared = MLP(cfg, d_ff=cfg.n_shared_experts * cfg.shared_expert_d_ff)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, stats: list | None = None) -> torch.Tensor:
        """``x`` [B, T, D]. When ``stats`` is a list, append this layer's routing statistics to it."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        y = self.experts(x, top_i, top_p.to(x.dtype))
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate(x)) * s
            y = y + s
        if stats is not None:
            counts = torch.zeros(self.n_experts, device=x.device).index_add_(
                0, top_i.reshape(-1), torch.ones(top_i.numel(), device=x.device)
            )
            stats.append((counts, probs.sum(dim=0), x.shape[0]))
        return y.reshape(shape)


def load_balancing_loss(stats: list, n_experts: int) -> torch.Tensor:
    """Switch-Transformer load balancing ``E · Σ_e f_e · P_e`` pooled over every MoE layer of a forward pass.

    ``f_e``: the share of (token, slot) assignments that went to expert e, ``P_e``: its mean router probability,
    both averaged over all tokens of all MoE layers (as HF's ``load_balancing_loss_func`` does). Its value is
    ``k`` for perfectly balanced routing; training adds ``router_aux_loss_coef ×`` it to the loss.
    """
    counts = sum(c for c, _, _ in stats)
    probs = sum(p for _, p, _ in stats)
    rows = sum(n for _, _, n in stats)
    return n_experts * torch.sum((counts / rows) * (probs / rows))
