"""Accounting-only families: the count from a tiny config equals the numel of HF's own model of that config."""

from __future__ import annotations

import pytest
import torch
import transformers

from cairn.accounting.costs import account
from cairn.config_hf import config_from_hf
from cairn.errors import CairnError
from cairn.model import build_model

TINY = {
    "gpt2": ({"n_embd": 24, "n_layer": 2, "n_head": 4, "n_positions": 40, "vocab_size": 101}, "causal"),
    "opt": ({"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "ffn_dim": 40,
             "max_position_embeddings": 30, "vocab_size": 99, "word_embed_proj_dim": 24}, "causal"),
    "gptj": ({"n_embd": 32, "n_layer": 2, "n_head": 4, "rotary_dim": 4, "n_positions": 40, "vocab_size": 97,
              "tie_word_embeddings": False}, "causal"),
    "gpt_neox": ({"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 40,
                  "vocab_size": 103, "tie_word_embeddings": False}, "causal"),
    "falcon": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 95,
                "multi_query": True, "parallel_attn": True, "new_decoder_architecture": False, "bias": False},
               "causal"),
    "falcon-40b-style": ({"model_type": "falcon", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 8,
                          "num_kv_heads": 2, "vocab_size": 95, "new_decoder_architecture": True, "bias": False},
                         "causal"),
    "gemma": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
               "head_dim": 16, "intermediate_size": 48, "vocab_size": 90}, "causal"),
    "qwen3": ({"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 8, "intermediate_size": 48, "vocab_size": 90, "tie_word_embeddings": False}, "causal"),
    "bert": ({"hidden_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 40,
              "vocab_size": 98, "max_position_embeddings": 33, "type_vocab_size": 2}, "base"),
    "t5": ({"d_model": 24, "d_kv": 8, "d_ff": 40, "num_layers": 2, "num_decoder_layers": 3, "num_heads": 4,
            "vocab_size": 77, "feed_forward_proj": "relu"}, "seq2seq"),
    "t5-v1.1": ({"model_type": "t5", "d_model": 24, "d_kv": 8, "d_ff": 40, "num_layers": 2, "num_heads": 4,
                 "vocab_size": 77, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}, "seq2seq"),
    "deepseek_v3": ({"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
                     "intermediate_size": 48, "moe_intermediate_size": 8, "n_routed_experts": 8, "n_shared_experts": 1,
                     "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                     "q_lora_rank": 12, "kv_lora_rank": 10, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4,
                     "v_head_dim": 6, "vocab_size": 91}, "causal"),
    "deepseek_v2-lite-style": ({"model_type": "deepseek_v2", "hidden_size": 32, "num_hidden_layers": 2,
                                "num_attention_heads": 4, "num_key_value_heads": 4, "intermediate_size": 48,
                                "moe_intermediate_size": 8, "n_routed_experts": 4, "n_shared_experts": 2,
                                "num_experts_per_tok": 2, "first_k_dense_replace": 1, "q_lora_rank": None,
                                "kv_lora_rank": 10, "qk_nope_head_dim": 6, "qk_rope_head_dim": 4, "v_head_dim": 6,
                                "vocab_size": 91, "n_group": 1, "topk_group": 1}, "causal"),
}


def _hf_numel(hf_cfg: dict, kind: str) -> int:
    config = transformers.AutoConfig.for_model(**hf_cfg)
    auto = {
        "causal": transformers.AutoModelForCausalLM,
        "base": transformers.AutoModel,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[kind]
    with torch.device("meta"):
        model = auto.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    # DeepSeek-V3's routing bias is a buffer in HF but a tensor of the released checkpoint
    n += sum(b.numel() for name, b in model.named_buffers() if name.endswith("e_score_correction_bias"))
    return n


@pytest.mark.parametrize("family", sorted(TINY))
def test_family_matches_hf_numel(family: str) -> None:
    fields, kind = TINY[family]
    hf_cfg = {"model_type": family, **fields}
    cfg = config_from_hf(hf_cfg)
    # transformers 5 always ties T5's head (T5Config forces tie_word_embeddings=True), but the released
    # T5 v1.1 checkpoints (tie_word_embeddings: false) carry their own lm_head.weight
    untied_head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    assert account(cfg).total_params == _hf_numel(hf_cfg, kind) + (untied_head if cfg.arch == "t5" else 0)
    with pytest.raises(CairnError, match="cannot run it"):
        build_model(cfg, device="meta")


def test_unknown_family_names_the_known_ones() -> None:
    with pytest.raises(CairnError, match="unsupported architecture 'rwkv'.*gpt2"):
        config_from_hf({"model_type": "rwkv"}, source="x/config.json")


def test_missing_field_is_named() -> None:
    with pytest.raises(CairnError, match="x/config.json: missing field 'n_embd'"):
        config_from_hf({"model_type": "gpt2", "vocab_size": 5}, source="x/config.json")
