"""Training checkpoints: ``OUT/checkpoints/step-NNNNNNNN/``, each a cairn model checkpoint (so it also loads in
``cairn generate``) plus ``trainer.pt``: optimizer, step, data position, RNG state, best validation loss.

A checkpoint is written into a hidden temporary directory and renamed into place only when every file is on disk,
so a kill at any moment leaves either the whole checkpoint or none that ``--resume`` would take; the last K are
kept. Runs under torchrun write ``torch.distributed.checkpoint`` directories instead (see ``distributed.py``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

from cairn.errors import CairnError
from cairn.weights.native import load_checkpoint_tensors, save_checkpoint

_NAME = re.compile(r"step-(\d{8})")


def ckpt_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def step_dir(out: Path, step: int) -> Path:
    return ckpt_root(out) / f"step-{step:08d}"


def complete_checkpoints(out: Path) -> list[tuple[int, Path]]:
    """``(step, dir)`` of the complete checkpoints under ``OUT``, oldest first (temporary dirs never count)."""
    root = ckpt_root(out)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _NAME.fullmatch(d.name)
        if m and d.is_dir() and ((d / "trainer.pt").is_file() or (d / "complete").is_file()):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1][1] if found else None


def clean_partial(out: Path) -> None:
    """Remove the temporary directories of saves that were killed half way."""
    root = ckpt_root(out)
    if root.is_dir():
        # single-process saves: .tmp-step-…; distributed saves (distributed.save_state): step-….tmp-…
        for d in [*root.glob(".tmp-*"), *root.glob("step-*.tmp-*")]:
            shutil.rmtree(d, ignore_errors=True)


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")) + [path]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(tmp: Path, final: Path) -> None:
    """Rename a fully written temporary directory onto ``final`` (replacing an older one of the same step)."""
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(out: Path, keep: int) -> None:
    found = complete_checkpoints(out)
    for _, d in found[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


def save(out: Path, step: int, model: torch.nn.Module, cfg, tokenizer, optimizer: torch.optim.Optimizer,
         state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` of a single-process run and keep the last ``keep``."""
    final = step_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, cfg, tokenizer)
    torch.save({"optimizer": optimizer.state_dict(), **state}, tmp / "trainer.pt")
    publish(tmp, final)
    prune(out, keep)
    return final


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a single-process checkpoint into ``model`` and ``optimizer``; return the rest of its trainer state."""
    from cairn.weights import fill_shared

    if not (path / "trainer.pt").is_file():
        raise CairnError(
            f"{path}: a distributed checkpoint; resume it under torchrun with the same --parallel and world size"
        )
    tensors = load_checkpoint_tensors(path)
    fill_shared(model, tensors)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise CairnError(f"{path}: the checkpoint does not fit this model ({str(e).splitlines()[0]}): resume with "
                         "the run's original model flags") from None
    state = torch.load(path / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(state.pop("optimizer"))
    return state
