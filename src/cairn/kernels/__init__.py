"""cairn's own CPU kernels, for the work PyTorch's CPU build does slowly on this class of machine.

``qgemm.c``: 4-bit (GGUF Q4_1's numbers) and 8-bit (Q8_0's) matrix products with activations quantized per group
of 32, as llama.cpp does, on AVX2 CPUs, where PyTorch's int4 CPU matmul has no fast path and its int8 ones either
round activations coarsely (FBGEMM) or multiply in bf16 (weight-only). The weights are stored in column tiles
(``pack_q4``, ``pack_q8``) so that one kernel serves batch-1 decode (memory-bound) and batches and prompts
(compute-bound). It is plain C (no Python or PyTorch headers), compiled on first use with the machine's C compiler
into the cairn cache directory (``$CAIRN_CACHE_DIR/kernels``, about a second) and called through ``ctypes`` on
tensors' memory. Work is split over OpenMP threads from the libgomp PyTorch already loaded, so it follows
``torch.get_num_threads()``.

``attention.c``: decode attention on the engine's paged KV pool, fp32 or fp16 (RoPE, the KV writes and softmax
attention of every sequence's new token in one call), which replaces some twenty small PyTorch calls per layer.

``rows.c``: the activation pass before FBGEMM's int8 GEMM (optional RMSNorm or SwiGLU, the outlier channels split
off, each row scaled to max 1), one call instead of some ten.

``step.c``: a decode step's loop over the layers (the fused products and attention above, called through the
function pointers it is given: their ``_team`` entry points, ``team_address``), one call and one OpenMP region instead
of some 150, its threads meeting at ``team.h``'s spinning barriers; and the whole step around it (embedding and RoPE
rows, the head with the final norm), so a batch-1 token costs one call from Python.

``simd.h``: vector helpers the ``.c`` files share; ``team.h``: the team and barrier of a step's threads.

``q4_kernel()`` / ``q4w_kernel()`` / ``q8_kernel()`` / ``attention_kernel()`` / ``rows_kernel()`` /
``layers_kernel()`` / ``step_kernel()`` return the loaded kernel or raise ``KernelUnavailable`` saying why (no
compiler, a failed build); callers that have another path fall back to it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch

# (the build itself needs no torch: a server's first start runs it in a child process, beside torch's import)
from cairn.kernels.build import FLAGS, KernelUnavailable, _build, _compile, _compiler, _intact  # noqa: F401

_loaded: dict[str, object] = {}


def _load(name: str) -> ctypes.CDLL:
    path = _build(name)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"loading {path} failed ({e}): delete it to rebuild, or check the compiler") from None


_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {  # (library, its entry point, the entry point's argument types); every entry point returns an int
    "q4": ("qgemm", "cairn_q4_gemm", [_P] * 4 + [_I64] * 3 + [_INT, _INT, _P, _F32, _INT]),
    "q8": ("qgemm", "cairn_q8_gemm", [_P] * 4 + [_I64] * 3 + [_INT, _INT, _P, _F32, _INT]),
    "q4w": ("qgemm", "cairn_q4w_gemm", [_P] * 4 + [_I64] * 3 + [_INT, _INT, _P, _F32, _INT]),
    "attention": ("attention", "cairn_decode_attention", [_P] * 10 + [_I64] * 6 + [_P, _INT, _INT]),
    "rows": ("rows", "cairn_rows_for_int8", [_P, _I64, _I64, _INT, _P, _F32, _P, _I64, _P, _P, _P]),
    "layers": ("step", "cairn_decode_layers", [_I64, _I64] + [_P] * 19 + [_I64] * 4 + [_P] * 3 + [_INT, _INT]),
    "step": ("step", "cairn_decode_step", [_P, _I64] + [_P] * 12 + [_INT]),
    "argmax": ("step", "cairn_argmax_rows", [_P, _I64, _I64, _INT, _P]),
}


class StepArgs(ctypes.Structure):
    """``step.c``'s ``struct cairn_step``: what a decode step passes ``cairn_decode_step`` that stays the same from
    step to step (the layers' arrays of ``cairn_decode_layers``, the embedding, the head and the final norm)."""

    _fields_ = [(name, _I64) for name in ("L", "H", "HK", "D", "d_model", "n_qkv", "n_gate_up", "vocab", "sinks")] + [
        ("kv_half", _INT), ("embed_kind", _INT), ("embed", _P), ("fns", _P), ("tiles", _P), ("bias", _P),
        ("n", _P), ("k", _P), ("norms", _P), ("eps", _P), ("attention", _P), ("pool_k", _P), ("pool_v", _P),
        ("windows", _P), ("head_fn", _P), ("head_tiles", _P), ("head_bias", _P), ("final_g", _P),
        ("final_eps", _F32)]


def _kernel(name: str):
    """A compiled entry point as a ``ctypes`` function, its library built on first use."""
    if name not in _loaded:
        lib_name, symbol, argtypes = _SIGNATURES[name]
        fn = getattr(_load(lib_name), symbol)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
        _loaded[name] = fn
    return _loaded[name]


def q4_kernel():
    """The 4-bit matrix product (``qgemm.c``) on ``pack_q4`` tiles."""
    return _kernel("q4")


def q4w_kernel():
    """The 4-bit matrix product with int16 activations (``qgemm.c``, for prompt chunks) on ``pack_q4`` tiles."""
    return _kernel("q4w")


def q8_kernel():
    """The 8-bit matrix product (``qgemm.c``) on ``pack_q8`` tiles."""
    return _kernel("q8")


def attention_kernel():
    """The decode attention (``attention.c``)."""
    return _kernel("attention")


def rows_kernel():
    """The activation pass for FBGEMM (``rows.c``)."""
    return _kernel("rows")


def layers_kernel():
    """A decode step's loop over the layers (``step.c``), calling the ``qgemm.c`` and ``attention.c`` entry points
    it is given."""
    return _kernel("layers")


def step_kernel():
    """A whole decode step (``step.c``): embedding rows, RoPE rows, the layer loop and the head, on a ``StepArgs``."""
    return _kernel("step")


def argmax_kernel():
    """Each row's first largest value's index (``step.c``'s ``cairn_argmax_rows``: the step's greedy choice, the row
    split into as many parts as the step's threads; a NaN counts as the largest, as in ``torch.argmax``)."""
    return _kernel("argmax")


def address(fn) -> int:
    """A loaded entry point's address, for a kernel that takes function pointers."""
    return ctypes.cast(fn, ctypes.c_void_p).value


# the entry point that runs the same work as one thread of a step's team (team.h), for each kernel step.c calls
_TEAM_SYMBOLS = {"q4": "cairn_q4_gemm_team", "q8": "cairn_q8_gemm_team", "q4w": "cairn_q4w_gemm_team",
                 "attention": "cairn_decode_attention_team"}


def team_address(fn) -> int:
    """The address of a loaded kernel's ``_team`` entry point (the form ``step.c`` calls: one thread of the step's
    team, meeting the others at the team's barriers)."""
    for name, loaded in list(_loaded.items()):
        if loaded is fn and name in _TEAM_SYMBOLS:
            key = f"{name}:team"
            if key not in _loaded:
                _loaded[key] = getattr(_load(_SIGNATURES[name][0]), _TEAM_SYMBOLS[name])
            return address(_loaded[key])
    raise KernelUnavailable(f"{fn!r} has no team entry point for step.c")


TILE = 8  # output columns per tile (qgemm.c's NC)


def _tiles(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] padded with zero rows to a multiple of ``TILE`` and viewed as [N / TILE, TILE, ...]."""
    n = t.shape[0]
    pad = -n % TILE
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.view(-1, TILE, *t.shape[1:])


def _half_bytes(s: torch.Tensor) -> torch.Tensor:
    """Per-group scales [N, G] as the fp16 bytes of each tile's group: uint8 [N / TILE, G, 2 * TILE]."""
    return _tiles(s.to(torch.float16)).transpose(1, 2).contiguous().view(torch.uint8)


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """4-bit codes ``q`` [N, K] (0..15) with per-group-of-32 scales ``d`` and minima ``m`` [N, K/32] (``w = q·d +
    m``) in ``qgemm.c``'s tiles: uint8 [ceil(N/8), K/32, 160]. In a tile's group, byte ``4c + i`` of code vector
    ``p`` holds column ``c``'s element ``4p + i`` in its low nibble and ``16 + 4p + i`` in its high nibble; then
    the 8 columns' ``d`` and ``m`` as fp16."""
    n, k = q.shape
    g = _tiles(q.to(torch.uint8).view(n, k // 32, 2, 4, 4))  # [T, col, group, half, p, i]
    codes = (g[:, :, :, 0] | (g[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4).reshape(-1, k // 32, 128)
    return torch.cat([codes, _half_bytes(d), _half_bytes(m)], dim=2).contiguous()


def pack_q8(q: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """8-bit codes ``q`` [N, K] (-127..127) with per-group-of-32 scales ``d`` [N, K/32] (``w = q·d``) in
    ``qgemm.c``'s tiles: uint8 [ceil(N/8), K/32, 272]. Byte ``2c + i`` of code chunk ``p`` is column ``c``'s
    element ``2p + i`` of the group; then the 8 columns' ``d`` as fp16."""
    n, k = q.shape
    g = _tiles(q.to(torch.int8).view(n, k // 32, 16, 2))  # [T, col, group, p, i]
    codes = g.permute(0, 2, 3, 1, 4).reshape(-1, k // 32, 256).view(torch.uint8)
    return torch.cat([codes, _half_bytes(d)], dim=2).contiguous()


def pack_q4_1_blocks(*parts: torch.Tensor) -> torch.Tensor:
    """GGUF Q4_1 blocks, uint8 [N, K/32, 20] each (fp16 ``d``, fp16 ``m``, byte ``j`` holding elements ``j`` and
    ``j + 16`` in its low and high nibble), in ``pack_q4``'s tiles, the parts' rows one after another: the same
    bytes, moved in 4- and 2-byte units (nothing is unpacked)."""
    return _pack_blocks(parts, 20, _Q4_1_FIELDS, 160)


def pack_q8_0_blocks(*parts: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 blocks, uint8 [N, K/32, 34] each (fp16 ``d``, 32 int8 codes), in ``pack_q8``'s tiles, the parts'
    rows one after another: the same bytes, moved."""
    return _pack_blocks(parts, 34, _Q8_0_FIELDS, 272)


# where each part of a GGUF block goes in a tile's group: (bytes a:b of the block, as `units` values of `dtype`, go
# to byte `at` of the group, value-major and column-minor)
_Q4_1_FIELDS = ((4, 20, 4, torch.int32, 0), (0, 2, 1, torch.int16, 128), (2, 4, 1, torch.int16, 144))
_Q8_0_FIELDS = ((2, 34, 16, torch.int16, 0), (0, 2, 1, torch.int16, 256))
_NP = {torch.int32: np.int32, torch.int16: np.int16}


def _pack_blocks(parts, size: int, fields, width: int) -> torch.Tensor:
    """Blocks [N, G, ``size``] into tiles [ceil(N/8), G, ``width``]: each field (bytes ``a:b`` of a block, ``units``
    values of ``dtype``) goes to byte ``at`` of the tile's group, value-major, column-minor (``pack_q4``'s order).
    (numpy moves these strided values ~10x faster than torch's copy_.)"""
    if len(parts) > 1 and any(p.shape[0] % TILE for p in parts[:-1]):
        parts = (torch.cat(parts),)  # a part that ends inside a tile: join them first
    groups = parts[0].shape[1]
    n_tiles = sum(-(-p.shape[0] // TILE) for p in parts)
    out = torch.empty(n_tiles, groups, width, dtype=torch.uint8)
    dst_all, row = out.numpy(), 0
    for p in parts:
        t = _tiles(p.contiguous()).numpy()  # [T, col, G, size]
        dst = dst_all[row:row + t.shape[0]]
        for a, b, units, dtype, at in fields:
            np_type = _NP[dtype]
            view = dst[..., at:at + units * TILE * dtype.itemsize].view(np_type).reshape(-1, groups, units, TILE)
            np.copyto(view, t[..., a:b].view(np_type).transpose(0, 2, 3, 1))
        row += t.shape[0]
    return out


def unpack_q4_1_blocks(tiles: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pack_q4_1_blocks``' inverse for the rows ``rows`` (row numbers): their GGUF Q4_1 blocks [R, K/32, 20]."""
    return _unpack_blocks(tiles, rows, 20, _Q4_1_FIELDS)


def unpack_q8_0_blocks(tiles: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``pack_q8_0_blocks``' inverse for the rows ``rows``: their GGUF Q8_0 blocks [R, K/32, 34]."""
    return _unpack_blocks(tiles, rows, 34, _Q8_0_FIELDS)


def _unpack_blocks(tiles: torch.Tensor, rows: torch.Tensor, size: int, fields) -> torch.Tensor:
    rows = torch.as_tensor(rows).reshape(-1).numpy()
    t, c = rows // TILE, rows % TILE
    groups = tiles.shape[1]
    src = tiles.numpy()
    out = np.empty((len(rows), groups, size), dtype=np.uint8)
    for a, b, units, dtype, at in fields:
        np_type = _NP[dtype]
        values = src[..., at:at + units * TILE * dtype.itemsize].view(np_type).reshape(-1, groups, units, TILE)
        out[..., a:b].view(np_type)[...] = values[t, :, :, c]
    return torch.from_numpy(out)


def _untile(t: torch.Tensor, n: int) -> torch.Tensor:
    """[N / TILE, TILE, ...] back to the first ``n`` of its [N, ...] rows."""
    return t.reshape(-1, *t.shape[2:])[:n]


def _half_values(b: torch.Tensor, n: int) -> torch.Tensor:
    """``_half_bytes``' inverse: fp32 [n, G]."""
    t, g = b.shape[0], b.shape[1]
    return _untile(b.contiguous().view(torch.float16).view(t, g, TILE).transpose(1, 2), n).float()


def unpack_q4(tiles: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``pack_q4``'s inverse: ``(q, d, m)`` for the first ``n`` output columns."""
    t, groups = tiles.shape[0], tiles.shape[1]
    codes = tiles[:, :, :128].reshape(t, groups, 4, TILE, 4).permute(0, 3, 1, 2, 4)  # [T, col, group, p, i]
    q = torch.stack([codes & 15, codes >> 4], dim=3)  # [T, col, group, half, p, i]
    return (_untile(q.reshape(t, TILE, groups * 32), n).to(torch.int32),
            _half_values(tiles[:, :, 128:144], n), _half_values(tiles[:, :, 144:160], n))


def unpack_q8(tiles: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pack_q8``'s inverse: ``(q, d)`` for the first ``n`` output columns."""
    t, groups = tiles.shape[0], tiles.shape[1]
    codes = tiles[:, :, :256].contiguous().view(torch.int8).reshape(t, groups, 16, TILE, 2).permute(0, 3, 1, 2, 4)
    return _untile(codes.reshape(t, TILE, groups * 32), n), _half_values(tiles[:, :, 256:272], n)
