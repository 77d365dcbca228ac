"""The layers of the decoder: norms, the MLPs, attention and the mask it uses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cairn.config import ModelConfig
from cairn.model.rope import apply_rope


class RMSNorm(nn.Module):
    """``x / sqrt(mean(x²) + eps) · g``, computed in fp32 whatever the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return y * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


class MLP(nn.Module):
    """SwiGLU ``down(SiLU(gate x) ⊙ up x)`` or the classic ``down(GELU(up x))``."""

    def __init__(self, cfg: ModelConfig, d_ff: int | None = None):
        super().__init__()
        d_ff = d_ff or cfg.d_ff
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.mlp_bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x), approximate="tanh"))


def attention_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor | None, n_keys: int, window: int | None, sinks: int = 0,
    from_zero: bool = False,
) -> torch.Tensor | str | None:
    """The mask for queries at ``q_pos`` [B, T] over keys at ``k_pos`` [B, S] (None: keys are 0..S-1).

    Returns ``"causal"`` when plain causal attention is exact, ``None`` when every key is visible, else a
    boolean [B, 1, T, S] mask (True = attend). A key at position j is visible from position i when
    ``0 <= j <= i`` and, in a window W, ``j > i - W`` or ``j < sinks``. ``from_zero``: the caller built
    ``q_pos`` as 0..T-1 in every row, so it need not be checked (a check ``torch.compile`` cannot trace).
    """
    t = q_pos.shape[1]
    if k_pos is None:
        if window is None or n_keys <= window:
            if t == 1:
                return None
            if t == n_keys and (from_zero or bool((q_pos[:, 0] == 0).all())):
                return "causal"
        k_pos = torch.arange(n_keys, device=q_pos.device).expand(q_pos.shape[0], n_keys)
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    ok = (k <= q) & (k >= 0)
    if window is not None:
        near = k > q - window
        if sinks:
            near = near | (k < sinks)
        ok = ok & near
    return ok[:, None]


def segment_mask(segments: torch.Tensor, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """For rows packing several sequences (``segments`` [B, T]: the sequence id of each token, ``positions`` its
    position inside its sequence): a boolean [B, 1, T, T] mask letting a token see the earlier tokens of its own
    sequence only (and, in a window W, only the last W of them)."""
    t = segments.shape[1]
    idx = torch.arange(t, device=segments.device)
    ok = (idx[None, :, None] >= idx[None, None, :]) & (segments[:, :, None] == segments[:, None, :])
    if window is not None:
        ok = ok & (positions[:, None, :] > positions[:, :, None] - window)
    return ok[:, None]


def positions_in_segments(segments: torch.Tensor) -> torch.Tensor:
    """Each token's position inside its sequence: 0 where the segment id changes, counting up from there."""
    b, t = segments.shape
    idx = torch.arange(t, device=segments.device).expand(b, t)
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention through PyTorch's fused SDPA."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.window = cfg.window(layer)
        self.q = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.k = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=cfg.attn_out_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: ForwardContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        k_pos = None
        if ctx.cache is not None:
            k, v, k_pos = ctx.cache.update(self.layer, k, v, ctx.positions)
        mask = ctx.mask(self.layer, self.window, k_pos, k.shape[2])
        gqa = self.n_heads != self.n_kv_heads
        if isinstance(mask, str):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if ctx.attn_probe is not None:
            ctx.attn_probe(self.layer, q, k, mask)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class ForwardContext:
    """What one forward pass shares across layers: positions, the cache, and masks built once per window."""

    def __init__(self, positions: torch.Tensor, cache=None, sinks: int = 0, attn_probe=None,
                 from_zero: bool = False, segments: torch.Tensor | None = None):
        self.positions = positions
        self.segments = segments  # [B, T] sequence ids of packed rows (training): attention stays inside each
        self.from_zero = from_zero  # positions are 0..T-1 in every row (built so by the caller)
        self.cache = cache
        self.sinks = sinks
        self.attn_probe = attn_probe
        self.router_stats: list | None = None  # MoE layers append their routing statistics here
        self._masks: dict = {}

    def mask(self, layer: int, window: int | None, k_pos: torch.Tensor | None, n_keys: int):
        per_layer = getattr(self.cache, "per_layer_positions", False)
        key = (layer if per_layer else None, window, n_keys)
        if key not in self._masks and self.segments is not None:
            if self.cache is not None:
                raise ValueError("packed segments are for training forward passes, not with a KV cache")
            self._masks[key] = segment_mask(self.segments, self.positions, window)
        if key not in self._masks:
            self._masks[key] = attention_mask(self.positions, k_pos, n_keys, window, self.sinks, self.from_zero)
        return self._masks[key]
