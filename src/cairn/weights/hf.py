"""HF model directories: ``config.json`` + ``*.safetensors`` (+ ``tokenizer.json``), in and out.

Covers the Llama, Mistral, Qwen2 and SmolLM families (SmolLM2 is a Llama). Exported directories load back in
``transformers`` with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.memory import check_model_fits

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "self_attn.q_proj.weight": "attn.q.weight",
    "self_attn.k_proj.weight": "attn.k.weight",
    "self_attn.v_proj.weight": "attn.v.weight",
    "self_attn.o_proj.weight": "attn.o.weight",
    "self_attn.q_proj.bias": "attn.q.bias",
    "self_attn.k_proj.bias": "attn.k.bias",
    "self_attn.v_proj.bias": "attn.v.bias",
    "self_attn.o_proj.bias": "attn.o.bias",
    "mlp.gate_proj.weight": "mlp.gate.weight",
    "mlp.up_proj.weight": "mlp.up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
    "mlp.gate_proj.bias": "mlp.gate.bias",
    "mlp.up_proj.bias": "mlp.up.bias",
    "mlp.down_proj.bias": "mlp.down.bias",
}
_TOP = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
_LAYER_INV = {v: k for k, v in _LAYER.items()}
_TOP_INV = {v: k for k, v in _TOP.items()}


def hf_to_cairn_name(name: str) -> str | None:
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"layers.{m.group(1)}.{_LAYER[m.group(2)]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None  # a cached buffer some exporters keep: cairn recomputes it
    raise CairnError(f"tensor {name!r} is not part of an architecture cairn runs")


def cairn_to_hf_name(name: str) -> str:
    if name in _TOP_INV:
        return _TOP_INV[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_INV:
        return f"model.layers.{m.group(1)}.{_LAYER_INV[m.group(2)]}"
    raise CairnError(f"tensor {name!r} has no HF name: this model cannot be exported to HF format")


def _safetensor_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CairnError(f"{path}: no *.safetensors weights (cairn reads safetensors, not .bin pickles)")
    return files


def state_dict_from_hf(hf: dict[str, torch.Tensor], cfg: ModelConfig, source: str = "") -> dict[str, torch.Tensor]:
    """cairn's state dict from HF tensors: dense names one by one, mixture-of-experts tensors together."""
    from cairn.weights.hf_moe import moe_state_dict_from_hf

    state: dict[str, torch.Tensor] = {}
    moe: dict[str, torch.Tensor] = {}
    for name, t in hf.items():
        try:
            new = hf_to_cairn_name(name)
        except CairnError as e:
            if cfg.n_experts and (".mlp." in name or ".block_sparse_moe." in name):
                moe[name] = t
                continue
            raise CairnError(f"{source}: {e}" if source else str(e)) from None
        if new is not None and not (cfg.tie_embeddings and new == "head.weight"):
            state[new] = t
    if moe:
        state.update(moe_state_dict_from_hf(moe, cfg.n_experts))
    return state


def load_hf_dir(path: str | Path):
    """``(ModelConfig, state_dict, Tokenizer)`` of an HF model directory."""
    from cairn.tokenizer import Tokenizer

    path = Path(path)
    cfg = ModelConfig.from_hf_file(path / "config.json")
    check_model_fits(cfg, str(path))  # before any tensor is read
    state: dict[str, torch.Tensor] = {}
    for f in _safetensor_files(path):
        try:
            with safe_open(str(f), framework="pt") as sf:
                raw = {name: sf.get_tensor(name).float() for name in sf.keys()}
        except Exception as e:
            raise CairnError(f"{f}: cannot read safetensors file ({e})") from None
        state.update(state_dict_from_hf(raw, cfg, source=str(f)))
    tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
    return cfg, state, tok


def export_hf_dir(path: str | Path, model: torch.nn.Module, cfg: ModelConfig, tokenizer=None) -> Path:
    """Write an HF directory (config.json, model.safetensors, tokenizer files) that transformers loads."""
    from cairn.weights.native import atomic_write_text, save_tensors, unique_state_dict

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {cairn_to_hf_name(k): v for k, v in unique_state_dict(model).items()}
    bos = tokenizer.bos_id if tokenizer is not None else None
    eos = tokenizer.eos_id if tokenizer is not None else None
    hf_cfg = cfg.to_hf(bos_token_id=bos, eos_token_id=eos)
    if tokenizer is not None:
        tokenizer.save_hf(path)
        gen = {"bos_token_id": bos, "eos_token_id": sorted(tokenizer.eos_ids) or eos}
        atomic_write_text(path / "generation_config.json", json.dumps(gen, indent=2))
    save_tensors(path / "model.safetensors", tensors, {"format": "pt"})
    atomic_write_text(path / "config.json", json.dumps(hf_cfg, indent=2))  # last: what makes it a model directory
    return path
