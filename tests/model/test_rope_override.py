"""RoPE scaling given at load (``--rope-scaling``) against HF transformers with the same ``rope_scaling`` in its config.

A tiny Llama trained at a 16-token context is saved by HF without scaling; cairn loads it with each type overriding
the model's own, and its logits over 40 tokens (past the original context) must equal those of HF's model built with
that ``rope_scaling`` and the same weights.
"""

import argparse

import pytest
import torch
import transformers

from cairn.cli import main, rope_args, rope_from_args
from cairn.config import RopeScaling
from cairn.engine import Engine
from cairn.errors import CairnError
from cairn.weights import load_model

NATIVE = 16
SEQ = 40
LONG = [1.0 + 0.5 * i for i in range(8)]
SHORT = [1.0 + 0.05 * i for i in range(8)]
# the override cairn is given, and the HF config fields that mean the same thing
CASES = {
    "linear": (RopeScaling("linear", factor=3.0),
               {"rope_scaling": {"rope_type": "linear", "factor": 3.0}}),
    # HF's dynamic NTK reads its threshold from max_position_embeddings
    "dynamic": (RopeScaling("dynamic", factor=2.0),
                {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": NATIVE}),
    "yarn": (RopeScaling("yarn", factor=4.0, beta_fast=16.0, beta_slow=2.0),
             {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0,
                               "original_max_position_embeddings": NATIVE}, "max_position_embeddings": 4 * NATIVE}),
    "llama3": (RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0),
               {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": NATIVE}, "max_position_embeddings": 8 * NATIVE}),
    "longrope": (RopeScaling("longrope", factor=4.0, long_factor=LONG, short_factor=SHORT),
                 {"rope_scaling": {"rope_type": "longrope", "factor": 4.0, "long_factor": LONG, "short_factor": SHORT,
                                   "original_max_position_embeddings": NATIVE}, "max_position_embeddings": 4 * NATIVE}),
}


def _config(**extra):
    d = dict(model_type="llama", vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=NATIVE, rms_norm_eps=1e-6)
    d.update(extra)
    return transformers.AutoConfig.for_model(**d)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny HF Llama with no RoPE scaling and a 16-token context, saved as HF saves it."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config()).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model.state_dict()


@pytest.mark.parametrize("kind", list(CASES))
def test_rope_override_at_load_equals_hf(saved, kind):
    path, state = saved
    scaling, hf_fields = CASES[kind]
    ref = transformers.AutoModelForCausalLM.from_config(_config(**hf_fields)).eval()
    ref.load_state_dict(state)
    lm = load_model(path, rope_scaling=scaling)
    assert lm.config.rope_scaling.type == kind
    assert lm.config.max_seq_len == int(NATIVE * scaling.factor)  # the usable context is raised
    x = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = load_model(path).model(x)
        got, want = lm.model(x), ref(x).logits
    assert (got - want).abs().max().item() <= 1e-4, kind
    assert (plain - want).abs().max().item() > 1e-3  # the scaling is not a no-op here


def test_override_replaces_the_models_own_scaling(tmp_path):
    """A model saved with linear scaling, loaded with yarn: yarn over the model's own original context."""
    torch.manual_seed(2)
    hf = transformers.AutoModelForCausalLM.from_config(_config(
        rope_scaling={"rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": NATIVE}, max_position_embeddings=2 * NATIVE)).eval()
    hf.save_pretrained(tmp_path)
    scaling, fields = CASES["yarn"]
    ref = transformers.AutoModelForCausalLM.from_config(_config(**fields)).eval()
    ref.load_state_dict(hf.state_dict())
    lm = load_model(tmp_path, rope_scaling=scaling)
    assert lm.config.rope_scaling.original_max_position_embeddings == NATIVE
    assert lm.config.max_seq_len == 4 * NATIVE
    x = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (lm.model(x) - ref(x).logits).abs().max().item() <= 1e-4


def test_engine_context_follows_the_scaling(saved):
    path, _ = saved
    lm = load_model(path, rope_scaling=RopeScaling("yarn", factor=4.0))
    engine = Engine(lm, quantize="none", kv_blocks=32)
    try:
        assert engine.max_context == 4 * NATIVE
        from cairn.engine import Request, SamplingParams

        out = engine.generate(Request(list(range(1, 30)), SamplingParams(max_tokens=5, temperature=0,
                                                                          ignore_eos=True)))
        assert len(out.token_ids) == 5  # a prompt past the native 16 tokens runs
    finally:
        engine.close()


def _parse(argv):
    p = argparse.ArgumentParser()
    rope_args(p)
    return rope_from_args(p.parse_args(argv))


def test_flags_build_each_scaling():
    assert _parse([]) is None
    assert _parse(["--rope-scaling", "linear", "--rope-factor", "2"]) == RopeScaling("linear", factor=2.0)
    y = _parse(["--rope-scaling", "yarn", "--rope-factor", "4", "--rope-beta-fast", "16", "--rope-original-context",
                "8192"])
    assert (y.beta_fast, y.original_max_position_embeddings) == (16.0, 8192)
    ll = _parse(["--rope-scaling", "llama3", "--rope-factor", "8"])
    assert (ll.low_freq_factor, ll.high_freq_factor) == (1.0, 4.0)
    lr = _parse(["--rope-scaling", "longrope", "--rope-factor", "4", "--rope-long-factor", "1,2,3"])
    assert lr.long_factor == [1.0, 2.0, 3.0] and lr.short_factor == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("argv,needle", [
    (["--rope-factor", "2"], "add --rope-scaling"),
    (["--rope-scaling", "yarn"], "needs --rope-factor"),
    (["--rope-scaling", "linear", "--rope-factor", "2", "--rope-beta-fast", "3"], "applies to --rope-scaling yarn"),
    (["--rope-scaling", "longrope", "--rope-factor", "2"], "--rope-long-factor"),
])
def test_bad_flags_name_the_fix(argv, needle):
    with pytest.raises(CairnError, match=needle):
        _parse(argv)


def test_bad_values_are_refused_at_load(saved):
    path, _ = saved
    with pytest.raises(CairnError, match=">= 1"):
        load_model(path, rope_scaling=RopeScaling("linear", factor=0.5))
    with pytest.raises(CairnError, match="head_dim/2 = 8"):
        load_model(path, rope_scaling=RopeScaling("longrope", factor=2.0, long_factor=[1.0] * 3,
                                                  short_factor=[1.0] * 3))


def test_cli_error_exits_2(saved, capsys):
    path, _ = saved
    assert main(["generate", str(path), "-p", "x", "--rope-scaling", "dynamic"]) == 2
    assert "needs --rope-factor" in capsys.readouterr().err
