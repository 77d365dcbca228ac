"""Fuzzing model files (issue 14, Build: errors, not tracebacks): mutated GGUF, safetensors, config.json,
tokenizer.json and tokenizer_config.json files either load and run or are refused with a ``CairnError`` (the CLI's
``error: ...``, exit 2) — never a traceback, a signal or a process that outgrows its memory limit.

Each kind runs in a worker process (``tests/fuzz_model_files.py``) under an address-space limit of 4 GiB: a
mutation that made cairn allocate without bound would die there on a MemoryError, which fails the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFWriter
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tests.test_gguf import write_gguf

EXAMPLES = 200  # per kind: 1,000 mutated model files in all
LIMIT = 4 << 30
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ("The quick brown fox jumps over the lazy dog. Hello there, general Kenobi. " * 20).split()


def tiny_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return tok


def write_seeds(root: Path) -> None:
    tok = tiny_tokenizer()
    vocab = tok.get_vocab_size()
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(
        model_type="llama", vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64, tie_word_embeddings=False,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    hf_dir = root / "hf"
    hf.save_pretrained(hf_dir)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE, "add_bos_token": False}))

    ids = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    merges = json.loads(tok.to_str())["model"]["merges"]

    def tokenizer_metadata(w: GGUFWriter) -> None:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list([t for t, _ in ids])
        w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_chat_template(TEMPLATE)

    write_gguf(root / "tiny.gguf", hf, GGMLQuantizationType.Q8_0, metadata=tokenizer_metadata)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-seeds")
    write_seeds(root)
    return root


def test_the_seed_models_load_and_run(seeds, tmp_path, monkeypatch):
    """The unmutated seeds are good models (so the fuzz starts from files that work)."""
    from tests.fuzz_model_files import run_model

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path))
    assert run_model(seeds / "tiny.gguf") == "ok"
    assert run_model(seeds / "hf") == "ok"


@pytest.mark.parametrize("kind", ["gguf", "safetensors", "config", "tokenizer", "tokenizer_config"])
def test_mutated_model_files_load_or_are_refused_never_crash(seeds, kind):
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-m", "tests.fuzz_model_files", str(seeds), kind, str(EXAMPLES), str(LIMIT)],
                       capture_output=True, text=True, timeout=900, cwd=root)
    assert r.returncode == 0, f"exit {r.returncode} (negative: a signal)\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["ok"] + result["refused"] >= EXAMPLES * 0.9  # hypothesis may stop early only on duplicates
    assert result["refused"] > 0  # the mutations do reach the checks
