"""Rotary position embeddings and their long-context scalings.

Each scaling computes inverse frequencies ``inv_freq`` (one per pair of head dimensions) and an attention factor
that multiplies cos and sin, exactly as HF ``transformers`` does for the ``rope_type`` of the same name:

- ``default``: ``ω_i = θ^(-2i/d)``; ``linear``: ``ω_i / factor`` (position interpolation);
- ``dynamic`` (NTK-aware): θ grows with the sequence length once it passes the original context;
- ``yarn``: interpolate low frequencies, keep high ones, ramp between; attention factor ``0.1 ln(s) + 1``;
- ``longrope``: per-frequency rescale ``ω_i / β_i`` with a short and a long set of factors;
- ``llama3``: divide low frequencies by ``factor``, keep high ones, smooth in between.
"""

from __future__ import annotations

import math

import torch

from cairn.config import ModelConfig


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_frequencies(cfg: ModelConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq, attention_factor)`` for a sequence of ``seq_len`` positions (only dynamic/longrope care)."""
    dim, theta, s = cfg.head_dim, cfg.rope_theta, cfg.rope_scaling
    if s is None or s.type == "default":
        return _base_inv_freq(theta, dim), 1.0
    if s.type == "linear":
        return _base_inv_freq(theta, dim) / s.factor, 1.0
    if s.type == "dynamic":
        orig = s.original_max_position_embeddings or cfg.max_seq_len  # HF's max_position_embeddings
        n = max(seq_len or orig, orig)
        base = theta * ((s.factor * n / orig) - (s.factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if s.type == "yarn":
        return _yarn(cfg), _yarn_attention_factor(cfg)
    if s.type == "longrope":
        orig = s.original_max_position_embeddings or cfg.max_seq_len
        factor = s.factor if s.factor is not None else cfg.max_seq_len / orig
        attn = s.attention_factor
        if attn is None:
            attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = s.long_factor if seq_len and seq_len > orig else s.short_factor
        if len(ext) != dim // 2:
            raise ValueError(f"longrope factors have {len(ext)} entries, expected head_dim/2 = {dim // 2}")
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (torch.tensor(ext, dtype=torch.float32) * theta**shape), attn
    if s.type == "llama3":
        inv = _base_inv_freq(theta, dim)
        old = s.original_max_position_embeddings or cfg.max_seq_len
        low_wl, high_wl = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / s.factor, inv)
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    raise ValueError(f"unknown rope type {s.type}")


def _yarn_attention_factor(cfg: ModelConfig) -> float:
    s = cfg.rope_scaling

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return float(mscale(s.factor, s.mscale) / mscale(s.factor, s.mscale_all_dim))
    return mscale(s.factor)


def _yarn(cfg: ModelConfig) -> torch.Tensor:
    s, dim, base = cfg.rope_scaling, cfg.head_dim, cfg.rope_theta
    orig = s.original_max_position_embeddings or cfg.max_seq_len
    beta_fast, beta_slow = s.beta_fast or 32, s.beta_slow or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.truncate is None or s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (s.factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


class Rotary(torch.nn.Module):
    """Turns absolute positions into the ``(cos, sin)`` tables that ``apply_rope`` uses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.dynamic = cfg.rope_scaling is not None and cfg.rope_scaling.type in ("dynamic", "longrope")
        with torch.device("cpu"):  # a plain fp32 attribute: unaffected by model.to(dtype) or the meta device
            self.inv_freq, self.attention_factor = rope_frequencies(cfg)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv, factor = self.inv_freq, self.attention_factor
        if self.dynamic:
            with torch.device("cpu"):
                inv, factor = rope_frequencies(self.cfg, int(positions.max()) + 1)
            inv = inv.to(positions.device)
        elif inv.device != positions.device:
            inv = self.inv_freq = inv.to(positions.device)
        freqs = positions.float()[..., None] * inv  # [B, T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * factor).to(dtype), (emb.sin() * factor).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by the tables [B, T, D] (the rotate-half pairing HF uses)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
