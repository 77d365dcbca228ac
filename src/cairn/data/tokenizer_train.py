"""Train a byte-level BPE tokenizer (HF ``tokenizers``) and save it as an HF tokenizer directory.

Byte-level like GPT-2, Llama 3 and SmolLM2: the 256 byte symbols are the initial alphabet, so any text encodes
and nothing is ever unknown. Text is first split with Llama 3's pre-tokenizer regex (letters, up to three
digits, punctuation runs, whitespace), the same one ``cairn.tokenizer`` builds for GGUF's ``llama-bpe``.

The special tokens are reserved at training time, so they get ids 0..3 and are never split:
``<|endoftext|>`` begins every document (the BOS of packed training data, and a document separator),
``<|im_start|>``/``<|im_end|>`` frame ChatML turns (the convention of the default model, SmolLM2), ``<|pad|>``.
Both ``<|im_end|>`` and ``<|endoftext|>`` end generation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as HFTokenizer

from cairn.errors import CairnError
from cairn.tokenizer import Tokenizer, _byte_level_pre

BOS = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, IM_START, IM_END, PAD]  # ids 0..3, in this order

# ChatML. The rendered text starts with the BOS every training document starts with; a generation prompt ends
# with the assistant header. (Like SmolLM2's template, minus its default system prompt.)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_untrained() -> HFTokenizer:
    """An empty byte-level BPE tokenizer with cairn's pre-tokenizer, decoder and special tokens."""
    tok = HFTokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _byte_level_pre("llama-bpe")
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(
    paths: list[Path] | list[str],
    vocab_size: int,
    out_dir: Path | str,
    min_frequency: int = 2,
    progress: bool | None = None,
) -> Tokenizer:
    """Train on the documents of ``paths`` (see ``cairn.data.corpus.iter_documents``); write ``out_dir``
    (``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``) and return the tokenizer.
    ``progress``: show the trainer's progress bars (default: when stderr is a terminal)."""
    from cairn.data.corpus import iter_documents

    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise CairnError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs 256 byte tokens + "
            f"{len(SPECIAL_TOKENS)} special tokens = {smallest} at least (try 4096 or 8192)"
        )
    if min_frequency < 1:
        raise CairnError(f"min_frequency {min_frequency}: use 1 or more")
    docs = [d.text for d in iter_documents(paths) if d.text.strip()]
    if not docs:
        raise CairnError(f"no text in {', '.join(map(str, paths))}: every document is empty")

    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty() if progress is None else progress,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    assert ids == list(range(len(SPECIAL_TOKENS))), ids  # reserved first, by the trainer
    # `tokenizer(text)` in transformers adds the BOS (add_special_tokens=True), as cairn's encode does with
    # add_bos; cairn itself always encodes without the post-processor and adds the BOS on its own.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, ids[0])]
    )

    result = Tokenizer(tok, chat_template=CHAT_TEMPLATE, bos_token=BOS, eos_token=IM_END, add_bos=True,
                       extra_eos=[BOS])
    save_tokenizer(result, Path(out_dir))
    return result


def save_tokenizer(tok: Tokenizer, out_dir: Path) -> None:
    """``Tokenizer.save_hf`` plus the pad token and a ``generation_config.json`` naming both end tokens."""
    from cairn.weights.native import atomic_write_text

    tok.save_hf(out_dir)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pad_token"] = PAD
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, ensure_ascii=False))
    ids = {t: tok.tok.token_to_id(t) for t in SPECIAL_TOKENS}
    gen = {"bos_token_id": ids[BOS], "eos_token_id": [ids[IM_END], ids[BOS]], "pad_token_id": ids[PAD]}
    atomic_write_text(out_dir / "generation_config.json", json.dumps(gen, indent=2))
