"""``cairn train reward`` and ``cairn train dpo`` (the models and objectives are in ``cairn.train.preference``;
torch is imported when a command runs, not when the CLI's parser is built)."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cairn.errors import CairnError


def add_parser(train_subparsers) -> None:
    """Register ``cairn train reward`` and ``cairn train dpo``."""
    from cairn.train.cli import add_loop_args

    fmt = ('JSONL, one {"prompt": ..., "chosen": ..., "rejected": ...} per line (TRL\'s field names; prompt a '
           'string or messages, replies strings or one assistant message), optional "p_chosen" in [0, 1]')
    r = train_subparsers.add_parser(
        "reward", help="train a reward model on preference pairs (Bradley-Terry)",
        description="Put a scalar head on a model's last hidden state and train it on preference pairs: " + fmt +
                    ". --batch-size counts pairs; --compile auto means off here (pair batches change shape from "
                    "step to step, and each shape would compile again). OUT/ gets the model, "
                    "reward_head.safetensors and reward_model.json; metrics.jsonl reports val_accuracy, the held-out "
                    "pairwise accuracy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_args(r)
    add_loop_args(r, steps=200, lr=1e-5, batch_size=8, seq_len=512, warmup=10, out="out/reward")
    r.set_defaults(func=run_reward)

    d = train_subparsers.add_parser(
        "dpo", help="direct preference optimisation on preference pairs",
        description="Train a model directly on preference pairs with DPO's sigmoid loss: " + fmt +
                    ". --batch-size counts pairs; --compile auto means off here (pair batches change shape from "
                    "step to step, and each shape would compile again). OUT/ gets the model (a cairn checkpoint), "
                    "or the adapter with --lora.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _data_args(d)
    o = d.add_argument_group("DPO")
    o.add_argument("--beta", type=float, default=0.1, help="strength of the pull towards the reference model")
    o.add_argument("--ref-mode", choices=["precompute", "copy"], default="precompute",
                   help="reference log-probs: computed once before training with the initial model (stored in "
                        "OUT/), or by a frozen copy of it at every step (twice the memory)")
    add_loop_args(d, steps=200, lr=1e-6, batch_size=8, seq_len=512, warmup=10, out="out/dpo")
    d.set_defaults(func=run_dpo)


def _data_args(p: argparse.ArgumentParser) -> None:
    from cairn.train.cli import add_data_args

    add_data_args(p, "pairs", val_fraction_help="default 0.1 without --val-data; 0: no validation")


def run_reward(args) -> int:
    return _run(args, "reward")


def run_dpo(args) -> int:
    return _run(args, "dpo")


def _train_config(args, extra: dict[str, Any]):
    from cairn.train.loop import TrainConfig

    return TrainConfig(
        out=str(args.out), steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, seed=args.seed, val_every=args.val_every,
        val_tokens=args.val_tokens, ckpt_every=args.ckpt_every, keep=args.keep, dtype=args.dtype,
        compile=args.compile, activation_checkpointing=args.activation_checkpointing, device=args.device,
        parallel=args.parallel, tp=args.tp, pp_schedule=args.pp_schedule,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None, progress=not args.no_progress,
        extra=extra,
    )


def _check_resume(out: Path, resume: bool, extra: dict[str, Any]) -> None:
    """Before any work: a new run must not overwrite a run's files; a resumed one must keep its objective's
    settings and data (the loop checks its own flags)."""
    from cairn.train import checkpoint

    if checkpoint.latest(out) is None:
        return
    if not resume:
        raise CairnError(f"{out} already holds checkpoints of a run: pass --resume to continue it, or pick "
                         "another --out")
    run_file = out / "run.json"
    if run_file.is_file():
        before = json.loads(run_file.read_text())["train"].get("extra") or {}
        now = json.loads(json.dumps(extra))
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            raise CairnError(f"{out}: --resume with settings that differ from the run's ({', '.join(diff)}): resume "
                             "with the original model, data and flags, or start a new run in another --out")


def _run(args, kind: str) -> int:
    import torch

    from cairn.data.preference import PairBatches, PairEval, encode_pairs, read_preferences, split_pairs
    from cairn.train import lora
    from cairn.train.loop import Trainer
    from cairn.train.preference import DPO, RewardModel, RewardObjective, reference_tables, save_reward_model
    from cairn.weights import load_model

    if args.parallel != "none":
        raise CairnError(f"cairn train {kind} runs in one process: leave out --parallel {args.parallel}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile == "auto":  # rows are as long as each batch's longest pair: every new shape would recompile
        args.compile = "off"
    log = print
    out = Path(args.out)
    pairs = read_preferences(args.data)  # checked before a model is loaded: bad data fails fast
    val_pairs = read_preferences(args.val_data) if args.val_data else None
    if val_pairs is None:
        frac = 0.1 if args.val_fraction is None else args.val_fraction
        pairs, val_pairs = split_pairs(pairs, frac, args.seed)
    lm = load_model(args.model, progress=lambda m: print(m, file=sys.stderr, flush=True))
    tok, cfg = lm.tokenizer, replace(lm.config, weight_bits=None)  # the weights train in fp32
    if tok is None:
        raise CairnError(f"{lm.source}: the model has no tokenizer to render pairs with: save it with one")
    if args.seq_len > cfg.max_seq_len:
        raise CairnError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    progress = not args.no_progress
    train_enc, dropped = encode_pairs(tok, pairs, args.seq_len, progress)
    val_enc, val_dropped = encode_pairs(tok, val_pairs, args.seq_len, progress)
    log(f"{len(train_enc)} training and {len(val_enc)} validation pairs"
        + (f"; {dropped + val_dropped} longer than --seq-len {args.seq_len} left out" if dropped + val_dropped
           else ""))
    if not train_enc:
        raise CairnError(f"every training pair is longer than --seq-len {args.seq_len} tokens: raise --seq-len (up "
                         f"to the model's {cfg.max_seq_len})")
    pad = tok.eos_id if tok.eos_id is not None else 0
    train = PairBatches(train_enc, args.batch_size, args.grad_accum, args.seed, pad_id=pad)
    val = PairEval(val_enc, args.batch_size, pad_id=pad) if val_enc else None
    extra: dict[str, Any] = {"objective": kind, "model": str(lm.source), "data": train.fingerprint,
                             "val_data": val.fingerprint if val is not None else None}
    if kind == "dpo":
        extra.update(beta=args.beta, ref_mode=args.ref_mode)
    _check_resume(out, args.resume, extra)
    tc = _train_config(args, extra)

    policy = lm.model.float().train().requires_grad_(True)
    torch.manual_seed(args.seed)
    ref = None
    if kind == "dpo":
        objective = DPO(args.beta)  # checks --beta before any copy is made
        if args.ref_mode == "copy":  # before LoRA: the reference is the plain initial model
            ref = copy.deepcopy(policy).eval().requires_grad_(False).to(args.device)
    lora_exporter = lora.from_args(policy, args, base_model_name=str(lm.source), log=log)  # None without --lora
    if kind == "reward":
        model = RewardModel(policy, tokenizer=tok, seed=args.seed)  # the head trains with or without LoRA
        objective = RewardObjective()

        def exporter(m, o, info):  # with LoRA: the adapters merged in, so the directory stands alone
            save_reward_model(o, m, cfg, tok, info)
    else:
        model, exporter = policy, lora_exporter
        objective = DPO(args.beta, ref)
    trainer = Trainer(tc, model, cfg, objective, train=train, val=val, tokenizer=tok, log=log, exporter=exporter)
    if kind == "dpo" and args.ref_mode == "precompute":
        out.mkdir(parents=True, exist_ok=True)
        reference_tables(trainer, train, val, out, args.resume, progress, log)
    summary = trainer.run(resume=args.resume)
    msg = f"done: step {summary['step']}, train loss {summary.get('loss', float('nan')):.4f} per pair"
    if "val_accuracy" in summary:
        msg += f", held-out pairwise accuracy {summary['val_accuracy']:.1%} (loss {summary['val_loss']:.4f})"
    log(msg)
    if kind == "reward":
        what = "reward model (cairn.train.preference.load_reward_model)"
    elif lora_exporter is not None:
        base = f" {args.model}" if args.model else ""
        what = f"LoRA adapter (cairn generate{base} --adapter {out} --chat -p ...)"
    else:
        what = f"model (cairn generate {out} --chat -p ...)"
    log(f"{what}: {out}, metrics: {out / 'metrics.jsonl'}, curve: {out / 'loss.png'}")
    return 0
