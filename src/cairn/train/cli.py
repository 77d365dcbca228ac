"""``cairn train <objective>``: ``pretrain`` here, ``tokenizer`` from ``cairn.data``; every objective shares the
loop's flags (``add_loop_args``)."""

from __future__ import annotations

import argparse


def add_data_args(p: argparse.ArgumentParser, what: str, title: str = "data",
                  val_fraction_help: str = "default: none") -> argparse._ArgumentGroup:
    """MODEL and the data flags every post-training verb shares: ``--data`` and either ``--val-data`` or
    ``--val-fraction``; ``what`` names the records (conversations, pairs, prompts). Returns the group for more."""
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, HF directory or cairn checkpoint (default: bundled SmolLM2-135M-Instruct)")
    g = p.add_argument_group(title)
    g.add_argument("--data", required=True, help=f"training {what} (JSONL)")
    v = g.add_mutually_exclusive_group()
    v.add_argument("--val-data", default=None, help=f"held-out {what} (JSONL) for validation")
    v.add_argument("--val-fraction", type=float, default=None,
                   help=f"hold out this fraction of --data for validation, seeded by --seed ({val_fraction_help})")
    return g


def add_loop_args(p: argparse.ArgumentParser, steps: int, lr: float, batch_size: int, seq_len: int,
                  warmup: int, out: str = "out/pretrain") -> None:
    """The training loop's flags, the same on every ``cairn train`` subcommand (defaults differ per objective)."""
    g = p.add_argument_group("training loop")
    g.add_argument("--out", default=out, help="run directory: checkpoints, metrics, the model (default "
                   "%(default)s)")
    g.add_argument("--steps", type=int, default=steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out, bit-exactly")
    g.add_argument("--seq-len", type=int, default=seq_len, help="tokens per sequence (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="sequences per micro-batch, over all data-parallel ranks (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr of the cosine (default 0.1)")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warmup steps (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (default 0.1)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip, 0 = off (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="initialisation, data order and split seed (default 0)")
    g.add_argument("--val-every", type=int, default=100, help="validate every N steps, 0 = at the end (default 100)")
    g.add_argument("--val-tokens", type=int, default=65536,
                   help="tokens per validation, 0 = the whole split (default %(default)s)")
    g.add_argument("--ckpt-every", type=int, default=100, help="checkpoint every N steps (default 100)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this much training time, validating and checkpointing first")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")
    g.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast or fp32; auto: bf16 where the hardware makes it faster (CUDA with bf16; CPUs "
                        "whose bf16 matmuls measure >=1.3x faster, e.g. AMX or AVX-512 BF16), else fp32")
    g.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile each transformer block; auto: when a C++ compiler (CPU) or CUDA is there and "
                        "--parallel is none, ddp or fsdp")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass (less memory, ~1/3 more compute)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    from cairn.train import lora_flags

    lora_flags.add_args(p.add_argument_group("LoRA (low-rank adapters on the frozen model)"))
    d = p.add_argument_group("devices and parallelism (run under torchrun for more than one process)")
    d.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (default cpu)")
    d.add_argument("--parallel", choices=["none", "ddp", "fsdp", "tp", "fsdp+tp", "pp"], default="none",
                   help="how processes share the work under torchrun (default none: one process)")
    d.add_argument("--tp", type=int, default=None, help="tensor-parallel size for fsdp+tp (default 2)")
    d.add_argument("--pp-schedule", choices=["1F1B", "gpipe"], default="1F1B", help="pipeline schedule")
    d.add_argument("--pg-timeout", type=float, default=120.0,
                   help="seconds a collective may wait before the job fails instead of hanging (default 120)")


def add_parser(subparsers) -> None:
    from cairn.data.cli import DEFAULT_VOCAB, add_tokenizer_parser

    t = subparsers.add_parser("train", help="train a tokenizer or a model (pretrain)")
    tsub = t.add_subparsers(dest="train_cmd", metavar="OBJECTIVE")
    tsub.required = True
    add_tokenizer_parser(tsub)

    p = tsub.add_parser(
        "pretrain", help="pretrain a model on raw text (next-token loss)",
        description="Train a model of cairn's architecture from scratch. With no arguments: a small default model "
                    "on the default corpus (Shakespeare), about 15 minutes on a 2-core CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    m = p.add_argument_group("model and data")
    m.add_argument("--preset", default=None, help="a model preset (see `cairn params --list`)")
    m.add_argument("--config", default=None, help="an HF config.json or a cairn ModelConfig JSON file")
    m.add_argument("--data", nargs="+", default=None,
                   help="text files / directories (prepared on the fly) or one `cairn data prepare` directory "
                        "(default: the default corpus)")
    m.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: train one on --data)")
    m.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="vocabulary of a tokenizer trained here")
    m.add_argument("--val-fraction", type=float, default=0.1, help="documents held out for validation")
    add_loop_args(p, steps=1100, lr=3e-3, batch_size=16, seq_len=256, warmup=100)
    p.set_defaults(func=_pretrain)
    from cairn.train.sft import add_parser as add_sft_parser

    add_sft_parser(tsub)
    from cairn.train.preference_cli import add_parser as add_preference_parsers

    add_preference_parsers(tsub)  # cairn train reward, cairn train dpo
    from cairn.train.rl_cli import add_parser as add_rl_parser

    add_rl_parser(tsub)  # cairn train rl


def _pretrain(args) -> int:
    from cairn.train.pretrain import run

    return run(args)
