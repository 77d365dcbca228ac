"""Resolve a MODEL argument to a ``ModelConfig``: a preset name, an HF ``config.json`` or its directory, a cairn
checkpoint directory (``config.json`` holding ``ModelConfig.to_dict()``) or a GGUF file."""

from __future__ import annotations

from pathlib import Path

from cairn import presets
from cairn.config import ModelConfig, read_json_object
from cairn.config_hf import config_from_hf
from cairn.errors import CairnError


def _gguf_config(path: Path) -> ModelConfig:
    from cairn.weights.gguf import gguf_config

    return gguf_config(path)


def _json_config(path: Path) -> ModelConfig:
    data = read_json_object(path)
    if "model_type" in data:
        return config_from_hf(data, source=str(path))
    data.pop("cairn_format", None)  # a cairn checkpoint's config.json
    return ModelConfig.from_dict(data)


def load_config(model: str) -> ModelConfig:
    """The config MODEL names: a preset, a ``config.json`` (HF or cairn), a directory holding one, or a GGUF file."""
    path = Path(model)
    if path.is_dir():
        if (path / "config.json").is_file():
            return _json_config(path / "config.json")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _gguf_config(ggufs[0])
        raise CairnError(f"{path}: a model directory must contain config.json (HF or cairn checkpoint) or one .gguf")
    if path.is_file():
        if path.suffix == ".gguf":
            return _gguf_config(path)
        return _json_config(path)
    if "/" in model or model.endswith((".json", ".gguf")):
        raise CairnError(f"{model}: no such file or directory (MODEL is a preset name, a config.json or a .gguf)")
    return presets.get(model)
