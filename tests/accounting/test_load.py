"""MODEL resolution: GGUF files (metadata only), HF directories, cairn checkpoints and presets."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

from cairn.accounting.costs import account
from cairn.accounting.load import load_config
from cairn.errors import CairnError


def _write_gguf(path: Path, with_output: bool) -> None:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_context_length(256)
    w.add_vocab_size(100)
    if with_output:
        w.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float32))
    else:
        w.add_tensor("token_embd.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("with_output", [True, False])
def test_gguf_metadata(tmp_path: Path, with_output: bool) -> None:
    path = tmp_path / "m.gguf"
    _write_gguf(path, with_output)
    cfg = load_config(str(path))
    assert (cfg.d_model, cfg.n_layers, cfg.n_kv_heads, cfg.vocab_size) == (64, 2, 2, 100)
    assert cfg.tie_embeddings is not with_output
    layer = 2 * 64 + 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128
    assert account(cfg).total_params == 100 * 64 * (2 if with_output else 1) + 2 * layer + 64


def test_hf_directory_and_errors(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768, "n_layer": 12, "n_head": 12}))
    assert account(load_config(str(tmp_path))).total_params == 124_439_808
    with pytest.raises(CairnError, match="no such file"):
        load_config(str(tmp_path / "nope.json"))
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(CairnError, match="bad.gguf: not a GGUF file"):
        load_config(str(tmp_path / "bad.gguf"))


def test_gguf_mixtral_is_a_llama_with_experts(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", 2), ("embedding_length", 64), ("feed_forward_length", 96),
                       ("attention.head_count", 4), ("attention.head_count_kv", 2), ("vocab_size", 100),
                       ("expert_count", 4), ("expert_used_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("output.weight", np.zeros((100, 64), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = load_config(str(path))
    assert (cfg.arch, cfg.n_experts, cfg.experts_per_token, cfg.moe_d_ff) == ("mixtral", 4, 2, 96)
