"""Will it fit? The memory a model needs (cairn's own accounting) against what this machine can give, checked
before anything is allocated.

A file that claims a model larger than the machine (a corrupt header, or simply a 70B checkpoint on a laptop)
would otherwise grow the process until the kernel's OOM killer ends it, minutes later and possibly taking other
processes with it. Loading and training ask ``check_fits`` first and get a ``CairnError`` that says how much is
needed and how much there is.

What the machine can give is the smallest of: the kernel's ``MemAvailable``, the cgroup's memory limit less its
usage (containers), and the address-space limit (``ulimit -v`` / ``prlimit --as``) less what the process already
maps. ``CAIRN_MEMORY_CHECK=0`` turns the check off (swap, or memory that frees up later).
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

from cairn.errors import CairnError

ENV = "CAIRN_MEMORY_CHECK"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()  # cgroup v2
        usage = (base / "memory.current").read_text().strip()
    except OSError:
        try:
            limit = (base / "memory" / "memory.limit_in_bytes").read_text().strip()  # cgroup v1
            usage = (base / "memory" / "memory.usage_in_bytes").read_text().strip()
        except OSError:
            return None
    if not limit.isdigit() or not usage.isdigit() or int(limit) >= 1 << 60:  # "max", or v1's "no limit"
        return None
    return max(int(limit) - int(usage), 0)


def _address_space_available() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return max(soft - int(line.split()[1]) * 1024, 0)
    except (OSError, ValueError, IndexError):
        pass
    return soft


def available() -> tuple[int | None, str]:
    """``(bytes this process can still allocate, what limits it)``; ``(None, ...)`` where nothing can be read."""
    found = [(v, what) for v, what in ((_meminfo_available(), "available memory (MemAvailable)"),
                                      (_cgroup_available(), "the container's memory limit"),
                                      (_address_space_available(), "the address-space limit (ulimit -v)"))
             if v is not None]
    if not found:
        return None, "unknown"
    return min(found)


def _human(n: float) -> str:
    from cairn.accounting.report import human_bytes

    return human_bytes(n)


def check_fits(need: int, source: str, what: str) -> None:
    """Refuse (``CairnError``) when ``need`` bytes, described by ``what``, exceed what the machine can give."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    have, limit = available()
    if have is None or need <= have:
        return
    raise CairnError(f"{source}: {what} needs about {_human(need)}, but this machine can give {_human(have)} "
                     f"({limit}): use a smaller model (or a quantized file), free memory, or set {ENV}=0 to try "
                     "anyway")


def check_model_fits(cfg, source: str, dtype: str = "fp32") -> None:
    """Before loading: the weights of ``cfg`` at ``dtype`` (how cairn holds a loaded model) must fit."""
    from cairn.accounting.costs import account

    acc = account(cfg)
    check_fits(acc.weight_bytes(dtype), source,
               f"loading this model ({acc.total_params:,} parameters as {dtype})")


def check_training_fits(cfg, source: str, batch: int, context: int, dtype: str = "fp32",
                        checkpointing: bool = False) -> None:
    """Before training: weights, gradients, AdamW's moments and activations (cairn's accounting) must fit."""
    from cairn.accounting.costs import account

    acc = account(cfg)
    mem = acc.train_memory_bytes(batch=batch, context=context, dtype=dtype, checkpointing=checkpointing)
    check_fits(mem["total"], source, f"training this model ({acc.total_params:,} parameters; weights, gradients, "
                                     f"AdamW state and activations for {batch} x {context} tokens in {dtype})")
