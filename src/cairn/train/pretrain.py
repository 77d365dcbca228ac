"""``cairn train pretrain``: from raw text (or a prepared directory) to a model in ``OUT/``.

The steps: a tokenizer (given, or trained on the data into ``OUT/tokenizer``), prepared token shards (given, or
curated on the fly into ``OUT/data``), a model from a preset / config file / the default small config, and the
training loop. Under torchrun rank 0 prepares and the others wait for it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cairn.config import ModelConfig, read_json_object
from cairn.errors import CairnError

# The default model: a small Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA, tied embeddings) sized so that about
# 15 minutes on a 2-core CPU train it on the default corpus (docs/training.md has what it reaches).
DEFAULT_MODEL = dict(
    d_model=256, n_layers=6, n_heads=4, n_kv_heads=2, d_ff=688, norm_eps=1e-5, rope_theta=10000.0,
    max_seq_len=1024, tie_embeddings=True, arch="llama", name="cairn-tiny",
)


def model_config(preset: str | None, config: str | None, vocab_size: int, seq_len: int, log=print) -> ModelConfig:
    """The architecture to train: ``--preset``, ``--config`` (an HF config.json or a cairn ModelConfig JSON) or the
    default; its vocabulary is the tokenizer's and its context at least ``seq_len``."""
    if preset and config:
        raise CairnError("--preset and --config both name a model: give one")
    if preset:
        from cairn import presets

        cfg = presets.get(preset)
    elif config:
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CairnError(f"{path}: no such config file (--config takes an HF config.json or a cairn config)")
        d = read_json_object(path)
        if "model_type" in d:
            cfg = ModelConfig.from_hf(d, source=str(path))
        else:
            d.pop("cairn_format", None)
            try:
                cfg = ModelConfig.from_dict(d)
            except TypeError as e:
                raise CairnError(f"{path}: not a cairn model config ({e})") from None
    else:
        cfg = ModelConfig(vocab_size=vocab_size, **DEFAULT_MODEL)
    cfg.check_runnable()
    if cfg.vocab_size != vocab_size:
        log(f"vocab_size {cfg.vocab_size} -> {vocab_size} (the tokenizer's)")
    cfg = replace(cfg, vocab_size=vocab_size, max_seq_len=max(cfg.max_seq_len, seq_len), weight_bits=None)
    return cfg


def prepare_data(data: list[str] | None, tokenizer: str | None, out: Path, vocab_size: int, val_fraction: float,
                 seed: int, log=print):
    """A ``Prepared`` directory: ``--data`` itself when it is one, else curated from raw text into ``OUT/data``
    (reused on a rerun), with a tokenizer from ``--tokenizer`` or trained into ``OUT/tokenizer``."""
    from cairn.data.corpus import default_corpus_dir
    from cairn.data.shards import is_prepared, load_prepared

    if data and len(data) == 1 and is_prepared(data[0]):
        if tokenizer:
            raise CairnError(f"{data[0]} is prepared with its own tokenizer: leave out --tokenizer")
        return load_prepared(data[0])
    prepared_dir = out / "data"
    if is_prepared(prepared_dir):
        log(f"using the data prepared earlier in {prepared_dir}")
        return load_prepared(prepared_dir)
    paths = [Path(p) for p in data] if data else [default_corpus_dir()]
    tok_dir = Path(tokenizer) if tokenizer else out / "tokenizer"
    if not tokenizer and not (tok_dir / "tokenizer.json").is_file():
        from cairn.data.tokenizer_train import train_tokenizer

        log(f"training a {vocab_size}-token BPE tokenizer on {', '.join(map(str, paths))}")
        train_tokenizer(paths, vocab_size, tok_dir)
    from cairn.data.curate import prepare

    log(f"preparing {', '.join(map(str, paths))} -> {prepared_dir}")
    report = prepare(paths, tok_dir, prepared_dir, val_fraction=val_fraction, seed=seed, progress=False)
    log(f"kept {report['documents_kept']} of {report['documents_in']} documents; removed {report['removed']}; "
        f"tokens {report['tokens']}")
    return load_prepared(prepared_dir)


def token_byte_lengths(tokenizer) -> np.ndarray:
    """UTF-8 bytes each token id stands for (special tokens: 0), for bits per byte."""
    lengths = np.zeros(max(tokenizer.vocab_size, len(tokenizer.token_bytes)), dtype=np.int64)
    for i, b in enumerate(tokenizer.token_bytes):
        lengths[i] = len(b)
    return lengths


def run(args) -> int:
    """The body of ``cairn train pretrain`` (``args`` from its argparse parser)."""
    from cairn.tokenizer import Tokenizer
    from cairn.train.loop import TrainConfig, Trainer
    from cairn.train.objectives import LanguageModeling

    if args.threads:
        torch.set_num_threads(args.threads)
    env = None
    if args.parallel != "none":
        from cairn.train import distributed

        env = distributed.setup(parallel=args.parallel, device=args.device, tp=args.tp, timeout_s=args.pg_timeout)
    is_main = env is None or env.is_main
    log = print if is_main else (lambda *a, **k: None)
    out = Path(args.out)
    try:
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            prepared = prepare_data(args.data, args.tokenizer, out, args.vocab_size, args.val_fraction, args.seed,
                                    log=log)
        if env is not None:
            from cairn.train import distributed

            distributed.barrier(env)
            if not is_main:
                prepared = prepare_data(args.data, args.tokenizer, out, args.vocab_size, args.val_fraction,
                                        args.seed, log=log)
        tokenizer = Tokenizer.from_hf_dir(prepared.tokenizer_dir)
        cfg = model_config(args.preset, args.config, prepared.vocab_size, args.seq_len, log=log)
        if cfg.vocab_size < tokenizer.vocab_size:
            raise CairnError(f"the model's vocabulary ({cfg.vocab_size}) is smaller than the tokenizer's")
        tc = TrainConfig(
            out=str(out), steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
            grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
            weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed, val_every=args.val_every,
            val_tokens=args.val_tokens, ckpt_every=args.ckpt_every, keep=args.keep, dtype=args.dtype,
            compile=args.compile,
            activation_checkpointing=args.activation_checkpointing, device=args.device, parallel=args.parallel,
            tp=args.tp, pp_schedule=args.pp_schedule,
            max_seconds=args.max_minutes * 60 if args.max_minutes else None, progress=not args.no_progress,
        )
        from cairn.memory import check_training_fits
        from cairn.model import build_model

        if args.device == "cpu":  # (a GPU's memory is the accelerator's, and sharded runs split the state)
            check_training_fits(cfg, args.preset or args.config or "the model", batch=args.batch_size,
                                context=args.seq_len, checkpointing=args.activation_checkpointing)
        torch.manual_seed(args.seed)
        model = build_model(cfg).init_weights(seed=args.seed)
        from cairn.train import lora

        exporter = lora.from_args(model, args, base_model_name=str(out / "base"), log=log)
        if exporter is not None:  # --lora: the frozen (random) base the adapter belongs to, written once
            lora.save_base(model, out / "base", cfg, tokenizer)
        val = prepared.tokens("val")
        trainer = Trainer(tc, model, cfg, LanguageModeling(cfg.router_aux_loss_coef if cfg.n_experts else 0.0),
                          prepared.tokens("train"), val if len(val) else None, token_byte_lengths(tokenizer),
                          tokenizer, env=env, log=log, exporter=exporter)
        summary = trainer.run(resume=args.resume)
        if is_main:
            best = summary.get("best_val_loss")
            msg = f"done: step {summary['step']}, train loss {summary.get('loss', float('nan')):.3f}"
            if best is not None:
                msg += f", best validation loss {best:.3f} nats/token"
                recs = _read(out)
                vb = [r for r in recs if r.get("best")]
                if vb:
                    msg += f" ({vb[-1]['val_bpb']:.3f} bits/byte at step {vb[-1]['step']})"
                if recs and "val_bpb_all" in recs[-1]:
                    msg += (f"; the whole validation split at step {recs[-1]['step']}: "
                            f"{recs[-1]['val_bpb_all']:.3f} bits/byte")
            log(msg)
            use = f"cairn generate {out / 'base'} --adapter {out}" if args.lora else f"cairn generate {out}"
            log(f"model: {out} ({use} -p ...), metrics: {out / 'metrics.jsonl'}, "
                f"curve: {out / 'loss.png'}")
    finally:
        if env is not None:
            from cairn.train import distributed

            distributed.teardown(env)
    return 0


def _read(out: Path) -> list[dict]:
    from cairn.train.metrics import read_metrics

    return read_metrics(out / "metrics.jsonl")
