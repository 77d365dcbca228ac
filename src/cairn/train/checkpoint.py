"""Training checkpoints: ``OUT/checkpoints/step-NNNNNNNN/``, each a cairn model checkpoint (so it also loads in
``cairn generate``) plus ``trainer.pt``: optimizer, step, data position, RNG state, best validation loss. A model
with frozen parameters (LoRA) is checkpointed as its trainable parameters only (``trainable.safetensors``, with a
digest of the frozen ones that ``--resume`` checks), not as a whole model.

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
TRAINABLE = "trainable.safetensors"  # a checkpoint of a model with frozen parameters: only the trainable ones


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


def has_frozen(model: torch.nn.Module) -> bool:
    return any(not p.requires_grad for p in model.parameters())


def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    from cairn.train.lora import clean_name

    return {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the frozen parameters (names, shapes, dtypes and up to 65,536 evenly spaced values of each), so
    that a checkpoint of trainable weights resumes only on the base it was trained on."""
    import hashlib

    from cairn.train.lora import clean_name

    h = hashlib.blake2b(digest_size=16)
    frozen = sorted((clean_name(n), p) for n, p in model.named_parameters() if not p.requires_grad)
    for name, p in frozen:
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 65536)].float().cpu().contiguous()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _save_trainable(path: Path, model: torch.nn.Module) -> None:
    from cairn.weights.native import save_tensors

    save_tensors(path / TRAINABLE, _trainable(model), {"format": "pt", "frozen": frozen_fingerprint(model)})


def _load_trainable(path: Path, model: torch.nn.Module) -> None:
    from safetensors import safe_open

    f = path / TRAINABLE
    try:
        with safe_open(str(f), framework="pt") as sf:
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
            meta = sf.metadata() or {}
    except Exception as e:  # safetensors raises its own error type
        raise CairnError(f"{f}: cannot read safetensors file ({e})") from None
    params = _trainable(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    wrong = sorted(n for n in set(params) & set(tensors) if tensors[n].shape != params[n].shape)
    if missing or unexpected or wrong:
        parts = [f"{what} {names[:4]}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)) if names]
        raise CairnError(f"{path}: the checkpoint's trainable weights do not fit this model ({'; '.join(parts)}): "
                         "resume with the run's original flags (--lora-rank, --lora-targets, the model)")
    if meta.get("frozen") != frozen_fingerprint(model):
        raise CairnError(f"{path}: the frozen base weights differ from those this checkpoint was trained on: resume "
                         "with the run's original base model and seed")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


def save(out: Path, step: int, model: torch.nn.Module, cfg, tokenizer, optimizer: torch.optim.Optimizer,
         state: dict, keep: int) -> Path:
    """Write checkpoint ``step`` of a single-process run and keep the last ``keep``. A model with frozen
    parameters (LoRA) is saved as its trainable ones only (``trainable.safetensors``), with a digest of the frozen
    ones: the base is not rewritten every time."""
    final = step_dir(out, step)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if has_frozen(model):
        tmp.mkdir(parents=True)
        _save_trainable(tmp, model)
    else:
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
    slim, frozen = (path / TRAINABLE).is_file(), has_frozen(model)
    if slim != frozen:
        held, model_kind = ("only trainable (LoRA) weights", "trains every weight") if slim else \
            ("a whole model", "has frozen weights (LoRA)")
        raise CairnError(f"{path}: the checkpoint holds {held} but the model being trained {model_kind}: resume "
                         "with the run's original flags (--lora or not)")
    if slim:
        _load_trainable(path, model)
        state = torch.load(path / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(state.pop("optimizer"))
        return state
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
