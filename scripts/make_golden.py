"""Write tests/data/golden_smollm2.safetensors: HF transformers' first-step logits for the default model.

transformers loads the very GGUF file cairn loads (its own GGUF reader, dequantizer and Q/K un-permutation) and
its own tokenizer converted from the GGUF; the chat prompt is rendered with transformers' apply_chat_template.
Run:  .venv/bin/python scripts/make_golden.py   (about two minutes: transformers' GGUF path is slow)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from cairn.weights import default_model_path

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden_smollm2.safetensors"


def main() -> int:
    path = default_model_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, torch_dtype=torch.float32)
    load_s = time.perf_counter() - t0
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    meta = {"messages": json.dumps(MESSAGES), "gguf": path.name, "transformers_load_seconds": f"{load_s:.1f}"}
    save_file({"logits": logits.contiguous(), "prompt_ids": torch.tensor(ids, dtype=torch.int64)}, str(OUT), meta)
    print(f"wrote {OUT} ({len(ids)} prompt tokens, top token {int(logits.argmax())}, load {load_s:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
