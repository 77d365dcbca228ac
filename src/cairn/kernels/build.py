"""Building cairn's C kernels (``cairn.kernels``) into the cache: the compiler found, each library compiled once per
source, compiler and CPU, checked by its digest when reused.

No torch here, and nothing from the ``cairn.kernels`` package itself (whose ``__init__`` imports torch): the sources
are read beside this file, so a child process can load this module by its path (``python build.py NAME...``) and
build libraries while its parent imports torch (``cairn.weights.prepared_ahead``)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from cairn.errors import CairnError

FLAGS = ["-O3", "-march=native", "-fPIC", "-shared", "-std=c11"]
# every library the engine may load (``cairn.kernels``' entry points live in these)
LIBRARIES = ("qgemm", "attention", "rows", "step")


class KernelUnavailable(CairnError):
    pass


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise KernelUnavailable("no C compiler found (tried $CC, cc, gcc, clang): install one (e.g. gcc) "
                            "to build cairn's quantized and attention kernels")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _sources(name: str) -> tuple[bytes, dict[str, bytes]]:
    here = Path(__file__).resolve().parent  # (the package's directory: its .c and .h files)
    return (here / f"{name}.c").read_bytes(), {f.name: f.read_bytes() for f in sorted(here.glob("*.h"))}


def _library_path(name: str, src: bytes | None = None, headers: dict[str, bytes] | None = None,
                  cc: str | None = None) -> Path:
    """Where the cache keeps ``name``'s library for this source, compiler and CPU."""
    from cairn.weights.gguf import cache_dir

    if src is None or headers is None:
        src, headers = _sources(name)
    cc = cc or _compiler()
    # -march=native: a library built here may not run on another CPU sharing this cache, so the CPU is in the key
    key = hashlib.sha256(src + b"".join(headers[h] for h in sorted(headers))
                         + " ".join([cc, *FLAGS, platform.machine(), _cpu_flags()]).encode()).hexdigest()
    return cache_dir() / "kernels" / f"{name}-{key[:16]}.so"


def _build(name: str) -> Path:
    src, headers = _sources(name)
    cc = _compiler()
    out = _library_path(name, src, headers, cc)
    if _intact(out):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return _compile(name, src, headers, cc, out)
    except OSError as e:
        raise KernelUnavailable(f"cannot write {name}'s library under {out.parent} ({e.strerror or e}): set "
                                "CAIRN_CACHE_DIR to a writable directory") from None


def _compile(name: str, src: bytes, headers: dict[str, bytes], cc: str, out: Path, flags: list[str] = FLAGS) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        c = Path(tmp) / f"{name}.c"
        c.write_bytes(src)
        for h, text in headers.items():
            (Path(tmp) / h).write_bytes(text)
        so = Path(tmp) / f"{name}.so"
        errors = []
        for extra in (["-fopenmp"], []):  # without OpenMP the kernel runs on one thread
            r = subprocess.run([cc, *flags, *extra, str(c), "-o", str(so), "-lm"], capture_output=True, text=True)
            if r.returncode == 0:
                break
            errors.append(r.stderr.strip()[-400:])
        else:
            raise KernelUnavailable(f"building {name}.c with {cc} failed: {errors[-1]}")
        tmp_out = out.with_suffix(f".{os.getpid()}.tmp")
        shutil.copyfile(so, tmp_out)
        try:
            ctypes.CDLL(str(tmp_out))  # loads: only then does it take the cache's name
        except OSError as e:
            tmp_out.unlink(missing_ok=True)
            raise KernelUnavailable(f"{name}'s freshly built library does not load ({e})") from None
        digest = _digest(tmp_out)
        os.replace(tmp_out, out)  # atomic: a concurrent process sees the old state or the whole library
        tmp_sum = out.with_suffix(f".{os.getpid()}.sha256.tmp")
        tmp_sum.write_text(digest)
        os.replace(tmp_sum, out.with_suffix(".sha256"))
    return out


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _intact(lib: Path) -> bool:
    """Whether the cached library is whole: its bytes match the digest written when it was built (a truncated
    library is mapped past its end and dies with SIGBUS; a foreign one fails in other ways). Else rebuild."""
    try:
        return lib.is_file() and lib.with_suffix(".sha256").read_text().strip() == _digest(lib)
    except OSError:
        return False


def library(name: str) -> Path:
    """The compiled library ``name`` (``qgemm``, ``attention``, ``rows``, ``step``), built now if the cache has no
    intact one; ``KernelUnavailable`` says why it cannot be."""
    return _build(name)


def built(name: str) -> bool:
    """Whether the cache already holds an intact build of ``name`` for this source, compiler and CPU (False also
    where there is no compiler: nothing could be built ahead)."""
    try:
        return _intact(_library_path(name))
    except KernelUnavailable:
        return True


if __name__ == "__main__":  # python build.py NAME...: build each library not yet built, quietly (a start's child)
    import sys

    for arg in sys.argv[1:]:
        try:
            library(arg)
        except Exception:  # (the engine builds it, or reports why it cannot, when it needs it)
            pass
