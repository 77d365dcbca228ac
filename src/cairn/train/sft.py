"""Supervised fine-tuning: ``cairn train sft [MODEL] --data FILE.jsonl``.

Any model cairn loads (the bundled SmolLM2-135M-Instruct by default, a GGUF file, an HF directory, a cairn
checkpoint) is fine-tuned on conversations (``cairn.data.chat``: TRL's ``{"messages": [...]}`` lines) with the
``SFT`` objective, next-token cross-entropy on the assistant's tokens only, in the one training loop; packed rows
keep conversations apart. The model is exported to ``OUT/`` as a cairn checkpoint with its tokenizer, so
``cairn generate OUT --chat -p ...`` answers with it.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from cairn.errors import CairnError
from cairn.train.objectives import LanguageModeling


class SFT(LanguageModeling):
    """Language modelling on packed conversations: the targets are the assistant's tokens (everything else is
    IGNORE) and the batch's segment ids keep each conversation's attention to itself."""

    name = "sft"


# ------------------------------------------------------------------------------------------------ CLI
def add_parser(train_subparsers) -> None:
    """Register ``cairn train sft``."""
    from cairn.train.cli import add_data_args, add_loop_args

    p = train_subparsers.add_parser(
        "sft", help="supervised fine-tuning on conversations (loss on the assistant's tokens)",
        description="Fine-tune a model on conversations, a JSONL file of {\"messages\": [{\"role\": ..., "
                    "\"content\": ...}, ...]} lines (TRL's format). Each conversation is rendered with the model's "
                    "chat template; the loss covers the assistant's tokens only; several conversations are packed "
                    "per row without attending to each other.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = add_data_args(p, "conversations")
    d.add_argument("--overlong", choices=["truncate", "drop"], default="truncate",
                   help="conversations longer than --seq-len: keep their first --seq-len tokens, or drop them")
    add_loop_args(p, steps=100, lr=5e-5, batch_size=8, seq_len=512, warmup=10, out="out/sft")
    p.set_defaults(func=run)


def run(args) -> int:
    """The body of ``cairn train sft``."""
    import torch

    from cairn.data import chat
    from cairn.train.loop import TrainConfig, Trainer
    from cairn.train.pretrain import token_byte_lengths
    from cairn.weights import load_model

    if args.parallel == "pp":
        raise CairnError("--parallel pp does not carry packed conversations' segment ids through the pipeline: "
                         "use ddp, fsdp, tp or fsdp+tp")
    if args.threads:
        torch.set_num_threads(args.threads)
    tc = TrainConfig(
        out=str(args.out), steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed, val_every=args.val_every,
        val_tokens=args.val_tokens, ckpt_every=args.ckpt_every, keep=args.keep, dtype=args.dtype,
        compile=args.compile, activation_checkpointing=args.activation_checkpointing, device=args.device,
        parallel=args.parallel, tp=args.tp, pp_schedule=args.pp_schedule,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None, progress=not args.no_progress,
        extra={"objective": "sft", "data": str(args.data), "val_data": args.val_data,
               "val_fraction": args.val_fraction, "overlong": args.overlong},
    )
    conversations = chat.read_conversations(args.data)  # checked before a model is loaded: bad data fails fast
    val_conversations = chat.read_conversations(args.val_data) if args.val_data else None
    if args.val_fraction:
        conversations, val_conversations = chat.split_conversations(conversations, args.val_fraction, args.seed)

    env = None
    if args.parallel != "none":
        from cairn.train import distributed

        env = distributed.setup(parallel=args.parallel, device=args.device, tp=args.tp, timeout_s=args.pg_timeout)
    is_main = env is None or env.is_main
    log = print if is_main else (lambda *a, **k: None)
    out = Path(args.out)
    try:
        if is_main:  # rank 0 first: a GGUF's first load writes the conversion cache
            lm = load_model(args.model, progress=log)
        if env is not None:
            from cairn.train import distributed

            distributed.barrier(env)
            if not is_main:
                lm = load_model(args.model)
        tok = lm.tokenizer
        if tok is None:
            raise CairnError(f"{lm.source}: the model has no tokenizer to render conversations with: save it "
                             "with one (cairn convert ... --to cairn keeps it)")
        examples, report = chat.tokenize_conversations(tok, conversations, args.seq_len, args.overlong,
                                                  progress=tc.progress and is_main)
        _log_report(log, "training", report, args.seq_len)
        dp_rank, dp_size = (env.dp_rank, env.dp_size) if env is not None else (0, 1)
        pad = tok.eos_id if tok.eos_id is not None else 0
        train = chat.SFTBatches(examples, args.seq_len, args.batch_size, args.grad_accum, args.seed, dp_rank, dp_size,
                           pad_id=pad)
        rows, per_step = len(train.rows_of(0)), args.batch_size * args.grad_accum
        log(f"packed into {rows} rows of {args.seq_len} tokens ({report['tokens'] / (rows * args.seq_len):.0%} "
            f"filled); {per_step} rows per step: {tc.steps} steps are {tc.steps * per_step / rows:.1f} epochs")
        val = None
        if val_conversations is not None:
            val_examples, val_report = chat.tokenize_conversations(tok, val_conversations, args.seq_len, args.overlong)
            _log_report(log, "validation", val_report, args.seq_len)
            val = chat.SFTValBatches(val_examples, args.seq_len, args.batch_size, dp_rank, dp_size, pad_id=pad)
        cfg = replace(lm.config, weight_bits=None)  # the weights train in fp32, whatever the file held
        model = lm.model.float().train().requires_grad_(True)
        torch.manual_seed(args.seed)
        from cairn.train import lora

        exporter = lora.from_args(model, args, base_model_name=str(lm.source), log=log)  # None without --lora
        objective = SFT(cfg.router_aux_loss_coef if cfg.n_experts else 0.0)
        trainer = Trainer(tc, model, cfg, objective, train, val, token_byte_lengths(tok), tok, env=env, log=log,
                          exporter=exporter)
        summary = trainer.run(resume=args.resume)
        if is_main:
            msg = f"done: step {summary['step']}, train loss {summary.get('loss', float('nan')):.3f} nats/token"
            if summary.get("best_val_loss") is not None:
                msg += f", best validation loss {summary['best_val_loss']:.3f}"
            log(msg)
            if exporter is not None:
                base = f" {args.model}" if args.model else ""
                what = f"LoRA adapter: {out} (cairn generate{base} --adapter {out} --chat -p ...)"
            else:
                what = f"model: {out} (cairn generate {out} --chat -p ...)"
            log(f"{what}, metrics: {out / 'metrics.jsonl'}, curve: {out / 'loss.png'}")
    finally:
        if env is not None:
            from cairn.train import distributed

            distributed.teardown(env)
    return 0


def _log_report(log, name: str, r: dict[str, int], seq_len: int) -> None:
    msg = (f"{name}: {r['kept']} of {r['conversations']} conversations, {r['tokens']:,} tokens, "
           f"{r['assistant_tokens']:,} assistant tokens to predict")
    if r["truncated"] or r["dropped"]:
        msg += f"; longer than --seq-len {seq_len}: {r['truncated']} truncated, {r['dropped']} dropped"
    log(msg)
