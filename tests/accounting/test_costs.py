"""Bytes, KV cache, FLOPs and training memory against figures worked out by hand from the papers' formulas."""

from __future__ import annotations

import pytest

from cairn import presets
from cairn.accounting.costs import account
from cairn.config import ModelConfig
from cairn.errors import CairnError


def test_weight_bytes_dense_dtypes() -> None:
    acc = account(presets.get("llama-3-8b"))
    n = 8_030_261_248
    assert acc.weight_bytes("fp32") == 4 * n
    assert acc.weight_bytes("bf16") == acc.weight_bytes("fp16") == 2 * n


def test_int4_includes_group_scales_and_zero_points() -> None:
    cfg = ModelConfig(vocab_size=256, d_model=256, n_layers=1, n_heads=4, d_ff=512, tie_embeddings=True)
    acc = account(cfg)
    vectors = 3 * 256  # two RMSNorms + the final norm, kept in bf16
    matrices = acc.total_params - vectors
    # every matrix has 256 or 512 input columns: groups of 128 divide them exactly
    groups = matrices // 128
    assert acc.weight_bytes("int4", group_size=128) == matrices // 2 + groups * (2 + 0.5) + 2 * vectors
    assert acc.weight_bytes("int8", group_size=128) == matrices + groups * (2 + 1) + 2 * vectors
    assert acc.weight_bytes("fp8", group_size=128) == matrices + groups * 2 + 2 * vectors
    # smaller groups cost more; int4 is well above 4 bits per parameter at group size 32
    assert acc.weight_bytes("int4", 32) > acc.weight_bytes("int4", 128)
    assert 8 * acc.weight_bytes("int4", 32) / acc.total_params > 4.5


def test_kv_cache_gqa_window_and_mla() -> None:
    llama = account(presets.get("llama-3-8b"))
    assert llama.kv_bytes_per_token("bf16") == 32 * 2 * 8 * 128 * 2  # layers · (K, V) · kv heads · head_dim · 2 B
    assert llama.kv_bytes(8192, batch=4, dtype="fp8") == 4 * 8192 * 32 * 2 * 8 * 128
    mistral = account(presets.get("mistral-7b"))
    assert mistral.kv_bytes(32768) == mistral.kv_bytes(4096)  # a 4096-token window caps every layer
    ds = account(presets.get("deepseek-v3"))
    assert ds.kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2  # the MLA latent and the shared rope key
    bert = account(presets.get("bert-base-uncased"))
    assert bert.kv_bytes_per_token() == 0


def test_forward_flops_count_head_and_routed_experts_by_k_over_e() -> None:
    gpt2 = account(presets.get("gpt2"))
    # 2 x (12 layers x 12 d² matmul weights + the tied head): embeddings, biases and norms are not matmuls
    assert gpt2.forward_matmul_flops_per_token == 2 * (12 * 12 * 768**2 + 50257 * 768)
    mixtral = account(presets.get("mixtral-8x7b"))
    d, f, layers = 4096, 14336, 32
    attn = 2 * d * d + 2 * d * 1024
    per_layer = attn + 8 * d + 2 * 3 * d * f  # router + k=2 of 8 experts
    assert mixtral.forward_matmul_flops_per_token == 2 * (layers * per_layer + 32000 * d)


def test_attention_flops_and_training_flops() -> None:
    acc = account(presets.get("llama-2-7b"))
    # per layer QKᵀ and AV: 2 · 2 · heads · head_dim · T
    assert acc.attention_flops_per_token(4096) == 32 * 4 * 32 * 128 * 4096
    mean_keys = (4096 + 1) / 2
    want = 3 * (acc.forward_matmul_flops_per_token + 32 * 4 * 32 * 128 * mean_keys)
    assert acc.train_flops_per_token(4096) == int(want)
    assert acc.train_flops_per_token(4096, checkpointing=True) == pytest.approx(want * 4 / 3, rel=1e-9)
    # the Kaplan approximation 6N holds within a few percent at short context
    assert acc.train_flops_per_token(128) == pytest.approx(6 * acc.total_params, rel=0.05)


def test_sharing_keeps_flops_and_halves_shared_ffn_params() -> None:
    base = dict(vocab_size=1000, d_model=64, n_layers=4, n_heads=4, d_ff=256)
    plain, shared = account(ModelConfig(**base)), account(ModelConfig(**base, ffn_share_group=2))
    assert shared.forward_matmul_flops_per_token == plain.forward_matmul_flops_per_token
    assert plain.total_params - shared.total_params == 2 * 3 * 64 * 256
    assert shared.total_params_untied == plain.total_params


def test_training_memory_components() -> None:
    acc = account(presets.get("smollm2-135m"))
    n = acc.total_params
    mem = acc.train_memory_bytes(batch=2, context=1024, dtype="bf16")
    assert mem["weights"] == mem["gradients"] == 2 * n
    assert mem["master_weights"] == 4 * n and mem["optimizer_states"] == 8 * n
    assert mem["logits"] == 2 * 1024 * 49152 * 4
    ckpt = acc.train_memory_bytes(batch=2, context=1024, dtype="bf16", checkpointing=True)
    assert ckpt["activations"] < mem["activations"] / 5
    assert acc.train_memory_bytes(dtype="fp32")["master_weights"] == 0
    with pytest.raises(CairnError, match="training in int4"):
        acc.train_memory_bytes(dtype="int4")


def test_json_keys_and_bad_flags() -> None:
    report = account(presets.get("mixtral-8x7b")).to_json(context=1024)
    for key in ("total_params", "total_params_untied", "active_params", "components", "weight_bytes",
                "kv_bytes_per_token", "forward_matmul_flops_per_token", "attention_flops_per_token",
                "train_flops_per_token", "train_memory_bytes"):
        assert key in report
    assert set(report["weight_bytes"]) == {"fp32", "bf16", "fp16", "fp8", "int8", "int4"}
    with pytest.raises(CairnError, match="--context must be a positive"):
        account(presets.get("gpt2")).to_json(context=0)
    with pytest.raises(CairnError, match="unknown dtype 'fp6'"):
        account(presets.get("gpt2")).weight_bytes("fp6")


def test_zero_and_negative_dimensions_are_named() -> None:
    with pytest.raises(CairnError, match="d_model=0.*n_experts=-1"):
        ModelConfig(vocab_size=10, d_model=0, n_layers=1, n_heads=1, d_ff=4, n_experts=-1)


def test_unknown_preset_names_the_closest() -> None:
    with pytest.raises(CairnError, match="did you mean.*llama-3-8b"):
        presets.get("llama3-8b")


def test_presets_match_their_published_totals() -> None:
    checked = 0
    for name in presets.names():
        entry = presets.describe(name)
        acc = account(presets.get(name))
        if "published_total_params" in entry:
            assert acc.total_params == entry["published_total_params"], name
            checked += 1
        if "published_active_params" in entry:
            assert acc.active_params == entry["published_active_params"], name
    assert checked >= 25


def test_kv_bytes_per_token_is_what_the_model_hands_its_cache() -> None:
    import torch

    from cairn.model import DenseKVCache, build_model

    cfg = ModelConfig(vocab_size=50, d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, d_ff=64)
    model = build_model(cfg, dtype=torch.bfloat16).init_weights(seed=0).to(torch.bfloat16)
    handed = 0

    class Recording(DenseKVCache):
        def update(self, layer, k, v, positions):
            nonlocal handed
            handed += k.numel() * k.element_size() + v.numel() * v.element_size()
            return super().update(layer, k, v, positions)

    cache = Recording(cfg.n_layers, 1, cfg.n_kv_heads, cfg.head_dim, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        model(torch.randint(0, 50, (1, 9)), cache=cache)
    assert handed == 9 * account(cfg).kv_bytes_per_token("bf16")
    stored = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
    assert stored == account(cfg).kv_bytes(16, batch=1, dtype="bf16")
