"""LoRA: zero-initialised adapters change nothing, merging is exact, adapters move both ways between cairn and
PEFT (the reference implementation) with equal logits, LoRA training checkpoints only the adapter and resumes
bit-exactly, and generate / chat / serve run the merged model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

from cairn.cli import main
from cairn.errors import CairnError
from cairn.train import lora
from cairn.train.lora import LoRALinear, apply_lora, load_adapter, merge, merge_and_unload, save_adapter, unmerge
from cairn.weights import load_model

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama saved by transformers, with the training tests' tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
                                   max_position_embeddings=128, tie_word_embeddings=False, rms_norm_eps=1e-6)
    path = tmp_path_factory.mktemp("hf_base")
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tokenizer.save_hf(path)
    return path


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


def make_peft_adapter(base_dir, out, targets=HF_TARGETS, rslora=False, r=4, alpha=16, seed=1):
    """An adapter written by PEFT itself, its B matrices made large enough to change the model's choices."""
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                          use_rslora=rslora, task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model(base_dir), cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(out)
    return model.eval()


@pytest.fixture(scope="module")
def peft_adapter(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("peft_adapter")
    make_peft_adapter(hf_dir, out)
    return out


def tokens(seed=0, n=20, vocab=64):
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


def greedy(model, prompt: list[int], n: int, eos: set[int]) -> list[int]:
    """Greedy decoding by full forward passes (the engine's independent reference); EOS ends it, unemitted."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([prompt + out]))[0, -1].argmax())
            if t in eos:
                break
            out.append(t)
    return out


# --------------------------------------------------------------------------------------------- the wrapper
def test_fresh_adapter_changes_nothing_and_only_adapters_train(hf_dir):
    model = load_model(hf_dir).model
    x = tokens()
    with torch.no_grad():
        ref = model(x)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    n_base = sum(p.numel() for p in model.parameters())
    layers = apply_lora(model, rank=4, alpha=8.0)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert sorted(layers) == sorted(f"layers.{i}.{m}" for i in range(2)
                                    for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 7 * 2
    # the base's names and values are unchanged; A is Kaiming-uniform like PEFT's, B zero
    assert lora.base_state_dict(model).keys() == base.keys()
    assert all(torch.equal(lora.base_state_dict(model)[k], v) for k, v in base.items())
    q = model.layers[0].attn.q
    bound = 1 / q.in_features**0.5  # kaiming_uniform(a=sqrt(5)) on [r, in]
    assert q.lora_A.abs().max() <= bound and q.lora_A.std() > bound / 3 and not q.lora_B.any()
    n, total = lora.trainable_count(model)
    assert n == sum(4 * (m.in_features + m.out_features) for m in layers.values())
    assert total == n + n_base


def test_targets_and_settings_are_checked(hf_dir):
    model = load_model(hf_dir).model
    with pytest.raises(CairnError, match="unknown module name.*'qkv'"):
        apply_lora(model, targets="q,qkv")
    with pytest.raises(CairnError, match="--lora-rank"):
        apply_lora(model, rank=0)
    with pytest.raises(CairnError, match="--lora-dropout"):
        apply_lora(model, dropout=1.0)
    layers = apply_lora(model, targets="q_proj,v")  # HF names are accepted
    assert sorted(layers) == ["layers.0.attn.q", "layers.0.attn.v", "layers.1.attn.q", "layers.1.attn.v"]
    with pytest.raises(CairnError, match="already has LoRA"):
        apply_lora(model)


def test_merge_equals_unmerged_and_unmerge_restores(hf_dir):
    model = load_model(hf_dir).model
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=16.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora.lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.2)
    x = tokens(1)
    with torch.no_grad():
        plain = model(x)
        ref = hf_model(hf_dir)(x).logits
        assert (plain - ref).abs().max() > 0.05  # the adapter matters
        merge(model)
        assert (model(x) - plain).abs().max() <= 1e-5
        merged_state = lora.merged_state_dict(model)
        unmerged_state = lora.base_state_dict(model)  # the base, recovered from the merged weights
        assert all((unmerged_state[k] - v).abs().max() <= 1e-6 for k, v in base.items())
        unmerge(model)
        assert all((model.state_dict()[k] - v).abs().max() <= 1e-6 for k, v in base.items())
        assert (model(x) - plain).abs().max() <= 1e-5
        merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert model.state_dict().keys() == base.keys()
    assert all((model.state_dict()[k] - v).abs().max() <= 1e-6 for k, v in merged_state.items())
    with torch.no_grad():
        assert (model(x) - plain).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------- cairn <-> PEFT
def test_adapter_trained_in_cairn_loads_in_peft_with_equal_logits(hf_dir, tmp_path):
    import peft

    from cairn.train.objectives import token_cross_entropy

    model = load_model(hf_dir).model
    apply_lora(model, rank=4, alpha=8.0, dropout=0.1, seed=5)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    data = tokens(2, n=24)
    for _ in range(6):
        loss = token_cross_entropy(model(data[:, :-1]), data[:, 1:]) / data[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(m.lora_B.abs().max() > 0 for m in lora.lora_modules(model).values())
    save_adapter(model, tmp_path, base_model_name=str(hf_dir), extra={"step": 6})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8.0, "none")
    assert sorted(config["target_modules"]) == sorted(HF_TARGETS) and config["lora_dropout"] == 0.1
    assert config["base_model_name_or_path"] == str(hf_dir)
    keys = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 2 * 7 * 2

    theirs = peft.PeftModel.from_pretrained(hf_model(hf_dir), tmp_path).eval()
    x = tokens(3)
    with torch.no_grad():
        ours = model(x)
        diff = (theirs(x).logits - ours).abs().max().item()
        moved = (hf_model(hf_dir)(x).logits - ours).abs().max().item()
    assert diff <= 1e-4 and moved > 1e-3, (diff, moved)


@pytest.mark.parametrize("targets,rslora", [(HF_TARGETS, False), (["q_proj", "v_proj"], True)])
def test_adapter_made_by_peft_loads_in_cairn_with_equal_logits(hf_dir, tmp_path, targets, rslora):
    theirs = make_peft_adapter(hf_dir, tmp_path, targets, rslora, r=4, alpha=8)
    model = load_model(hf_dir).model
    config = load_adapter(model, tmp_path)
    assert config["r"] == 4 and sorted(config["target_modules"]) == sorted(targets)
    x = tokens(4)
    with torch.no_grad():
        ref = theirs(x).logits
        assert (model(x) - ref).abs().max() <= 1e-4
        assert (hf_model(hf_dir)(x).logits - ref).abs().max() > 1e-2  # the adapter matters
        merge_and_unload(model)
        assert (model(x) - ref).abs().max() <= 1e-4


def test_bad_adapters_are_refused(hf_dir, peft_adapter, tmp_path):
    model = load_model(hf_dir).model
    with pytest.raises(CairnError, match="no adapter_config.json.*it is a model"):
        load_adapter(model, hf_dir)
    with pytest.raises(CairnError, match="no such adapter directory"):
        load_adapter(model, tmp_path / "missing")
    dora = tmp_path / "dora"
    shutil.copytree(peft_adapter, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(CairnError, match="DoRA"):
        load_adapter(model, dora)
    # an adapter of another base: shapes that do not fit
    torch.manual_seed(0)
    other_cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    other = tmp_path / "other"
    transformers.LlamaForCausalLM(other_cfg).save_pretrained(other)
    with pytest.raises(CairnError, match="base model it was trained on"):
        load_adapter(load_model(other).model, peft_adapter)


# ------------------------------------------------------------------------------------------- training
def _pretrain(prepared, out, *extra):
    return main(["train", "pretrain", "--data", str(prepared.path), "--out", str(out), "--steps", "4",
                 "--seq-len", "32", "--batch-size", "2", "--warmup", "1", "--val-every", "2", "--ckpt-every", "2",
                 "--val-tokens", "256", "--compile", "off", "--dtype", "fp32", "--no-progress", "--lora",
                 "--lora-rank", "4", "--lora-dropout", "0.1", *extra])


def test_pretrain_lora_checkpoints_only_the_adapter_and_resumes_bit_exactly(prepared, tmp_path, capsys):
    from cairn.train import checkpoint
    from cairn.train.metrics import read_metrics
    from cairn.train.optim import build_optimizer

    out = tmp_path / "run"
    assert _pretrain(prepared, out) == 0
    assert "trainable of" in capsys.readouterr().out
    # OUT/: the adapter in PEFT's layout and the frozen base it belongs to, no full model
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not (out / "model.safetensors").exists()
    base = load_model(out / "base")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(out / "base") and config["r"] == 4
    # each checkpoint: the adapter's weights and the optimizer, not the 4.8M-parameter base
    last = checkpoint.latest(out)
    assert sorted(p.name for p in last.iterdir()) == ["trainable.safetensors", "trainer.pt"]
    saved = load_file(str(last / "trainable.safetensors"))
    assert saved and all(".lora_A" in k or ".lora_B" in k for k in saved)
    assert sum(t.numel() for t in saved.values()) < 0.05 * sum(t.numel() for t in base.model.state_dict().values())
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl")]

    # killed after step 2: resume from its checkpoint; the rest of the run is bit-identical (dropout included)
    shutil.rmtree(last)
    assert _pretrain(prepared, out, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    again = load_file(str(checkpoint.latest(out) / "trainable.safetensors"))
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)
    assert [r["loss"] for r in read_metrics(out / "metrics.jsonl")] == losses

    # resuming on another model is refused, naming the problem
    step2 = checkpoint.step_dir(out, 2)

    def attempt(model):
        return checkpoint.load(step2, model, build_optimizer(model, 1e-3))

    with pytest.raises(CairnError, match="only trainable"):
        attempt(load_model(out / "base").model.requires_grad_(True))
    with pytest.raises(CairnError, match="do not fit.*--lora-rank"):
        m = load_model(out / "base").model
        apply_lora(m, rank=2)
        attempt(m)
    with pytest.raises(CairnError, match="frozen base weights differ"):
        m = load_model(out / "base").model
        with torch.no_grad():
            m.norm.weight.add_(1.0)
        apply_lora(m, rank=4)
        attempt(m)
    m = load_model(out / "base").model
    apply_lora(m, rank=4)
    assert attempt(m)["step"] == 2


def test_bad_lora_flags_are_clear_errors(prepared, tmp_path, capsys):
    args = ["train", "pretrain", "--data", str(prepared.path), "--out", str(tmp_path / "x"), "--steps", "1",
            "--compile", "off", "--dtype", "fp32", "--no-progress", "--seq-len", "32"]
    assert main([*args, "--lora-rank", "4"]) == 2
    assert "--lora-rank given without --lora" in capsys.readouterr().err
    assert main([*args, "--lora", "--lora-targets", "q,attn"]) == 2
    assert "unknown module name(s) 'attn'" in capsys.readouterr().err
    assert main([*args, "--lora", "--lora-alpha", "-1"]) == 2
    assert "--lora-alpha" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ generate and serve
def test_generate_with_adapter_gives_the_merged_models_greedy_tokens(hf_dir, peft_adapter, tokenizer, tmp_path,
                                                                      capsys):
    from cairn.weights.native import save_checkpoint

    prompt = "the king and the"
    ids = tokenizer.encode(prompt)
    merged = lora.load_merged(load_model(hf_dir), peft_adapter)
    assert not any(isinstance(m, LoRALinear) for m in merged.model.modules())
    want = greedy(merged.model, ids, 12, tokenizer.eos_ids)
    plain = greedy(load_model(hf_dir).model, ids, 12, tokenizer.eos_ids)
    assert want != plain  # the adapter changes the answer

    def generate(*args):
        assert main(["generate", *map(str, args), "-p", prompt, "--json", "--max-tokens", "12"]) == 0
        return json.loads(capsys.readouterr().out)["token_ids"]

    assert generate(hf_dir, "--adapter", peft_adapter, "--quantize", "none") == want
    assert generate(hf_dir) == plain
    # int8 / int4 weights are quantized from the merged fp32 weights: as the merged model saved in fp32 runs them
    save_checkpoint(tmp_path / "merged", merged.model, merged.config, merged.tokenizer)
    # cairn convert --adapter writes the adapted model, standing alone
    assert main(["convert", str(hf_dir), "--adapter", str(peft_adapter), "--to", "cairn", "-o",
                 str(tmp_path / "converted")]) == 0
    capsys.readouterr()
    assert generate(tmp_path / "converted", "--quantize", "none") == want
    for mode in ("int8", "int4"):
        assert generate(hf_dir, "--adapter", peft_adapter, "--quantize", mode) == \
            generate(tmp_path / "merged", "--quantize", mode)

    assert main(["chat", str(hf_dir), "--adapter", str(peft_adapter / "nope"), "-p", "hi"]) == 2
    assert "no such adapter directory" in capsys.readouterr().err
    assert main(["generate", str(peft_adapter), "-p", "hi"]) == 2
    assert f"{peft_adapter} is a LoRA adapter, not a model: pass its base model and --adapter" in \
        capsys.readouterr().err


def test_server_picks_the_adapter_by_model_name(hf_dir, peft_adapter, tmp_path, tokenizer):
    from fastapi.testclient import TestClient

    from cairn.cli import build_parser
    from cairn.engine import Engine, Request, SamplingParams
    from cairn.serve.cli import build_app

    make_peft_adapter(hf_dir, tmp_path / "med", seed=9)
    opts = ["--engine-option", "kv_memory_mb=16", "--engine-option", "eager_kernels=false"]
    args = build_parser().parse_args(["serve", str(hf_dir), "--served-model-name", "base", "--adapter",
                                      f"legal={peft_adapter}", "--adapter", str(tmp_path / "med"), *opts])
    app, engines, _ = build_app(args)
    prompt = "the king and the"
    ids = tokenizer.encode(prompt)
    references = {}
    for name, path in (("legal", peft_adapter), ("med", tmp_path / "med"), ("base", None)):
        lm = load_model(hf_dir)
        if path is not None:
            lm = lora.load_merged(lm, path)
        want = greedy(lm.model, ids, 10, tokenizer.eos_ids)
        engine = Engine(lm, kv_memory_mb=16)
        try:
            done = engine.generate(Request(ids, SamplingParams(max_tokens=10, temperature=0)))
        finally:
            engine.close()
        assert done.token_ids == want
        references[name] = done.text
    assert len(set(references.values())) == 3
    try:
        # a keyless server built as `cairn serve` builds it answers to its own host names only (DNS rebinding)
        with TestClient(app, base_url="http://localhost") as client:
            listed = client.get("/v1/models").json()
            assert [m["id"] for m in listed["data"]] == ["base", "legal", "med"]
            assert client.get("/v1/models/LEGAL").json()["id"] == "legal"
            for name in ("legal", "med", "base", "default"):
                r = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 10,
                                                         "temperature": 0})
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == references["base" if name == "default" else name]
                assert r.json()["model"] == ("base" if name == "default" else name)
            r = client.post("/v1/messages", json={"model": "med", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 200 and r.json()["model"] == "med"
            r = client.post("/v1/chat/completions", json={"model": "criminal", "messages": [
                {"role": "user", "content": "hi"}]})
            assert r.status_code == 404
            assert r.json()["error"]["code"] == "not_found" and "'legal'" in r.json()["error"]["message"]
            r = client.post("/v1/messages", json={"model": "criminal", "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    finally:
        for engine in engines:
            engine.close()


def test_serve_adapter_flags_are_checked(hf_dir, peft_adapter):
    from cairn.cli import build_parser
    from cairn.serve.cli import adapter_specs, build_app

    assert adapter_specs([f"a={peft_adapter}", str(peft_adapter)]) == {"a": str(peft_adapter),
                                                                        peft_adapter.name: str(peft_adapter)}
    with pytest.raises(CairnError, match="given twice"):
        adapter_specs([f"a={peft_adapter}", f"A={peft_adapter}"])
    with pytest.raises(CairnError, match="NAME=DIR"):
        adapter_specs([f"={peft_adapter}"])
    args = build_parser().parse_args(["serve", str(hf_dir), "--served-model-name", "base", "--adapter",
                                      f"base={peft_adapter}", "--engine-option", "kv_memory_mb=16",
                                      "--engine-option", "eager_kernels=false"])
    with pytest.raises(CairnError, match="already taken"):
        build_app(args)
