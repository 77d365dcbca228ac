"""``cairn eval attention`` and ``cairn eval probe``: attention weights and per-layer hidden states equal HF
transformers' (``output_attentions`` / ``output_hidden_states``) on tiny random models; a probe finds a planted
linear feature and not random labels; both commands end to end on a tiny checkpoint with a tokenizer."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from cairn.cli import main
from cairn.config import ModelConfig
from cairn.errors import CairnError
from cairn.eval import attention as at
from cairn.eval import probe as pr
from cairn.model import build_model
from cairn.weights.hf import state_dict_from_hf


def hf_tiny(model_type: str = "llama", **kw):
    torch.manual_seed(0)
    d = dict(model_type=model_type, vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=96, max_position_embeddings=128, rms_norm_eps=1e-6,
             tie_word_embeddings=False, attn_implementation="eager")
    d.update(kw)
    cfg = transformers.AutoConfig.for_model(**d)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def to_cairn(hf):
    cfg = ModelConfig.from_hf(hf.config.to_dict())
    model = build_model(cfg)
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), cfg))
    return model.eval()


# ------------------------------------------------------------------------------------------------ attention
@pytest.mark.parametrize("model_type,kw", [("llama", {}), ("mistral", {"sliding_window": 5})])
def test_attention_maps_equal_hf_output_attentions(model_type, kw):
    hf = hf_tiny(model_type, **kw)
    ours = to_cairn(hf)
    ids = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = torch.stack(hf(ids, output_attentions=True).attentions)[:, 0]  # [L, H, T, T]
    maps = at.attention_maps(ours, ids[0].tolist())
    assert maps.shape == ref.shape == (3, 4, 12, 12)
    assert (maps - ref).abs().max().item() < 1e-5
    if kw:  # the window is honoured: nothing beyond 5 keys back
        assert maps[:, :, 11, :7].abs().max().item() == 0.0


def test_sink_mass_and_heads_by_hand():
    maps = torch.zeros(2, 2, 3, 3)
    maps[:, :, 0, 0] = 1.0
    maps[0, 0, 1] = torch.tensor([0.9, 0.1, 0.0])
    maps[0, 0, 2] = torch.tensor([0.7, 0.1, 0.2])  # head (0, 0): (0.9 + 0.7) / 2 = 0.8
    maps[1, 1, 1] = torch.tensor([0.2, 0.8, 0.0])
    maps[1, 1, 2] = torch.tensor([0.4, 0.3, 0.3])  # head (1, 1): 0.3
    maps[0, 1, 1:, 1] = 1.0  # head (0, 1): 0
    maps[1, 0, 1:, 0] = 1.0  # head (1, 0): 1
    mass = at.sink_mass(maps)
    assert torch.allclose(mass, torch.tensor([[0.8, 0.0], [1.0, 0.3]]))
    assert at.sink_heads(mass, 0.5) == [{"layer": 1, "head": 0, "sink_mass": 1.0},
                                        {"layer": 0, "head": 0, "sink_mass": 0.8}]


def test_parse_layers():
    assert at.parse_layers(None, 4) == [0, 1, 2, 3]
    assert at.parse_layers("0,-1", 4) == [0, 3]
    assert at.parse_layers("1-2,2", 4) == [1, 2]
    for bad in ("4", "x", "", "2-9"):
        with pytest.raises(CairnError, match="--layers"):
            at.parse_layers(bad, 4)


# ---------------------------------------------------------------------------------------------------- probes
def test_hidden_states_equal_hf_and_do_not_depend_on_batching():
    hf = hf_tiny()
    ours = to_cairn(hf)
    texts = [[5, 9, 11, 2, 40, 7], [3, 3, 8], [60, 1, 2, 90, 4]]
    with torch.no_grad():
        ref = [torch.stack(hf(torch.tensor([t]), output_hidden_states=True).hidden_states)[:, 0] for t in texts]
    batched_mean = pr.hidden_states(ours, texts, "mean")
    batched_last = pr.hidden_states(ours, texts, "last")
    assert batched_mean.shape == (3, 4, 64)
    for i, (t, r) in enumerate(zip(texts, ref, strict=True)):
        # HF's last hidden state is after the final norm; cairn's probe reads the last block's own output
        assert (batched_mean[i, :3] - r[:3].mean(1)).abs().max().item() < 1e-4
        assert (batched_last[i, :3] - r[:3, -1]).abs().max().item() < 1e-4
        alone = pr.hidden_states(ours, [t], "mean")[0]
        assert (alone - batched_mean[i]).abs().max().item() < 1e-4


def test_probe_finds_a_planted_linear_feature_and_not_random_labels():
    gen = torch.Generator().manual_seed(0)
    n, d = 200, 32
    planted = torch.randint(0, 2, (n,), generator=gen)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0)
    # isotropic noise of unit variance per dimension, the label written along one direction (±2.5 units)
    x = torch.randn(n, d, generator=gen) + 2.5 * (2 * planted[:, None] - 1) * direction
    planted = planted.tolist()
    noise = torch.randint(0, 2, (n,), generator=gen).tolist()
    # layer 0 carries the feature, layer 1 is independent noise with the same labels
    features = torch.stack([x, torch.randn(n, d, generator=gen)], dim=1)
    rep = pr.probe_layers(features, planted, 2, test_fraction=0.3, seed=0, l2=1e-3)
    assert rep["layers"][0]["test_accuracy"] >= 0.95
    assert rep["layers"][1]["test_accuracy"] <= 0.75
    assert rep["best_layer"] == 0 and rep["n_test"] == 60 and rep["n_train"] == 140
    rand = pr.probe_layers(features, noise, 2, test_fraction=0.3, seed=0, l2=1e-3)
    assert rand["layers"][0]["test_accuracy"] <= 0.75


def test_probe_on_a_tiny_model_reads_the_planted_token():
    model = to_cairn(hf_tiny())
    rng = random.Random(0)
    texts, labels = [], []
    for i in range(40):  # the label is which group the last token comes from: plain in the embeddings
        y = i % 2
        last = rng.choice([(1, 2, 3), (4, 5, 6)][y])
        texts.append([rng.randrange(10, 96) for _ in range(rng.randrange(2, 8))] + [last])
        labels.append(y)
    feats = pr.hidden_states(model, texts, "last")
    rep = pr.probe_layers(feats, labels, 2, test_fraction=0.25, seed=1, l2=1e-3)
    assert rep["layers"][0]["test_accuracy"] == 1.0


def test_split_is_stratified_and_disjoint():
    labels = [0] * 10 + [1] * 4
    train, test = pr.split(labels, 0.3, seed=0)
    assert sorted(train + test) == list(range(14)) and not set(train) & set(test)
    assert sum(labels[i] == 0 for i in test) == 3 and sum(labels[i] == 1 for i in test) == 1


def test_read_examples_errors(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    with pytest.raises(CairnError, match="at least two labels"):
        pr.read_examples(f)
    f.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": "c", "label": "y"}\n')
    with pytest.raises(CairnError, match="at least two texts"):
        pr.read_examples(f)
    f.write_text('{"text": "a"}\n')
    with pytest.raises(CairnError, match=r'd.jsonl:1: needs a "label"'):
        pr.read_examples(f)


def test_shipped_probe_set_parses():
    root = Path(__file__).resolve().parents[2]
    examples = pr.read_examples(root / "examples" / "probe" / "sentiment.jsonl")
    assert len(examples) == 60 and {e.label for e in examples} == {"positive", "negative"}


# ------------------------------------------------------------------------------------------- the commands
def _tiny_tokenizer(d, seed: int):
    """A byte-level BPE tokenizer of 300 tokens trained here on random sentences of a few words."""
    from cairn.data.tokenizer_train import train_tokenizer

    rng = random.Random(seed)
    words = "the cat dog sat ran on a mat log good bad happy sad day night".split()
    (d / "text.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)))
    return train_tokenizer([d / "text.txt"], 300, d / "tok", progress=False)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from cairn.weights.native import save_checkpoint

    d = tmp_path_factory.mktemp("tiny_probe")
    tok = _tiny_tokenizer(d, 0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=256, tie_embeddings=True, arch="llama", name="tiny")
    model = build_model(cfg).init_weights(seed=0)
    return save_checkpoint(d / "model", model, cfg, tok)


def test_attention_command_writes_json_and_pngs(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["eval", "attention", str(tiny_checkpoint), "-p", "the cat sat on the mat", "--out", str(out),
                 "--layers", "1"]) == 0
    report = json.loads((out / "attention.json").read_text())
    assert report["n_layers"] == 2 and report["n_heads"] == 4 and report["layers_drawn"] == [1]
    t = len(report["token_ids"])
    w = torch.tensor(report["attention"])
    assert w.shape == (2, 4, t, t)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, t), atol=1e-3)
    assert torch.allclose(at.sink_mass(w), torch.tensor(report["sink_mass"]), atol=1e-4)
    for png in ("attention.png", "sinks.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "heads put >=" in capsys.readouterr().out
    assert main(["eval", "attention", str(tiny_checkpoint), "--out", str(out)]) == 2
    assert "pass -p TEXT" in capsys.readouterr().err
    assert main(["eval", "attention", str(tiny_checkpoint), "-p", "the cat", "--layers", "7", "--out", str(out)]) == 2
    assert "layers 0..1" in capsys.readouterr().err


def test_probe_command_writes_json_and_png(tiny_checkpoint, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    rows = [{"text": f"the {w} sat on a mat", "label": lab} for w, lab in
            [("cat", "a"), ("dog", "b")] * 8]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "probe"
    assert main(["eval", "probe", str(tiny_checkpoint), "--data", str(data), "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "probe.json").read_text())
    assert printed == saved and saved["labels"] == ["a", "b"] and len(saved["layers"]) == 3
    assert saved["layers"][0]["test_accuracy"] == 1.0  # the word itself tells the label
    assert (out / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["eval", "probe", str(tiny_checkpoint), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- --quantize
def _quantized_by_hand(w: torch.Tensor, mode: str) -> torch.Tensor:
    """The weights ``--quantize`` documents, computed here: int8 symmetric per output channel with an fp16 scale
    (``max|w| / 127``); int4 per group of 32 inputs, ``q · d + m`` with ``m`` the group's minimum and ``d`` its range
    / 15, both fp16 (GGUF Q4_1)."""
    w = w.float()
    if mode == "int8":
        d = (w.abs().amax(1, keepdim=True) / 127).half().float()
        return torch.round(w / d).clamp(-127, 127) * d
    g = w.reshape(w.shape[0], -1, 32)
    m = g.amin(-1, keepdim=True)
    d = ((g.amax(-1, keepdim=True) - m) / 15).half().float()
    m = m.half().float()
    return (torch.round((g - m) / d).clamp(0, 15) * d + m).reshape(w.shape)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random HF Llama (weights scaled up, so attention is far from uniform) with a tokenizer, saved."""
    d = tmp_path_factory.mktemp("tiny_quant")
    tok = _tiny_tokenizer(d, 1)
    hf = hf_tiny(vocab_size=tok.vocab_size)
    with torch.no_grad():
        for p in hf.parameters():
            p.mul_(4)
    hf.save_pretrained(d / "model")
    tok.save_hf(d / "model")
    return d / "model", hf


def _hf_quantized(hf, mode: str):
    """A copy of ``hf``, every projection of every layer replaced by its hand-quantized weights (``none``: as is)."""
    import copy

    ref = copy.deepcopy(hf)
    if mode != "none":
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.startswith("model.layers.") and name.endswith("proj.weight"):
                    p.copy_(_quantized_by_hand(p, mode))
    return ref


@pytest.mark.parametrize("mode", ["none", "int8", "int4"])
def test_attention_with_quantize_equals_hf_on_the_quantized_weights(hf_dir, tmp_path, capsys, mode):
    path, hf = hf_dir
    out = tmp_path / mode
    assert main(["eval", "attention", str(path), "-p", "the cat sat on the mat and the dog ran", "--quantize", mode,
                 "--out", str(out)]) == 0
    report = json.loads((out / "attention.json").read_text())
    assert report["weights"] == mode
    ids = torch.tensor([report["token_ids"]])
    ours = torch.tensor(report["attention"])
    with torch.no_grad():
        ref = torch.stack(_hf_quantized(hf, mode)(ids, output_attentions=True).attentions)[:, 0]
        fp32 = torch.stack(hf(ids, output_attentions=True).attentions)[:, 0]
    assert (ours - ref).abs().max().item() < 2e-5  # (the JSON rounds to 5 decimals)
    if mode != "none":  # and the quantized weights moved the maps by far more than that
        assert (ours - fp32).abs().max().item() > 1e-3


def test_probe_hidden_states_with_quantize_equal_hf_on_the_quantized_weights(hf_dir):
    from cairn.cli import build_parser
    from cairn.eval import common

    path, hf = hf_dir
    texts = [[5, 9, 11, 2, 40, 7], [3, 3, 8]]
    for mode in ("int8", "int4"):
        args = build_parser().parse_args(["eval", "probe", str(path), "--data", "x.jsonl", "--quantize", mode])
        loaded, weights = common.load_with_engine_weights(args)
        assert weights == mode
        ours = pr.hidden_states(loaded.model, texts, "last")
        with torch.no_grad():
            for i, t in enumerate(texts):
                ref = torch.stack(_hf_quantized(hf, mode)(torch.tensor([t]), output_hidden_states=True).hidden_states)
                assert (ours[i, :3] - ref[:3, 0, -1]).abs().max().item() < 1e-4
                fp32 = torch.stack(hf(torch.tensor([t]), output_hidden_states=True).hidden_states)
                assert (ours[i, 1:3] - fp32[1:3, 0, -1]).abs().max().item() > 1e-3


def test_default_model_int4_maps_are_the_files_own_weights():
    """The default model's engine runs its Q4_1 blocks as they are: --quantize auto (int4 for this file) gives the
    maps of the fp32 weights loaded from the same file, exactly; int8 re-rounds them and moves the maps."""
    from cairn.cli import build_parser
    from cairn.eval import common

    maps = {}
    for mode in ("none", "auto", "int8"):
        args = build_parser().parse_args(["eval", "attention", "-p", "x", "--quantize", mode])
        loaded, weights = common.load_with_engine_weights(args)
        assert weights == {"auto": "int4"}.get(mode, mode)
        maps[mode] = at.attention_maps(loaded.model, loaded.tokenizer.encode("Paris is the capital of France."))
    assert torch.equal(maps["auto"], maps["none"])
    assert (maps["int8"] - maps["none"]).abs().max().item() > 1e-4
