"""Weight-only quantization for inference: int8 per output channel, int4 group-wise (G = 32/64/128).

``quantize_linear(weight, bias, mode)`` turns an fp32 weight into a module with the same ``forward(x)`` contract as
``nn.Linear``; the engine applies it to its fused projections and to the (possibly tied) output head
(``cairn.engine.runner.InferenceWeights``). The model's own parameters are left untouched, so its state dict
keeps its names for loading and export.

Batch-1 decode multiplies each weight matrix by one row, which is memory-bound: the fewer bytes per weight, the
faster. Batched decode (a few to tens of rows) is compute-bound. cairn's own kernels (``cairn.kernels``,
``qgemm.c``) serve both: 4-bit (``Q4Linear``, GGUF Q4_1's numbers) and 8-bit (``Q8Linear``, GGUF Q8_0's) weights
in column tiles, activations quantized per group of 32 (int8 for 4-bit weights, as llama.cpp does; int16 for 8-bit
ones). Prompt chunks are where activation rounding costs the most (the prompt's KV is read by every later token):
with int8 activations in prompts, the default model's greedy answer to "What is the capital of France?" turns
from "The capital of France is Paris." into "L'Étoile, la Mar…" (llama.cpp, which rounds them to 8 bits too,
answers the same). So prompts never get 8-bit activations by default, and the "auto" kernels pick per step
(``ByStep``):

- int8 ``"auto"``: decode steps, ``Q8Linear`` with one scale per output channel; steps with prompt chunks, the
  model's own fp32 weights.
- int4 ``"auto"``: decode steps, ``Q4Linear``; steps with prompt chunks of up to ``PROMPT_Q4_ROWS`` rows,
  ``Q4Linear`` with int16 activations (``PromptQ4``: few rows are memory-bound, and 5-bit weights read ~6x fewer
  bytes than fp32 ones; for many rows the kernel widens each tile's codes to int16 once and its 16-bit
  multiply-adds outpace PyTorch's fp32 matmul, 1.5-2.0x at 16-42 rows, 1.01-1.24x at 128-512:
  ``benchmarks/bench_kernels.py``), longer ones the model's own fp32 weights (even with it from ~1,000 rows). For a Q4_1
  GGUF's model the fp32 weights are exactly the int4 values, so both give the same product but for the int16
  rounding of activations (prompt perplexity on a fixed text: 25.773 -> 25.775). The output head stays at 8 bits
  (``Q8Linear`` in groups of 32, as Q4 GGUF files store it).
  If cairn's kernels cannot be built (no C compiler), decode steps use PyTorch's: FBGEMM for batches, and for int8
  at batch 1 ``torch._weight_int8pack_mm`` on bf16 activations (the one activation type PyTorch vectorizes for it
  on AVX2); a warning says why.
- ``"native"``: cairn's kernel for every step (an error if it cannot be built); for int4 prompts too, with int8
  activations: llama.cpp's trade, ~1.6x faster prompts than fp32, and the France answer above.
- ``"fbgemm"``: FBGEMM's int8 GEMM for every step. It quantizes activations too (7-bit, one scale per row here),
  which outlier channels make coarse; LLM.int8()-style decomposition keeps a few calibrated outlier input
  channels in fp32 (``outlier_channels``), which recovers most of the accuracy. For int4, the int4 values run in it.
- int8 ``"weight_only"``: ``torch._weight_int8pack_mm`` with fp32 activations for every step (exact; slow on AVX2).
- int4 ``"int4pack"``: ``aten._weight_int4pack_mm_for_cpu`` with ``(scale, zero)`` per group,
  ``w = (q - 8) · scale + zero``: 4-bit storage, accurate, slow on AVX2 (no AVX-512 kernel to use).

Quantizing a model's fp32 weights keeps them resident (the engine's prefill tier and ``cairn.model`` use them):
that buys decode speed, not memory. A GGUF file's Q4_1 and Q8_0 matrices need no fp32 copy at all: loaded with
``load_model(quantized=True)`` they stay the file's blocks, ``linear_from_blocks`` moves their bytes into the tiles
(``Q4Linear.from_blocks``, ``Q8Linear.from_blocks``), and the fp32 tier dequantizes the tiles when a step needs it
(``_Dequantizing``): the same numbers, bit for bit, at 5 and 8.5 bits a weight.

A GGUF ``Q4_1`` block (32 weights, ``w = q · d + m``) is exactly an int4 group of 32 with ``scale = d`` and
``zero = m + 8d`` (``q4_1_blocks``, ``int4_from_q4_1``). ``quantize_int4(w, 32)`` of a Q4_1 GGUF's dequantized
weights finds exactly those blocks again, fp16 scales and minima included (tested on the default model), so an
engine that quantizes the fp32 weights gets the file's own 4-bit weights, 5 bits a weight in ``Q4Linear``'s tiles,
which is what ``Q4Linear.from_blocks`` gets from the blocks directly (tested bit for bit).
"""

from __future__ import annotations

import functools
import logging
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from cairn.errors import CairnError

MODES = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "fbgemm", "weight_only", "native", "int4pack")
WEIGHT_ONLY_ROWS = 2  # int8 "auto" without cairn's kernels: steps with at most this many rows use weight-only int8
NATIVE_ROWS = 4  # ByStep's small tier when cairn's kernel takes every decode step (its batch tier is the same)
PROMPT_Q4_ROWS = 512  # int4 prompt chunks up to this many rows: 4-bit tiles, int16 activations (fp32 beyond)

log = logging.getLogger("cairn.quant")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``w ≈ q · scale[:, None]``."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale[:, None]


def quantize_int4(w: torch.Tensor, group_size: int = 32, fp16: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: ``w ≈ q · scale + minimum`` per group of ``group_size`` input columns.

    Returns ``q`` [N, K] (int32 values 0..15), ``scale`` and ``minimum`` [N, K / group_size]. ``fp16``: scales
    and minima rounded to fp16 first (as GGUF Q4_1 stores them), the codes computed from the rounded values.
    """
    n, k = w.shape
    if group_size not in GROUP_SIZES:
        raise CairnError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise CairnError(f"int4 with groups of {group_size} needs an input size divisible by it, got {k}")
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    if fp16:
        lo, scale = lo.half().float(), scale.half().float().clamp(min=2.0**-24)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = q.shape
    g = q.float().reshape(n, k // group_size, group_size)
    return (g * scale[..., None] + lo[..., None]).reshape(n, k)


class Int8Linear(nn.Module):
    """``y = x (q · s)ᵀ + b`` with int8 ``q`` [N, K] and fp32 ``s`` [N].

    ``kernel="fbgemm"``: FBGEMM's int8 GEMM, which also quantizes each activation row on the fly (dynamic
    quantization, 7-bit range so AVX2 cannot saturate), here with one scale per row; only the packed weights are
    kept. ``"weight_only"``:
    ``torch._weight_int8pack_mm`` with fp32 activations (exact, slow on AVX2-only CPUs). ``"weight_only_bf16"``:
    the same op on bf16 activations, the path PyTorch vectorizes on AVX2 (fast for a few rows; the output is
    rounded to bf16 before it returns as fp32).
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, kernel: str = "fbgemm",
                 outliers: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        # LLM.int8()-style decomposition: input channels ``idx`` bypass int8 and multiply fp32 columns ``w_out``
        self.outliers = outliers
        self._w_out_t = None if outliers is None else outliers[1].t().contiguous()
        if kernel not in ("fbgemm", "weight_only", "weight_only_bf16"):
            raise CairnError(f"unknown int8 kernel {kernel!r}: use 'fbgemm' or 'weight_only'")
        self.kernel = kernel
        self.out_features, self.in_features = q.shape
        self.register_buffer("scale", scale.float().contiguous())
        self.bias = None if bias is None else bias.float().contiguous()
        if kernel == "fbgemm":
            with warnings.catch_warnings():  # torch.ao's deprecation notice: the FBGEMM op itself stays
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(
                    q.contiguous(), self.scale.double(), torch.zeros(self.out_features, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(qw, None)  # bias added after the row scales
            self.q = None
        else:
            self.register_buffer("q", q.contiguous())
            self._scale_bf16 = self.scale.to(torch.bfloat16)

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
        if self.kernel == "weight_only_bf16" and self.outliers is None:  # the batch-1 decode path: fewest ops
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self._scale_bf16).float()
            if self.bias is not None:
                y = y + self.bias
            return y.view(*shape[:-1], self.out_features) if len(shape) != 2 else y
        if dtype != torch.float32:
            x2 = x2.float()
        xo = None
        if self.outliers is not None:
            idx = self.outliers[0]
            xo = x2.index_select(1, idx)
            x2 = x2.index_fill(1, idx, 0.0)  # a copy: the in-place scaling below may use it
        elif self.kernel == "fbgemm":
            x2 = x2.clone()
        if self.kernel == "fbgemm":
            # FBGEMM quantizes the whole [M, K] input with one scale; one row with huge activations (a prompt's
            # first token often has them) would leave the others a few levels. Scaling each row to max |x| = 1
            # first, and back after, gives every row its own scale (the product is linear in each row).
            amax = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-30)
            y = torch.ops.quantized.linear_dynamic(x2.div_(amax), self._packed, True).mul_(amax)
        elif self.kernel == "weight_only_bf16":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.q, self._scale_bf16).float()
        else:
            y = torch._weight_int8pack_mm(x2, self.q, self.scale)
        if self.bias is not None:
            y = y + self.bias
        if xo is not None:
            y = y.addmm_(xo, self._w_out_t)  # the fp32 outlier channels
        if len(shape) != 2:
            y = y.reshape(*shape[:-1], self.out_features)
        return y if dtype == torch.float32 else y.to(dtype)

    def fused(self, x: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None, swiglu: bool = False,
              out: torch.Tensor | None = None) -> torch.Tensor:
        """``x [M, K]`` times the weights with an RMSNorm (``norm=(g, eps)``) or SwiGLU (``x`` is [M, 2K]) first,
        and the product added into ``out`` when given: ``Q4Linear.fused``'s contract. With FBGEMM, cairn's
        ``rows.c`` does the norm, the outlier split and the row scales in one pass."""
        fn = _rows_kernel() if self.kernel == "fbgemm" else None
        if fn is None:
            if norm is not None:
                x = F.rms_norm(x.float(), (x.shape[-1],), norm[0], norm[1])
            elif swiglu:
                gate, up = x.chunk(2, dim=-1)
                x = F.silu(gate) * up
            y = self.forward(x)
            return y if out is None else out.add_(y)
        x = x.float().contiguous()
        rows, k = x.shape[0], self.in_features
        if x.shape[1] != (2 * k if swiglu else k):
            raise ValueError(f"Int8Linear: input has {x.shape[1]} columns, expected {2 * k if swiglu else k}")
        idx = None if self.outliers is None else self.outliers[0]
        n_out = 0 if idx is None else idx.numel()
        xs, amax = torch.empty(rows, k), torch.empty(rows, 1)
        xo = torch.empty(rows, n_out) if n_out else None
        prologue, g, eps = (1, norm[0].data_ptr(), norm[1]) if norm is not None else (2 if swiglu else 0, None, 0.0)
        if fn(x.data_ptr(), rows, k, prologue, g, eps, None if idx is None else idx.data_ptr(), n_out, xs.data_ptr(),
              None if xo is None else xo.data_ptr(), amax.data_ptr()):
            raise MemoryError("the activation pass could not allocate its scratch buffer")
        y = torch.ops.quantized.linear_dynamic(xs, self._packed, True)
        if out is None:
            out = y.mul_(amax)
        else:
            out.addcmul_(y, amax)
        if self.bias is not None:
            out.add_(self.bias)
        if xo is not None:
            out.addmm_(xo, self._w_out_t)
        return out

    def int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, scale)`` as multiplied (unpacked from FBGEMM's layout when that kernel holds them)."""
        if self.q is not None:
            return self.q, self.scale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw, _ = torch.ops.quantized.linear_unpack(self._packed)
        return qw.int_repr(), self.scale

    def nbytes(self) -> int:
        n = self.out_features * self.in_features + self.scale.numel() * 4
        return n + (0 if self.outliers is None else self.outliers[1].numel() * 4)

    def dequantized(self) -> torch.Tensor:
        w = dequantize_int8(*self.int8_weight())
        if self.outliers is not None:
            w[:, self.outliers[0]] = self.outliers[1]
        return w


class _Tiled(nn.Module):
    """Weights in ``qgemm.c``'s column tiles, run by cairn's own kernel (``cairn.kernels``), which quantizes
    activations per group of 32 (int8 for ``Q4Linear``, int16 for ``Q8Linear``). One kernel for every step size:
    batch-1 decode reads the fewest bytes, and batches reuse each unpacked weight vector for several rows (6 for
    ``Q4Linear``, 4 for ``Q8Linear``)."""

    def __init__(self, tiles: torch.Tensor, out_features: int, in_features: int, bias: torch.Tensor | None, fn,
                 wide_fn=None):
        super().__init__()
        self._fn, self._wide_fn = fn, wide_fn or fn
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("tiles", tiles)
        self.bias = None if bias is None else bias.float().contiguous()
        self._ptrs = None

    def _apply(self, fn, recurse=True):  # .to()/.float() may move the buffers: take their addresses again
        self._ptrs = None
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, wide: bool = False) -> torch.Tensor:
        shape = x.shape
        y = self.fused(x.reshape(-1, shape[-1]), wide=wide)
        if len(shape) != 2:
            y = y.view(*shape[:-1], self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def fused(self, x: torch.Tensor, norm: tuple[torch.Tensor, float] | None = None, swiglu: bool = False,
              out: torch.Tensor | None = None, wide: bool = False) -> torch.Tensor:
        """``x [M, K]`` (fp32) times the weights, with the kernel's fused prologue and epilogue:

        ``norm=(g, eps)``: RMSNorm of each row first; ``swiglu``: ``x`` is [M, 2K] and ``silu(x[:, :K]) ·
        x[:, K:]`` is multiplied; ``out``: the product is added into this fp32 [M, N] tensor (a residual stream),
        which is returned; ``wide``: int16 activations (``Q8Linear`` always has them).
        """
        w, b, n, k = self._addresses()
        if x.dtype != torch.float32 or not x.is_contiguous():
            x = x.float().contiguous()
        rows = x.shape[0]
        if x.shape[1] != (2 * k if swiglu else k):
            raise ValueError(f"{type(self).__name__}: input has {x.shape[1]} columns, expected "
                             f"{2 * k if swiglu else k}")
        if out is None:
            y = torch.empty(rows, n)
        else:
            if out.shape != (rows, n) or out.dtype != torch.float32 or not out.is_contiguous():
                raise ValueError(f"{type(self).__name__}: out must be a contiguous fp32 [{rows}, {n}] tensor")
            y = out
        if rows == 0:
            return y
        prologue, g, eps = (1, norm[0].data_ptr(), norm[1]) if norm is not None else (2 if swiglu else 0, None, 0.0)
        if (self._wide_fn if wide else self._fn)(x.data_ptr(), w, b, y.data_ptr(), rows, n, k,
                                                 torch.get_num_threads(), prologue, g, eps, out is not None):
            raise MemoryError(f"{type(self).__name__}: the kernel could not allocate its scratch buffers")
        return y

    def _addresses(self) -> tuple[int, int | None, int, int]:
        """The tiles' and the bias' addresses (None: no bias) and the output and input sizes, taken once (a call
        per decode step per matrix adds up)."""
        if self._ptrs is None:
            b = self.bias
            self._ptrs = (self.tiles.data_ptr(), None if b is None else b.data_ptr(), self.out_features,
                          self.in_features)
        return self._ptrs

    def c_args(self) -> tuple[int, int, int | None, int, int]:
        """For a C caller of the decode kernel (``step.c``): the address of its team entry point, then what
        ``fused`` passes it (tiles, bias, output and input sizes)."""
        from cairn.kernels import team_address

        return (team_address(self._fn), *self._addresses())

    def nbytes(self) -> int:
        return self.tiles.numel()


class Q4Linear(_Tiled):
    """4-bit weights in groups of 32, ``w = q · d + m`` with fp16 ``d`` and ``m``: GGUF Q4_1's numbers (a Q4_1
    file's blocks are stored as they are, 5 bits a weight), in ``qgemm.c``'s tiles (``cairn.kernels.pack_q4``).
    Groups of 64/128 are stored as 2/4 groups of 32 with the same scale and minimum."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None):
        from cairn.kernels import pack_q4, q4_kernel, q4w_kernel

        fn = q4_kernel()  # build or load it now: a missing compiler is reported at load, not mid-request
        rep = group_size // 32
        super().__init__(pack_q4(q, scale.repeat_interleave(rep, dim=1), lo.repeat_interleave(rep, dim=1)),
                         q.shape[0], q.shape[1], bias, fn, q4w_kernel())

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = 32) -> Q4Linear:
        return cls(*quantize_int4(w, group_size, fp16=True), group_size, bias)

    @classmethod
    def from_blocks(cls, parts: list[torch.Tensor], bias: torch.Tensor | None = None) -> Q4Linear:
        """From GGUF Q4_1 blocks, uint8 [N, K/32, 20] (several: their rows one after another), as they are: what
        ``from_float`` of their dequantized weights gives, without the fp32 weights."""
        from cairn.kernels import pack_q4_1_blocks, q4_kernel, q4w_kernel

        self = cls.__new__(cls)
        _Tiled.__init__(self, pack_q4_1_blocks(*parts), sum(p.shape[0] for p in parts), parts[0].shape[1] * 32,
                        bias, q4_kernel(), q4w_kernel())
        return self

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight [N, K] these codes stand for (the kernel also rounds activations: see ``qgemm.c``)."""
        from cairn.kernels import unpack_q4

        q, d, m = unpack_q4(self.tiles, self.out_features)
        n, k = q.shape
        return (q.float().view(n, k // 32, 32) * d[..., None] + m[..., None]).view(n, k)


class Q8Linear(_Tiled):
    """8-bit weights in groups of 32, ``w = q · d`` with an fp16 ``d``: GGUF Q8_0's numbers (8.5 bits a weight),
    in ``qgemm.c``'s tiles (``cairn.kernels.pack_q8``); activations are quantized per group of 32 too, so no
    outlier channel needs special care."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        from cairn.kernels import pack_q8, q8_kernel

        fn = q8_kernel()
        super().__init__(pack_q8(q, scale), q.shape[0], q.shape[1], bias, fn)

    @classmethod
    def from_blocks(cls, parts: list[torch.Tensor], bias: torch.Tensor | None = None) -> Q8Linear:
        """From GGUF Q8_0 blocks, uint8 [N, K/32, 34] (several: their rows one after another), as they are: what
        ``from_float`` of their dequantized weights gives (``quantize_q8`` finds each block's codes and fp16 scale
        again), without the fp32 weights."""
        from cairn.kernels import pack_q8_0_blocks, q8_kernel

        self = cls.__new__(cls)
        _Tiled.__init__(self, pack_q8_0_blocks(*parts), sum(p.shape[0] for p in parts), parts[0].shape[1] * 32,
                        bias, q8_kernel())
        return self

    @classmethod
    def from_float(cls, w: torch.Tensor, bias: torch.Tensor | None = None, per_channel: bool = False) -> Q8Linear:
        """``per_channel``: one scale per output channel (``--quantize int8``), stored in every group; else one
        per group of 32."""
        return cls(*quantize_q8(w, per_channel), bias)

    def dequantized(self) -> torch.Tensor:
        from cairn.kernels import unpack_q8

        q, d = unpack_q8(self.tiles, self.out_features)
        n, k = q.shape
        return (q.float().view(n, k // 32, 32) * d[..., None]).view(n, k)


def quantize_q8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with fp16-representable scales, one per group of 32 input columns (GGUF Q8_0) or, with
    ``per_channel``, one per output channel (repeated for each group): ``w ≈ q · d``, ``q`` int8 [N, K] in
    -127..127, ``d`` [N, K/32]."""
    n, k = w.shape
    if k % 32:
        raise CairnError(f"8-bit groups of 32 need an input size divisible by 32, got {k}")
    g = w.float().reshape(n, k // 32, 32)
    amax = g.abs().amax(dim=-1)
    if per_channel:
        amax = amax.amax(dim=-1, keepdim=True).expand(n, k // 32)
    d = (amax / 127.0).half().float()
    q = torch.round(g / torch.where(d > 0, d, torch.ones_like(d))[..., None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


class ByStep(nn.Module):
    """One matrix, three kernels, picked per step: ``small`` for decode steps of at most ``small_rows`` rows
    (memory-bound), ``batch`` for larger decode steps, ``prefill`` for steps that carry prompt chunks.

    ``batch`` may be given as a function that builds it: then it is built the first time a step needs it (FBGEMM
    packing and outlier calibration take ~1.7 s on the default model, which a one-request CLI never needs).
    ``pick(rows, prefill)`` gives the chosen kernel's ``forward`` (the engine's runner picks once per step);
    calling the module picks by rows alone, as a decode step would.
    """

    def __init__(self, small: nn.Module | None, small_rows: int, batch, prefill: nn.Module):
        super().__init__()
        self.small, self.prefill = small, prefill
        self.small_rows = small_rows if small is not None else 0
        self.out_features, self.in_features = prefill.out_features, prefill.in_features
        if isinstance(batch, nn.Module):
            self.batch, self._make_batch = batch, None
        else:
            self.batch, self._make_batch = None, batch
            if small is None:  # the batch kernel is the decode kernel too: build it now
                self._build()

    def _build(self) -> nn.Module:
        with _BUILD_LOCK:
            if self.batch is None:
                self.batch = self._make_batch()
                self._make_batch = None
        return self.batch

    def decode_module(self, rows: int) -> nn.Module:
        """The module that runs a decode step of ``rows`` rows (the batch kernel built if it is not yet)."""
        if rows <= self.small_rows:
            return self.small
        return self.batch or self._build()

    def pick(self, rows: int, prefill: bool = False):
        return self.prefill.forward if prefill else self.decode_module(rows).forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pick(x.numel() // x.shape[-1])(x)

    def nbytes(self) -> int:
        """Bytes of the quantized copies built so far (the fp32 prefill kernel is a view of the model's own
        weights)."""
        mods = {id(m): m for m in (self.small, self.batch) if m is not None}
        return sum(m.nbytes() for m in mods.values())

    def dequantized(self) -> torch.Tensor:
        return (self.small or self.batch or self._build()).dequantized()


_BUILD_LOCK = threading.RLock()


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

    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 4

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
                    kernel: str = "auto", outlier_channels: torch.Tensor | None = None,
                    int8_groups: bool = False) -> nn.Module:
    """A module computing ``x wᵀ + b`` with ``w`` quantized as ``mode`` ("none" keeps fp weights).

    ``kernel``: see the module docstring. int8: ``"auto"``, ``"native"``, ``"fbgemm"``, ``"weight_only"``; int4:
    ``"auto"``, ``"native"``, ``"fbgemm"``, ``"int4pack"``. ``outlier_channels`` (FBGEMM paths): input channels
    computed in fp32 instead (see ``Int8Linear``), or a function returning them (called when the FBGEMM kernel is
    built). ``int8_groups``: int8 with one scale per group of 32 (GGUF Q8_0) rather than per output channel (the
    output head of an int4 model, as Q4 GGUF files store it).
    """
    if kernel not in KERNELS:
        raise CairnError(f"unknown kernel {kernel!r}: use one of {', '.join(KERNELS)}")
    if mode == "int8":
        if kernel == "int4pack":
            raise CairnError("kernel 'int4pack' is an int4 kernel: for int8 use 'auto', 'native', 'fbgemm' or "
                             "'weight_only'")
        if kernel == "weight_only":
            return Int8Linear.from_float(w, bias, "weight_only")
        if kernel == "fbgemm":
            return Int8Linear.from_float(w, bias, "fbgemm", _channels(outlier_channels))
        if kernel == "native":
            return Q8Linear.from_float(w, bias, per_channel=not int8_groups)
        # cairn's kernel works in groups of 32 inputs; other widths take PyTorch's int8 kernels
        native = None if w.shape[1] % 32 else native_or_none(
            lambda: Q8Linear.from_float(w, bias, per_channel=not int8_groups))
        if native is not None:
            return ByStep(native, NATIVE_ROWS, native, _Dense(w, bias))
        return ByStep(Int8Linear.from_float(w, bias, "weight_only_bf16"), WEIGHT_ONLY_ROWS,
                      lambda: Int8Linear.from_float(w, bias, "fbgemm", _channels(outlier_channels)), _Dense(w, bias))
    if mode == "int4":
        if kernel == "weight_only":
            raise CairnError("kernel 'weight_only' is an int8 kernel: for int4 use 'auto', 'native', 'fbgemm' or "
                             "'int4pack'")
        if kernel == "int4pack":
            return Int4Linear.from_float(w, bias, group_size)
        q, scale, lo = quantize_int4(w, group_size, fp16=True)
        if kernel == "native":
            return Q4Linear(q, scale, lo, group_size, bias)
        if kernel == "fbgemm":
            return Int8Linear.from_float(dequantize_int4(q, scale, lo, group_size), bias, "fbgemm",
                                         _channels(outlier_channels))
        native = native_or_none(lambda: Q4Linear(q, scale, lo, group_size, bias))
        if native is not None:
            return ByStep(native, NATIVE_ROWS, native, PromptQ4(native, _Dense(w, bias), PROMPT_Q4_ROWS))
        w4 = dequantize_int4(q, scale, lo, group_size)
        return ByStep(None, 0, lambda: Int8Linear.from_float(w4, bias, "fbgemm", _channels(outlier_channels)),
                      _Dense(w, bias))
    if mode == "none":
        return _Dense(w, bias)
    raise CairnError(f"unknown quantization {mode!r}: use one of {', '.join(MODES)}")


def linear_from_blocks(parts: list, bias: torch.Tensor | None, kernel: str = "auto") -> nn.Module:
    """``quantize_linear``'s module for a matrix held as GGUF blocks (``cairn.weights.gguf.Blocks``, the rows of
    several ``parts`` one after another, as a fused QKV's) whose numbers are the ones that call would find in their
    dequantized weights: Q4_1 for int4 with groups of 32, Q8_0 for an int4 model's 8-bit head. ``kernel`` "native"
    or "auto" (cairn's kernels must be available); the fp32 product that "auto" takes for long prompts dequantizes
    the codes when it runs (``_Dequantizing``), so no fp32 copy of the weights is kept. The parts' bytes are kept
    once: in the kernel's tiles (each part ``rehome``d there)."""
    from cairn.kernels import unpack_q4_1_blocks, unpack_q8_0_blocks

    if kernel not in ("auto", "native"):
        raise CairnError(f"GGUF blocks run on cairn's kernels ('auto' or 'native'), not {kernel!r}")
    kind = parts[0].kind
    if any(p.kind != kind for p in parts):
        raise CairnError(f"a fused matrix mixes GGUF block types {sorted({p.kind for p in parts})}")
    data = [p.data for p in parts]
    native = Q4Linear.from_blocks(data, bias) if kind == "Q4_1" else Q8Linear.from_blocks(data, bias)
    unpack, start = unpack_q4_1_blocks if kind == "Q4_1" else unpack_q8_0_blocks, 0
    for p, d in zip(parts, data, strict=True):
        p.rehome(functools.partial(_part_rows, unpack, native.tiles, start, d.shape[0]))
        start += d.shape[0]
    if kernel == "native":
        return native
    dense = _Dequantizing(native, bias)
    return ByStep(native, NATIVE_ROWS, native, PromptQ4(native, dense, PROMPT_Q4_ROWS) if kind == "Q4_1" else dense)


def _part_rows(unpack, tiles: torch.Tensor, start: int, n: int, index: torch.Tensor | None) -> torch.Tensor:
    """Rows ``index`` (all ``n`` for None) of a part that starts at row ``start`` of ``tiles``, as GGUF blocks."""
    rows = torch.arange(n) if index is None else torch.as_tensor(index).reshape(-1)
    return unpack(tiles, rows + start)


class _Dequantizing(nn.Module):
    """``F.linear`` over the fp32 weights of a ``Q4Linear``/``Q8Linear``, dequantized for each call (the same
    values, bit for bit, as the dequantized GGUF blocks it was built from), for the steps that multiply in fp32."""

    def __init__(self, codes: _Tiled, bias: torch.Tensor | None):
        super().__init__()
        self.codes, self.bias = codes, bias
        self.out_features, self.in_features = codes.out_features, codes.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.codes.dequantized().to(x.dtype), self.bias)

    def nbytes(self) -> int:
        return 0  # (the codes' module counts the bytes)


def _rows_kernel():
    """cairn's activation pass for FBGEMM, or None (PyTorch ops then) when it cannot be built here."""
    from cairn.kernels import KernelUnavailable, rows_kernel

    try:
        return rows_kernel()
    except KernelUnavailable:
        return None


def _channels(outlier_channels):
    """Outlier channels given as a tensor, None, or a function computing them (calibration run on demand)."""
    return outlier_channels() if callable(outlier_channels) else outlier_channels


def native_or_none(make):
    """``make()`` (a ``Q4Linear`` or ``Q8Linear``), or None (with one warning saying why) when cairn's kernel
    cannot be built here."""
    from cairn.kernels import KernelUnavailable

    try:
        return make()
    except KernelUnavailable as e:
        if not getattr(native_or_none, "_warned", False):
            log.warning("cairn's quantized kernels are unavailable (%s): decode steps use PyTorch's int8 kernels "
                        "(FBGEMM; weight-only for int8 at batch 1)", e)
            native_or_none._warned = True
        return None


def uses_dynamic_activations(mode: str, kernel: str) -> bool:
    """Whether some step runs a kernel that quantizes activations per tensor (FBGEMM), so that calibrated outlier
    channels are worth keeping in fp32."""
    return kernel in ("auto", "fbgemm") and mode in ("int8", "int4")


class PromptQ4(nn.Module):
    """A prompt chunk's product for int4 weights: up to ``rows`` rows through ``Q4Linear``'s tiles with int16
    activations (5-bit weights are read instead of 32-bit ones, the kernel's 16-bit multiply-adds outpace the fp32
    matmul's up to ~1,000 rows, and int16 rounding leaves the prompt's KV as the fp32 weights would make it), more
    rows through the fp32 weights (compute-bound, where the two run even)."""

    def __init__(self, q4: Q4Linear, dense: _Dense, rows: int):
        super().__init__()
        self.q4, self.dense, self.rows = q4, dense, rows
        self.out_features, self.in_features = dense.out_features, dense.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] <= self.rows:
            return self.q4.forward(x, wide=True)
        return self.dense(x)


class _Dense(nn.Module):
    """``F.linear`` over a weight owned elsewhere (e.g. a view into a fused tensor)."""

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight, self.bias = w, bias
        self.out_features, self.in_features = w.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


def check_mode(mode: str | None, group_size: int = 32) -> str:
    mode = mode or "none"
    if mode not in MODES:
        raise CairnError(f"unknown quantization {mode!r}: use --quantize int8 or --quantize int4")
    if mode == "int4" and group_size not in GROUP_SIZES:
        raise CairnError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    return mode
