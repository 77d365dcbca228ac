"""cairn's own checkpoints: a directory with ``config.json`` (a ``ModelConfig``) and ``model.safetensors``.

Every file is written atomically (a temporary file in the same directory, then a rename), so a crash never
leaves a half-written checkpoint behind. Importing this module does not import torch (a GGUF conversion runs in a
child process that never needs it: ``cairn.weights.gguf.convert``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from cairn.config import ModelConfig
from cairn.errors import CairnError

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text))


def save_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """``tensors``: torch tensors, or numpy arrays (written without importing torch; the same file)."""
    import numpy as np

    if tensors and all(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file as save_arrays

        atomic_write(Path(path), lambda tmp: save_arrays(tensors, tmp, metadata=metadata))
        return
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor stored once (under its first name)."""
    seen: set[int] = set()
    out = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg: ModelConfig, tokenizer=None,
                    extra: dict | None = None) -> Path:
    return save_state_checkpoint(path, unique_state_dict(model), cfg, tokenizer, extra)


def save_state_checkpoint(path: str | Path, tensors: dict, cfg: ModelConfig, tokenizer=None,
                          extra: dict | None = None) -> Path:
    """A cairn checkpoint from a state dict (e.g. one gathered from a sharded model; torch tensors, or numpy arrays
    as ``save_tensors`` takes them)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # config.json makes the directory a checkpoint: written last, so a kill before it leaves none that loads
    if tokenizer is not None:
        tokenizer.save_hf(path)
    if extra:
        atomic_write_text(path / "cairn_extra.json", json.dumps(extra, indent=2))
    save_tensors(path / "model.safetensors", tensors, {"format": "pt"})
    meta = {"cairn_format": FORMAT_VERSION, **cfg.to_dict()}
    atomic_write_text(path / "config.json", json.dumps(meta, indent=2))
    return path


def write_dir(path: str | Path, write) -> Path:
    """``write(tmp_dir)`` into a new sibling of ``path``, then rename it onto ``path``: a kill at any moment
    leaves either the old directory or the new one, never a mix (and the next call removes its leftovers). An
    existing ``path`` is replaced only if it is a model directory (has ``config.json``) or empty."""
    import shutil

    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / "config.json").is_file())):
        raise CairnError(f"{path} exists and is not a model directory: choose a new output path or remove it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        write(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def is_checkpoint(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        doc = json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(doc, dict) and "cairn_format" in doc


def load_checkpoint_config(path: Path) -> ModelConfig:
    try:
        d = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CairnError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    version = d.pop("cairn_format", None)
    if version != FORMAT_VERSION:
        raise CairnError(f"{path}: cairn checkpoint format {version} is not supported (expected {FORMAT_VERSION})")
    try:
        return ModelConfig.from_dict(d)
    except TypeError as e:
        raise CairnError(f"{path / 'config.json'}: {e}") from None


def load_checkpoint_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    f = path / "model.safetensors"
    if not f.is_file():
        raise CairnError(f"{path}: no model.safetensors in this cairn checkpoint")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises SafetensorError
        raise CairnError(f"{f}: cannot read safetensors file ({e})") from None
