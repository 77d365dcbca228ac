"""Mixture of experts and FFN sharing: parity with HF Mixtral / Qwen2-MoE, and the sharing semantics."""

from __future__ import annotations

import pytest
import torch
import transformers

from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.model import build_model
from cairn.weights.hf import state_dict_from_hf
from cairn.weights.hf_moe import moe_state_dict_from_hf


def _parity(hf_cfg: dict, n_moe_layers: int) -> None:
    torch.manual_seed(0)
    cls = transformers.AutoConfig.for_model(**hf_cfg)
    ref = transformers.AutoModelForCausalLM.from_config(cls).eval()
    with torch.no_grad():
        for p in ref.parameters():  # HF's init leaves the router at zero: make routing non-trivial
            p.normal_(0, 0.2)
    cfg = ModelConfig.from_hf(hf_cfg)
    model = build_model(cfg)
    model.load_state_dict(state_dict_from_hf(ref.state_dict(), cfg), strict=True)  # raises on missing/unexpected keys
    model.eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    tokens = torch.randint(0, hf_cfg["vocab_size"], (2, 11))
    with torch.no_grad():
        out = ref(tokens, output_router_logits=True)
        ours = model(tokens)
    torch.testing.assert_close(ours, out.logits, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(model.aux_loss, out.aux_loss.float(), atol=1e-5, rtol=1e-5)
    assert n_moe_layers == sum(cfg.is_moe_layer(i) for i in range(cfg.n_layers))


def test_mixtral_matches_hf() -> None:
    _parity(
        {
            "model_type": "mixtral",
            "vocab_size": 97,
            "hidden_size": 32,
            "intermediate_size": 24,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "max_position_embeddings": 64,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
        },
        n_moe_layers=2,
    )


def test_qwen2_moe_matches_hf() -> None:
    _parity(
        {
            "model_type": "qwen2_moe",
            "vocab_size": 101,
            "hidden_size": 32,
            "intermediate_size": 40,
            "moe_intermediate_size": 16,
            "shared_expert_intermediate_size": 48,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "num_experts": 6,
            "num_experts_per_tok": 2,
            "norm_topk_prob": False,
            "mlp_only_layers": [0],
            "decoder_sparse_step": 1,
            "max_position_embeddings": 64,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
        },
        n_moe_layers=2,
    )


def test_per_expert_checkpoint_layout_is_stacked() -> None:
    e0, e1 = torch.randn(3, 4), torch.randn(3, 4)
    hf = {
        "model.layers.0.block_sparse_moe.experts.0.w1.weight": e0,
        "model.layers.0.block_sparse_moe.experts.1.w1.weight": e1,
        "model.layers.0.block_sparse_moe.gate.weight": torch.randn(2, 4),
    }
    out = moe_state_dict_from_hf(hf, n_experts=2)
    torch.testing.assert_close(out["layers.0.mlp.experts.gate"], torch.stack([e0, e1]))
    assert out["layers.0.mlp.router.weight"].shape == (2, 4)
    with pytest.raises(CairnError, match=r"expert\(s\) \[1\]"):
        moe_state_dict_from_hf({k: v for k, v in hf.items() if "experts.1" not in k}, n_experts=2)


def _tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=50, d_model=16, n_layers=4, n_heads=2, d_ff=24, max_seq_len=32)
    return ModelConfig(**{**base, **kw})


def test_ffn_sharing_uses_one_module_per_group() -> None:
    model = build_model(_tiny(ffn_share_group=2))
    assert model.layers[0].mlp is model.layers[1].mlp
    assert model.layers[2].mlp is model.layers[3].mlp
    assert model.layers[1].mlp is not model.layers[2].mlp
    dense = build_model(_tiny())
    mlp = sum(p.numel() for p in dense.layers[0].mlp.parameters())
    assert sum(p.numel() for p in dense.parameters()) - sum(p.numel() for p in model.parameters()) == 2 * mlp
    # gradients of a shared MLP accumulate from every layer that uses it
    model.init_weights(seed=0)
    model(torch.randint(0, 50, (1, 5))).sum().backward()
    assert model.layers[0].mlp.up.weight.grad is not None


def test_moe_aux_loss_is_k_for_uniform_routing() -> None:
    model = build_model(_tiny(n_experts=4, experts_per_token=2, ffn_share_group=2)).init_weights(seed=0)
    with torch.no_grad():
        for block in model.layers:
            block.mlp.router.weight.zero_()  # uniform probabilities: f·P sums to k/E, loss = k
    model(torch.randint(0, 50, (2, 8)))
    assert model.aux_loss.item() == pytest.approx(2.0)
    dense = build_model(_tiny()).init_weights(seed=0)
    dense(torch.randint(0, 50, (1, 4)))
    assert dense.aux_loss.item() == 0.0


def test_accounting_only_configs_are_refused() -> None:
    with pytest.raises(CairnError, match="cannot run it: stack='encoder'"):
        build_model(_tiny(stack="encoder", pos_embedding="learned"), device="meta")


def test_sharing_group_cannot_mix_dense_and_moe() -> None:
    with pytest.raises(CairnError, match="first_k_dense a multiple"):
        _tiny(n_experts=4, experts_per_token=1, first_k_dense=1, ffn_share_group=2)


@pytest.mark.parametrize(
    "kw",
    [
        dict(arch="mixtral", n_experts=4, experts_per_token=2),
        dict(arch="qwen2_moe", n_experts=4, experts_per_token=2, moe_d_ff=8, n_shared_experts=1,
             shared_expert_d_ff=16, shared_expert_gate=True, norm_topk_prob=False, first_k_dense=1, attn_bias=True),
    ],
)
def test_moe_hf_export_round_trips(kw: dict) -> None:
    cfg = _tiny(**kw)
    hf = cfg.to_hf()
    back = ModelConfig.from_hf(hf).to_dict()
    assert {k: v for k, v in back.items() if k != "extra"} == {k: v for k, v in cfg.to_dict().items() if k != "extra"}
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf))
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in build_model(cfg, "meta").parameters())


def test_moe_cached_decode_equals_full_forward() -> None:
    from cairn.model import DenseKVCache

    cfg = _tiny(n_experts=4, experts_per_token=2, n_shared_experts=1, first_k_dense=2, ffn_share_group=2)
    model = build_model(cfg).init_weights(std=0.2, seed=0).eval()
    tokens = torch.randint(0, 50, (2, 11))
    with torch.no_grad():
        full = model(tokens)
        cache = DenseKVCache(cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim, 16)
        steps = [model(tokens[:, :6], cache=cache)]
        steps += [model(tokens[:, i : i + 1], cache=cache) for i in range(6, 11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
