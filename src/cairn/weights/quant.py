"""Weight-only quantization for inference: int8 per output channel, int4 group-wise (G = 32/64/128).

``quantize_linear(weight, bias, mode)`` turns an fp32 weight into a module with the same ``forward(x)`` contract as
``nn.Linear``; the engine applies it to its fused projections and to the (possibly tied) output head
(``cairn.engine.runner.InferenceWeights``). The model's own parameters are left untouched, so its state dict
keeps its names for loading and export.

Kernels (PyTorch CPU ops; measured on a 2-core AVX2 EPYC, see docs/benchmarks.md):
- int8, ``kernel="fbgemm"`` (default): FBGEMM's int8 GEMM. It quantizes activations too (per tensor, 7-bit),
  which outlier channels make coarse; LLM.int8()-style decomposition keeps a few calibrated outlier input
  channels in fp32 (``outlier_channels``), which recovers most of the accuracy.
- int8, ``kernel="weight_only"``: ``torch._weight_int8pack_mm``, fp32 activations (accurate; slow on AVX2).
- int4, ``kernel="int4pack"`` (default): ``aten._weight_int4pack_mm_for_cpu`` with ``(scale, zero)`` per group,
  ``w = (q - 8) · scale + zero``: 4-bit storage, accurate, slow on AVX2 (no AVX-512 kernel to use).
- int4, ``kernel="fbgemm"``: weights rounded to int4 groups, executed by the int8 kernel.

A GGUF ``Q4_1`` block (32 weights, ``w = q · d + m``) is exactly an int4 group of 32 with ``scale = d`` and
``zero = m + 8d`` (``q4_1_blocks``, ``int4_from_q4_1``). ``quantize_int4(w, 32)`` of a Q4_1 GGUF's dequantized
weights finds exactly those blocks again (tested on the default model), so the engine quantizes from the fp32
weights and the result is the file's own 4-bit weights; reading blocks from the file would not be faster here
(PyTorch's int4 CPU kernel is slower than the fp32 matmul on AVX2).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from cairn.errors import CairnError

MODES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "fbgemm", "weight_only", "int4pack")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w ≈ q · scale[:, None]``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: ``w ≈ q · scale + minimum`` per group of ``group_size`` input columns.

    Returns ``q`` [N, K] (int32 values 0..15), ``scale`` and ``minimum`` [N, K / group_size].
    """
    n, k = w.shape
    if group_size not in GROUP_SIZES:
        raise CairnError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise CairnError(f"int4 with groups of {group_size} needs an input size divisible by it, got {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size)
    return (g * scale[..., None] + lo[..., None]).reshape(n, k)


class Int8Linear(nn.Module):
    """``y = x (q · s)ᵀ + b`` with int8 ``q`` [N, K] and fp32 ``s`` [N].

    ``kernel="fbgemm"`` (default, the fast one on x86): FBGEMM's int8 GEMM, which also quantizes each activation
    row on the fly (dynamic quantization, 7-bit range so AVX2 cannot saturate). ``kernel="weight_only"``:
    ``torch._weight_int8pack_mm`` keeps activations in fp32 (exact weight-only, but slow on AVX2-only CPUs).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str = "fbgemm",
                 outliers: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        # LLM.int8()-style decomposition: input channels ``idx`` bypass int8 and multiply fp32 columns ``w_out``
        self.outliers = outliers
        self._w_out_t = None if outliers is None else outliers[1].t().contiguous()
        if kernel not in ("fbgemm", "weight_only"):
            raise CairnError(f"unknown int8 kernel {kernel!r}: use 'fbgemm' or 'weight_only'")
        self.kernel = kernel
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else bias.float().contiguous()
        if kernel == "fbgemm":
            with warnings.catch_warnings():  # torch.ao's deprecation notice: the FBGEMM op itself stays
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    self.q, self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, kernel: str = "fbgemm",
                   outlier_channels: torch.Tensor | None = None) -> Int8Linear:
        """``outlier_channels``: input channels kept in fp32 (their weight columns leave the int8 matrix)."""
        if outlier_channels is None or len(outlier_channels) == 0:
            return cls(*quantize_int8(w), bias, kernel)
        idx = outlier_channels.sort().values
        rest = w.detach().clone()
        rest[:, idx] = 0
        return cls(*quantize_int8(rest), bias, kernel, (idx, w.detach()[:, idx].float().contiguous()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1])
        if dtype != torch.float32:
            x2 = x2.float()
        xo = None
        if self.outliers is not None:
            idx, w_out_t = self.outliers[0], self._w_out_t
            xo = x2.index_select(1, idx)
            x2 = x2.index_fill(1, idx, 0.0)
        if self.kernel == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x2, self._packed, True)
        else:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale)
            if self.bias is not None:
                y = y + self.bias
        if xo is not None:
            y = torch.addmm(y, xo, w_out_t)  # the fp32 outlier channels, added in the same call
        if len(shape) != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def dequantized(self) -> torch.Tensor:
        w = dequantize_int8(self.q, self.scale)
        if self.outliers is not None:
            w[:, self.outliers[0]] = self.outliers[1]
        return w


class Int4Linear(nn.Module):
    """Group-wise int4 weights packed for PyTorch's CPU int4 matmul."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        super().__init__()
        n, k = q.shape
        self.out_features, self.in_features, self.group_size = n, k, group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        # the kernel computes w = (q - 8) * scale + zero, so zero = lo + 8 * scale; layout [K / G, N, 2]
        sz = torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().float()
        self.register_buffer("scales_zeros", sz)
        self.bias = None if bias is None else bias.float()

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> Int4Linear:
        return cls(*quantize_int4(w, group_size), group_size, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).float(), self.packed, self.group_size, self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] the kernel multiplies by (the identity through the kernel)."""
        eye = torch.eye(self.in_features)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros).t()


def int4_from_q4_1(d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, bias: torch.Tensor | None = None) -> Int4Linear:
    """An ``Int4Linear`` from GGUF Q4_1 blocks: ``d``, ``m`` [N, K/32] and ``q`` [N, K] (0..15), with no rounding."""
    return Int4Linear(q, d.float(), m.float(), 32, bias)


def q4_1_blocks(raw, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack a GGUF Q4_1 tensor (blocks of 20 bytes: fp16 ``d``, fp16 ``m``, 16 bytes of nibbles; element ``j``
    is the low nibble of byte ``j``, element ``j + 16`` its high nibble) into ``(d, m, q)``."""
    import numpy as np

    b = np.asarray(raw, dtype=np.uint8).reshape(rows, cols // 32, 20)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].astype(np.float32)
    m = np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].astype(np.float32)
    qs = b[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols).astype(np.int32)
    return torch.from_numpy(d), torch.from_numpy(m), torch.from_numpy(q)


def quantize_linear(w: torch.Tensor, bias: torch.Tensor | None, mode: str, group_size: int = 32,
                    kernel: str = "auto", outlier_channels: torch.Tensor | None = None) -> nn.Module:
    """A module computing ``x wᵀ + b`` with ``w`` quantized as ``mode`` ("none" keeps fp weights).

    ``kernel``: int8 ``"auto"``/``"fbgemm"`` (fast, also quantizes activations) or ``"weight_only"`` (exact
    activations, slow on AVX2); int4 ``"auto"``/``"int4pack"`` (4-bit storage, PyTorch's int4 CPU matmul) or
    ``"fbgemm"`` (weights rounded to int4 groups, run through the int8 kernel: int4's values, int8's speed).
    ``outlier_channels`` (FBGEMM kernels): input channels computed in fp32 instead (see ``Int8Linear``).
    """
    if kernel not in KERNELS:
        raise CairnError(f"unknown kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    if mode == "int8":
        if kernel == "weight_only":
            return Int8Linear.from_float(w, bias, "weight_only")
        return Int8Linear.from_float(w, bias, "fbgemm", outlier_channels)
    if mode == "int4":
        if kernel == "fbgemm":
            w4 = dequantize_int4(*quantize_int4(w, group_size), group_size)
            return Int8Linear.from_float(w4, bias, "fbgemm", outlier_channels)
        return Int4Linear.from_float(w, bias, group_size)
    if mode == "none":
        return _Dense(w, bias)
    raise CairnError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")


def uses_dynamic_activations(mode: str, kernel: str) -> bool:
    """Whether the chosen kernel quantizes activations too (then outlier channels are worth keeping in fp32)."""
    return (mode == "int8" and kernel in ("auto", "fbgemm")) or (mode == "int4" and kernel == "fbgemm")


class _Dense(nn.Module):
    """``F.linear`` over a weight owned elsewhere (e.g. a view into a fused tensor)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = w, bias
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def check_mode(mode: str | None, group_size: int = 32) -> str:
    mode = mode or "none"
    if mode not in MODES:
        raise CairnError(f"unknown quantization {mode!r}: use --quantize int8 or --quantize int4")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise CairnError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    return mode
