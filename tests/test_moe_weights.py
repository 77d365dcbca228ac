"""Mixture-of-experts and shared-FFN models through every weight format cairn reads."""

import numpy as np
import pytest
import torch
import transformers
from gguf import GGUFWriter

from cairn.config import ModelConfig
from cairn.model import build_model
from cairn.weights import load_model
from cairn.weights.native import save_checkpoint

MOE = {
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                      shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]),
}


@pytest.mark.parametrize("family", list(MOE))
def test_hf_moe_directory_loads_with_equal_logits(tmp_path, family):
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(vocab_size=96, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                            max_position_embeddings=64, tie_word_embeddings=False, **MOE[family])
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path).model
    x = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(x).logits - ours(x)).abs().max().item() <= 1e-4


def test_shared_ffn_checkpoint_stores_once_and_round_trips(tmp_path):
    cfg = ModelConfig(vocab_size=80, d_model=32, n_layers=4, n_heads=4, d_ff=64, ffn_share_group=2)
    model = build_model(cfg).init_weights(seed=0).eval()
    save_checkpoint(tmp_path, model, cfg)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        stored = [k for k in f.keys() if ".mlp." in k]
    assert len(stored) == 3 * 2  # gate/up/down of two groups, not of four layers
    back = load_model(tmp_path).model
    assert back.layers[0].mlp is back.layers[1].mlp
    x = torch.randint(0, 80, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


def test_gguf_mixtral_style_experts(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, n_experts=4,
                      experts_per_token=2, arch="llama")
    model = build_model(cfg).init_weights(seed=3).eval()
    names = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
             "head.weight": "output.weight"}
    per_layer = {"attn_norm.weight": "attn_norm.weight", "mlp_norm.weight": "ffn_norm.weight",
                 "attn.q.weight": "attn_q.weight", "attn.k.weight": "attn_k.weight", "attn.v.weight": "attn_v.weight",
                 "attn.o.weight": "attn_output.weight", "mlp.router.weight": "ffn_gate_inp.weight",
                 "mlp.experts.gate": "ffn_gate_exps.weight", "mlp.experts.up": "ffn_up_exps.weight",
                 "mlp.experts.down": "ffn_down_exps.weight"}
    w = GGUFWriter(str(tmp_path / "moe.gguf"), "llama")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(64)
    w.add_expert_count(4)
    w.add_expert_used_count(2)
    for name, t in model.state_dict().items():
        a = t.numpy().astype(np.float32)
        if name in names:
            g = names[name]
        else:
            _, i, rest = name.split(".", 2)
            g = f"blk.{i}.{per_layer[rest]}"
        if g.endswith(("attn_q.weight", "attn_k.weight")):  # as llama.cpp writes llama Q/K
            heads = 4 if "attn_q" in g else 2
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(a.shape)
        w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    back = load_model(tmp_path / "moe.gguf")
    assert back.config.n_experts == 4 and back.config.experts_per_token == 2
    x = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        assert (model(x) - back.model(x)).abs().max().item() <= 1e-5
