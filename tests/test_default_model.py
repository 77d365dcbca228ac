"""The bundled SmolLM2-135M-Instruct through cairn, against transformers' own GGUF loader (golden logits)."""

import json
from pathlib import Path

import torch
from safetensors import safe_open

GOLDEN = Path(__file__).parent / "data" / "golden_smollm2.safetensors"


def test_first_step_logits_match_transformers_gguf_loader(default_model):
    with safe_open(str(GOLDEN), framework="pt") as f:
        ref_logits, ref_ids = f.get_tensor("logits"), f.get_tensor("prompt_ids").tolist()
        messages = json.loads(f.metadata()["messages"])
    ids = default_model.tokenizer.encode_chat(messages)
    assert ids == ref_ids, "cairn's tokenizer + chat template disagree with transformers'"
    with torch.no_grad():
        logits = default_model.model(torch.tensor([ids]), last_only=True)[0, -1]
    assert (logits - ref_logits).abs().max().item() <= 1e-3
    assert int(logits.argmax()) == int(ref_logits.argmax())


def test_tokenizer_round_trips_text(default_model):
    tok = default_model.tokenizer
    for text in ["Hello, world!", "naïve café — 東京 😀", "  spaces\n\ttabs 12345", "<|im_start|>user"]:
        assert tok.decode(tok.encode(text), skip_special=False) == text
    assert tok.encode("<|im_start|>") == [1]  # special tokens are single ids
    assert tok.eos_ids == {2}


def test_tokenizer_matches_transformers_on_text(default_model):
    from transformers import PreTrainedTokenizerFast

    ours = default_model.tokenizer
    ref = PreTrainedTokenizerFast(tokenizer_object=ours.tok)  # sanity: same object, same ids
    texts = ["The year 2024 had 366 days.", "don't won't I'll", "x=1+2*3", "emoji 🤖 and 中文"]
    for t in texts:
        assert ours.encode(t) == ref.encode(t, add_special_tokens=False)
    # digits are split one by one (SmolLM's pre-tokenizer), as in transformers' GGUF conversion
    assert len(ours.encode("12345")) == 5


def test_greedy_chat_answer(default_engine, default_model):
    from cairn.engine import Request, SamplingParams

    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = default_engine.generate(Request(ids, SamplingParams(max_tokens=32, temperature=0)))
    assert "Paris" in out.text and out.finish.reason == "eos"
