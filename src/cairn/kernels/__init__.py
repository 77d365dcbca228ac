"""cairn's own CPU kernels, for the work PyTorch's CPU build does slowly on this class of machine.

``q4.c``: a 4-bit (GGUF Q4_1-layout) matrix-vector product with activations quantized per group of 32, for
batch-1 decode on AVX2 CPUs, where PyTorch's int4 CPU matmul has no fast path. It is plain C (no Python or
PyTorch headers), compiled on first use with the machine's C compiler into the cairn cache directory
(``$CAIRN_CACHE_DIR/kernels``, about a second) and called through ``ctypes`` on tensors' memory. Rows are
split over OpenMP threads from the libgomp PyTorch already loaded, so it follows ``torch.get_num_threads()``.

``attention.c``: decode attention on the engine's paged KV pool (RoPE, the KV writes and softmax attention of
every sequence's new token in one call), which replaces some twenty small PyTorch calls per layer.

``rows.c``: the activation pass before FBGEMM's int8 GEMM in batched decode (optional RMSNorm or SwiGLU, the
outlier channels split off, each row scaled to max 1), one call instead of some ten.

``q4_kernel()`` / ``attention_kernel()`` / ``rows_kernel()`` return the loaded kernel or raise
``KernelUnavailable`` saying why (no compiler, a failed build); callers that have another path fall back to it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

from cairn.errors import CairnError

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"]


class KernelUnavailable(CairnError):
    pass


_loaded: dict[str, object] = {}


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C compiler found (tried $CC, cc, gcc, clang): install one (e.g. gcc) "
                            "to build cairn's 4-bit kernel")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(name: str) -> Path:
    from cairn.weights.gguf import cache_dir

    src = resources.files("cairn.kernels").joinpath(f"{name}.c").read_bytes()
    cc = _compiler()
    # -march=native: a library built here may not run on another CPU sharing this cache, so the CPU is in the key
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()
    out = cache_dir() / "kernels" / f"{name}-{key[:16]}.so"
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return _compile(name, src, cc, out)
    except OSError as e:
        raise KernelUnavailable(f"cannot write {name}'s library under {out.parent} ({e.strerror or e}): set "
                                "CAIRN_CACHE_DIR to a writable directory") from None


def _compile(name: str, src: bytes, cc: str, out: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / f"{name}.c"
        c.write_bytes(src)
        so = Path(tmp) / f"{name}.so"
        errors = []
        for extra in (["-fopenmp"], []):  # without OpenMP the kernel runs on one thread
            r = subprocess.run([cc, *FLAGS, *extra, str(c), "-o", str(so), "-lm"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            errors.append(r.stderr.strip()[-400:])
        else:
            raise KernelUnavailable(f"building {name}.c with {cc} failed: {errors[-1]}")
        tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(so, tmp_out)
        os.replace(tmp_out, out)  # atomic: a concurrent process sees the old state or the whole library
    return out


def _load(name: str) -> ctypes.CDLL:
    path = _build(name)
    try:
        return ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"loading {path} failed ({e}): delete it to rebuild, or check the compiler") from None


_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {  # (library, its entry point, the entry point's argument types); every entry point returns an int
    "q4": ("q4", "cairn_q4_matmul", [_P] * 6 + [_I64] * 3 + [_INT, _INT, _P, _F32, _INT]),
    "attention": ("attention", "cairn_decode_attention", [_P] * 10 + [_I64] * 6 + [_P, _INT]),
    "rows": ("rows", "cairn_rows_for_int8", [_P, _I64, _I64, _INT, _P, _F32, _P, _I64, _P, _P, _P]),
}


def _kernel(name: str):
    """A compiled entry point as a ``ctypes`` function, its library built on first use."""
    if name not in _loaded:
        lib_name, symbol, argtypes = _SIGNATURES[name]
        fn = getattr(_load(lib_name), symbol)
        fn.restype, fn.argtypes = ctypes.c_int, argtypes
        _loaded[name] = fn
    return _loaded[name]


def q4_kernel():
    """The 4-bit matmul (``q4.c``)."""
    return _kernel("q4")


def attention_kernel():
    """The decode attention (``attention.c``)."""
    return _kernel("attention")


def rows_kernel():
    """The activation pass for FBGEMM (``rows.c``)."""
    return _kernel("rows")


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """Codes ``q`` [N, K] (0..15) in the kernel's (and GGUF Q4_1's) layout: per group of 32, element j in the low
    nibble of byte j and element j + 16 in its high nibble. Returns uint8 [N, K/2]."""
    n, k = q.shape
    g = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (g[:, :, 0] | (g[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
