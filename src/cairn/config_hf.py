"""HF ``config.json`` import for the families cairn accounts for but does not run.

GPT-2, OPT, GPT-J, GPT-NeoX/Pythia, Falcon, Gemma, Qwen3, BERT, T5 and DeepSeek-V2/V3 become a ``ModelConfig``
(the one vocabulary) whose accounting-only fields describe them; ``ModelConfig.check_runnable`` refuses to build
them. The runnable families (llama, mistral, qwen2, mixtral, qwen2_moe) go through ``ModelConfig.from_hf``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cairn.config import HF_RUNNABLE, ModelConfig, hf_config_path, read_json_object
from cairn.errors import CairnError


class _Fields:
    """Reads fields of one HF config, naming the field and the file when one is missing."""

    def __init__(self, hf: dict[str, Any], source: str):
        self.hf, self.source, self.family = hf, source, hf.get("model_type")

    def req(self, *keys: str) -> Any:
        for k in keys:
            if self.hf.get(k) is not None:
                return self.hf[k]
        raise CairnError(f"{self.source}: missing field {keys[0]!r}, which a {self.family} config must have")

    def get(self, key: str, default: Any = None) -> Any:
        v = self.hf.get(key)
        return default if v is None else v


def _common(f: _Fields) -> dict[str, Any]:
    return {"arch": f.family, "name": f.get("_name_or_path", "")}


def _gpt2(f: _Fields) -> ModelConfig:
    d = f.req("n_embd")
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=d, n_layers=f.req("n_layer"), n_heads=f.req("n_head"),
        d_ff=f.get("n_inner", 4 * d), mlp="gelu", norm="layernorm", max_seq_len=f.get("n_positions", 1024),
        pos_embedding="learned", attn_bias=True, attn_out_bias=True, mlp_bias=True,
        tie_embeddings=bool(f.get("tie_word_embeddings", True)), **_common(f),
    )


def _opt(f: _Fields) -> ModelConfig:
    d = f.req("hidden_size")
    if f.get("word_embed_proj_dim", d) != d:
        raise CairnError(f"{f.source}: OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if not f.get("do_layer_norm_before", True):
        raise CairnError(f"{f.source}: post-norm OPT (do_layer_norm_before=false) is not supported")
    bias = bool(f.get("enable_bias", True))
    n_pos = f.req("max_position_embeddings")
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=d, n_layers=f.req("num_hidden_layers"),
        n_heads=f.req("num_attention_heads"), d_ff=f.req("ffn_dim"), mlp="relu", norm="layernorm",
        max_seq_len=n_pos, pos_embedding="learned", pos_table_size=n_pos + 2,  # OPT's learned offset of 2
        attn_bias=bias, attn_out_bias=bias, mlp_bias=bias, tie_embeddings=bool(f.get("tie_word_embeddings", True)),
        final_norm=not f.get("_remove_final_layer_norm", False), **_common(f),
    )


def _gptj(f: _Fields) -> ModelConfig:
    d = f.req("n_embd")
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=d, n_layers=f.req("n_layer"), n_heads=f.req("n_head"),
        d_ff=f.get("n_inner", 4 * d), mlp="gelu", norm="layernorm", max_seq_len=f.get("n_positions", 2048),
        mlp_bias=True, head_bias=True, parallel_residual=True, parallel_shared_norm=True,
        tie_embeddings=bool(f.get("tie_word_embeddings", False)), **_common(f),
    )


def _gpt_neox(f: _Fields) -> ModelConfig:
    bias = bool(f.get("attention_bias", True))
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=f.req("hidden_size"), n_layers=f.req("num_hidden_layers"),
        n_heads=f.req("num_attention_heads"), d_ff=f.req("intermediate_size"), mlp="gelu", norm="layernorm",
        max_seq_len=f.get("max_position_embeddings", 2048), attn_bias=bias, attn_out_bias=bias, mlp_bias=True,
        parallel_residual=bool(f.get("use_parallel_residual", True)),
        tie_embeddings=bool(f.get("tie_word_embeddings", False)), **_common(f),
    )


def _falcon(f: _Fields) -> ModelConfig:
    d, heads = f.req("hidden_size"), f.req("num_attention_heads")
    new_arch = bool(f.get("new_decoder_architecture", False))
    if new_arch:
        kv = f.get("num_kv_heads", heads)
    else:
        kv = 1 if f.get("multi_query", True) else heads
    parallel = new_arch or bool(f.get("parallel_attn", True))
    shared_norm = parallel and not (new_arch and f.get("num_ln_in_parallel_attn", 2) == 2)
    bias = bool(f.get("bias", False))
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=d, n_layers=f.req("num_hidden_layers"), n_heads=heads,
        n_kv_heads=kv, d_ff=f.get("ffn_hidden_size", 4 * d), mlp="gelu", norm="layernorm",
        max_seq_len=f.get("max_position_embeddings", 2048), attn_bias=bias, attn_out_bias=bias, mlp_bias=bias,
        pos_embedding="alibi" if f.get("alibi", False) else "rope", parallel_residual=parallel,
        parallel_shared_norm=shared_norm, tie_embeddings=bool(f.get("tie_word_embeddings", True)), **_common(f),
    )


def _gemma(f: _Fields) -> ModelConfig:
    heads = f.req("num_attention_heads")
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=f.req("hidden_size"), n_layers=f.req("num_hidden_layers"),
        n_heads=heads, n_kv_heads=f.get("num_key_value_heads", heads), head_dim=f.get("head_dim"),
        d_ff=f.req("intermediate_size"), mlp="geglu", max_seq_len=f.get("max_position_embeddings", 8192),
        tie_embeddings=bool(f.get("tie_word_embeddings", True)), **_common(f),
    )


def _qwen3(f: _Fields) -> ModelConfig:
    heads = f.req("num_attention_heads")
    bias = bool(f.get("attention_bias", False))
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=f.req("hidden_size"), n_layers=f.req("num_hidden_layers"),
        n_heads=heads, n_kv_heads=f.get("num_key_value_heads", heads), head_dim=f.get("head_dim"),
        d_ff=f.req("intermediate_size"), max_seq_len=f.get("max_position_embeddings", 32768),
        attn_bias=bias, attn_out_bias=bias, qk_norm=True, tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        **_common(f),
    )


def _bert(f: _Fields) -> ModelConfig:
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=f.req("hidden_size"), n_layers=f.req("num_hidden_layers"),
        n_heads=f.req("num_attention_heads"), d_ff=f.req("intermediate_size"), mlp="gelu", norm="layernorm",
        max_seq_len=f.get("max_position_embeddings", 512), stack="encoder", pos_embedding="learned",
        type_vocab_size=f.get("type_vocab_size", 2), embed_norm=True, final_norm=False, pooler=True,
        attn_bias=True, attn_out_bias=True, mlp_bias=True, **_common(f),
    )


def _t5(f: _Fields) -> ModelConfig:
    proj = f.get("feed_forward_proj", "relu")
    n_enc = f.req("num_layers")
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=f.req("d_model"), n_layers=f.get("num_decoder_layers", n_enc),
        n_heads=f.req("num_heads"), head_dim=f.req("d_kv"), d_ff=f.req("d_ff"),
        mlp="geglu" if proj.startswith("gated") else "relu",
        max_seq_len=f.get("n_positions", 512), stack="encoder-decoder", n_encoder_layers=n_enc,
        pos_embedding="relative", relative_buckets=f.get("relative_attention_num_buckets", 32),
        tie_embeddings=bool(f.get("tie_word_embeddings", True)), **_common(f),
    )


def _deepseek(f: _Fields) -> ModelConfig:
    heads = f.req("num_attention_heads")
    if f.get("moe_layer_freq", 1) != 1:
        raise CairnError(f"{f.source}: moe_layer_freq={f.get('moe_layer_freq')} is not supported (cairn reads 1)")
    n_experts = f.get("n_routed_experts", 0)
    v3 = f.family == "deepseek_v3" or f.get("topk_method") == "noaux_tc"
    moe: dict[str, Any] = {}
    if n_experts:
        moe = dict(
            n_experts=n_experts, experts_per_token=f.req("num_experts_per_tok"),
            moe_d_ff=f.req("moe_intermediate_size"),
            n_shared_experts=f.get("n_shared_experts", 0), first_k_dense=f.get("first_k_dense_replace", 0),
            norm_topk_prob=bool(f.get("norm_topk_prob", False)), router_bias=v3,
            router_aux_loss_coef=float(f.get("aux_loss_alpha", 0.0)),
        )
    return ModelConfig(
        vocab_size=f.req("vocab_size"), d_model=f.req("hidden_size"), n_layers=f.req("num_hidden_layers"),
        n_heads=heads, n_kv_heads=heads, d_ff=f.req("intermediate_size"),
        max_seq_len=f.get("max_position_embeddings", 4096), tie_embeddings=bool(f.get("tie_word_embeddings", False)),
        kv_lora_rank=f.req("kv_lora_rank"), q_lora_rank=f.get("q_lora_rank", 0),
        qk_nope_head_dim=f.req("qk_nope_head_dim"), qk_rope_head_dim=f.req("qk_rope_head_dim"),
        v_head_dim=f.req("v_head_dim"), **moe, **_common(f),
    )


FAMILIES: dict[str, Callable[[_Fields], ModelConfig]] = {
    "gpt2": _gpt2,
    "opt": _opt,
    "gptj": _gptj,
    "gpt_neox": _gpt_neox,
    "falcon": _falcon,
    "gemma": _gemma,
    "qwen3": _qwen3,
    "bert": _bert,
    "t5": _t5,
    "deepseek_v2": _deepseek,
    "deepseek_v3": _deepseek,
}


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` from any HF ``config.json`` cairn knows, runnable or accounting-only."""
    family = hf.get("model_type")
    if family is None:
        raise CairnError(f"{source}: missing field 'model_type' (e.g. \"llama\")")
    if family in HF_RUNNABLE:
        return ModelConfig.from_hf(hf, source=source)
    if family not in FAMILIES:
        known = sorted([*HF_RUNNABLE, *FAMILIES])
        raise CairnError(f"{source}: unsupported architecture {family!r}; cairn accounts for {', '.join(known)}")
    try:
        return FAMILIES[family](_Fields(hf, source))
    except CairnError as e:
        msg = str(e)
        raise CairnError(msg if msg.startswith(source) else f"{source}: {msg}") from None
    except (TypeError, ValueError) as e:
        raise CairnError(f"{source}: a field has the wrong type ({e})") from None


def config_from_hf_file(path: str | Path) -> ModelConfig:
    path = hf_config_path(path)
    return config_from_hf(read_json_object(path), source=str(path))
