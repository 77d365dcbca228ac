import json

import pytest

from cairn.config import ModelConfig, RopeScaling
from cairn.errors import CairnError

LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=128, max_position_embeddings=256, rope_theta=5e5)


def test_old_and_new_rope_layouts_agree():
    old = dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    new = dict(LLAMA, rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    new.pop("rope_theta")
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    assert a.rope_scaling == b.rope_scaling and a.rope_theta == b.rope_theta == 5e5
    assert a.rope_scaling.type == "llama3" and a.head_dim == 16 and a.n_kv_heads == 2


def test_unknown_rope_type_is_an_error():
    with pytest.raises(CairnError, match="unknown rope type 'wobbly'"):
        ModelConfig.from_hf(dict(LLAMA, rope_scaling={"rope_type": "wobbly", "factor": 2.0}))


def test_rope_type_missing_its_fields():
    with pytest.raises(CairnError, match="low_freq_factor"):
        ModelConfig.from_hf(dict(LLAMA, rope_scaling={"rope_type": "llama3", "factor": 8.0}))


@pytest.mark.parametrize("field", ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size"])
def test_missing_field_is_named(tmp_path, field):
    d = dict(LLAMA)
    del d[field]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(CairnError, match=f"missing field '{field}'") as e:
        ModelConfig.from_hf_file(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_unsupported_architecture_named():
    with pytest.raises(CairnError, match="unsupported architecture 'mamba'"):
        ModelConfig.from_hf(dict(LLAMA, model_type="mamba"))


@pytest.mark.parametrize("bad", [{"d_model": 0}, {"n_layers": -1}, {"vocab_size": 0}])
def test_nonpositive_dimensions_are_named(bad):
    kw = dict(vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=16) | bad
    with pytest.raises(CairnError, match=next(iter(bad))):
        ModelConfig(**kw)


def test_gqa_divisibility():
    with pytest.raises(CairnError, match="multiple of n_kv_heads"):
        ModelConfig(vocab_size=10, d_model=12, n_layers=1, n_heads=3, n_kv_heads=2, d_ff=16)


def test_qwen2_sliding_layers_and_mistral_window():
    q = ModelConfig.from_hf(dict(LLAMA, model_type="qwen2", use_sliding_window=True, sliding_window=32,
                                 max_window_layers=1))
    assert [q.window(i) for i in range(2)] == [None, 32] and q.attn_bias and not q.attn_out_bias
    m = ModelConfig.from_hf(dict(LLAMA, model_type="mistral", sliding_window=16))
    assert [m.window(i) for i in range(2)] == [16, 16]


def test_to_hf_round_trip():
    cfg = ModelConfig.from_hf(dict(LLAMA, tie_word_embeddings=True,
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 64}))
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again.to_dict() | {"name": ""} == cfg.to_dict() | {"name": ""}


def test_gguf_metadata():
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.context_length": 8192,
            "llama.embedding_length": 576, "llama.feed_forward_length": 1536, "llama.attention.head_count": 9,
            "llama.attention.head_count_kv": 3, "llama.rope.freq_base": 100000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 49152}
    cfg = ModelConfig.from_gguf(meta, has_output=False)
    assert (cfg.n_layers, cfg.head_dim, cfg.n_kv_heads, cfg.tie_embeddings) == (30, 64, 3, True)
    with pytest.raises(CairnError, match="llama.block_count"):
        ModelConfig.from_gguf({k: v for k, v in meta.items() if k != "llama.block_count"}, has_output=False)
    with pytest.raises(CairnError, match="unsupported GGUF architecture 'rwkv6'"):
        ModelConfig.from_gguf(dict(meta, **{"general.architecture": "rwkv6"}), has_output=False)


def test_rope_scaling_dataclass_rejects_unknown_type():
    with pytest.raises(CairnError):
        RopeScaling(type="ntk-by-parts")


@pytest.mark.parametrize("change,message", [
    ({"rms_norm_eps": "abc"}, "field 'rms_norm_eps' must be a number, got 'abc'"),
    ({"max_position_embeddings": 2.5}, "field 'max_position_embeddings' must be an integer"),
    ({"num_hidden_layers": 2**31}, "field 'num_hidden_layers' is 2,147,483,648, more than 4,096"),
    ({"hidden_size": 0}, "model dimensions must be positive integers, got d_model=0"),
    ({"intermediate_size": 1 << 40}, r"d_ff=1099511627776 \(at most 1,048,576\)"),
])
def test_bad_values_are_errors_naming_the_file_before_anything_is_sized(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA, **change)))
    with pytest.raises(CairnError, match=message) as e:
        ModelConfig.from_hf_file(tmp_path)
    assert str(e.value).startswith(str(tmp_path / "config.json"))
