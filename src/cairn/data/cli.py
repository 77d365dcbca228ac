"""`cairn data prepare` and `cairn data instructions` (``cairn.data.instructions``), registered by ``add_parser``,
and `cairn train tokenizer` (``add_tokenizer_parser``, for the ``train`` verb's subparsers). datatrove and spaCy
are imported only when a command runs."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

DEFAULT_VOCAB = 4096  # the default corpus: 3.39 bytes/token (8192: 3.76, 2048: 2.97) and 1.5 M tokens to learn from


def _data_paths(args: argparse.Namespace) -> list[Path]:
    from cairn.data.corpus import default_corpus_dir

    return [Path(p) for p in args.data] if args.data else [default_corpus_dir()]


def _report_table(report: dict[str, Any], out: Path):
    from rich.table import Table

    t = Table(title=f"cairn data prepare → {out}", show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("documents", justify="right")
    t.add_column("bytes", justify="right")
    t.add_column("tokens", justify="right")
    t.add_row("in", f"{report['documents_in']:,}", f"{report['bytes_in']:,}", "")
    for rule, n in report["removed"].items():
        t.add_row(f"  removed: {rule}", f"{n:,}", "", "", style="dim" if n == 0 else "yellow")
    t.add_row("kept", f"{report['documents_kept']:,}", f"{report['bytes_kept']:,}", "", style="bold")
    for split in ("train", "val"):
        t.add_row(f"  {split}", f"{report['documents'][split]:,}", f"{report['split_bytes'][split]:,}",
                  f"{report['tokens'][split]:,}")
    t.caption = f"{report['bytes_per_token']} bytes/token · {report['seconds']} s · details in report.json"
    return t


def _prepare(args: argparse.Namespace) -> int:
    from cairn.data.curate import prepare

    out = Path(args.out)
    report = prepare(_data_paths(args), args.tokenizer, out, val_fraction=args.val_fraction, seed=args.seed,
                     min_words=args.min_words, progress=None if not args.json else False)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        from rich.console import Console

        Console().print(_report_table(report, out))
    return 0


def add_parser(subparsers) -> None:
    """Register ``data`` (subcommands ``prepare`` and ``instructions``) on an argparse subparsers object."""
    d = subparsers.add_parser("data", help="prepare training data: curate, split and tokenize text; write "
                                           "instruction data")
    dsub = d.add_subparsers(dest="data_cmd", metavar="COMMAND")
    dsub.required = True
    p = dsub.add_parser(
        "prepare", help="dedup, quality-filter, split by document and pack text into token shards",
        description="Reads .txt files (one file = one document) and .jsonl files (one {\"text\": ...} line = one "
                    "document), removes exact and near duplicates and low-quality documents (datatrove's MinHash "
                    "and Gopher filters), splits by document into train/val and writes [BOS] + tokens of each "
                    "document into train.bin / val.bin with meta.json, report.json and a copy of the tokenizer.",
    )
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files, .jsonl files or directories (default: the Shakespeare corpus)")
    p.add_argument("--tokenizer", required=True, metavar="DIR",
                   help="a tokenizer directory (from `cairn train tokenizer`) or an HF model directory")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of documents for validation (0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split (0)")
    p.add_argument("--min-words", type=int, default=50, help="drop documents with fewer words (50)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    p.set_defaults(func=_prepare)
    from cairn.data.instructions import add_parser as add_instructions_parser

    add_instructions_parser(dsub)


def _tokenizer(args: argparse.Namespace) -> int:
    from cairn.data.corpus import iter_documents
    from cairn.data.tokenizer_train import train_tokenizer

    t0 = time.perf_counter()
    paths = _data_paths(args)
    tok = train_tokenizer(paths, args.vocab_size, Path(args.out), min_frequency=args.min_frequency,
                          progress=False if args.json else None)
    seconds = time.perf_counter() - t0
    texts = [d.text for d in iter_documents(paths)]
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(e.ids) for e in tok.tok.encode_batch(texts, add_special_tokens=False))
    report = {"out": str(args.out), "vocab_size": tok.vocab_size, "documents": len(texts), "bytes": n_bytes,
              "tokens": n_tokens, "bytes_per_token": round(n_bytes / max(1, n_tokens), 3),
              "special_tokens": {tok.tok.id_to_token(i): i for i in sorted(tok.special_ids)},
              "seconds": round(seconds, 2)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {args.out}: vocabulary {tok.vocab_size:,} ({', '.join(report['special_tokens'])} first); "
              f"{n_bytes:,} bytes of {len(texts)} documents → {n_tokens:,} tokens, "
              f"{report['bytes_per_token']} bytes/token; {seconds:.1f} s")
    return 0


def add_tokenizer_parser(train_subparsers) -> None:
    """Register ``tokenizer`` on the ``train`` verb's subparsers object: ``cairn train tokenizer``."""
    t = train_subparsers.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer on text",
        description="Trains a byte-level BPE (HF tokenizers) with <|endoftext|>, <|im_start|>, <|im_end|> and "
                    "<|pad|> as ids 0-3 and a ChatML chat template; writes an HF tokenizer directory.",
    )
    t.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files, .jsonl files or directories (default: the Shakespeare corpus)")
    t.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB,
                   help=f"vocabulary size, special tokens included ({DEFAULT_VOCAB})")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge (2)")
    t.add_argument("--out", required=True, metavar="DIR", help="output directory")
    t.add_argument("--json", action="store_true", help="print a JSON summary")
    t.set_defaults(func=_tokenizer)
