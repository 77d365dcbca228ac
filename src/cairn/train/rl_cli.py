"""``cairn train rl``: RL from feedback with group baselines (the objective and rollouts are in
``cairn.train.rl``, the rewards in ``cairn.train.rewards``; torch is imported when the command runs)."""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from cairn.errors import CairnError


def add_parser(train_subparsers) -> None:
    """Register ``cairn train rl``."""
    from cairn.train.cli import add_data_args, add_loop_args
    from cairn.train.rewards import SPEC_HELP

    p = train_subparsers.add_parser(
        "rl", help="RL from feedback: sampled completions, group baselines (GRPO/RLOO), clipped policy gradient",
        description="Train a model with RL on prompts (JSONL: {\"prompt\": ...} or {\"messages\": [...]} lines, plus "
                    "fields such as \"answer\" that the reward reads). Every step samples --group-size completions "
                    "of --batch-size prompts (x --grad-accum) from the current policy with cairn's engine, scores "
                    "them, and takes a clipped policy-gradient step with advantages from each prompt's group and a "
                    "KL penalty to the initial model. --seq-len bounds prompt + completion; --compile auto means "
                    "off here (batch shapes change from step to step). Validation (--val-data or --val-fraction) "
                    "scores greedy completions of the held-out prompts: val_reward, and val_loss = -val_reward.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = add_data_args(p, "prompts", title="data and reward")
    d.add_argument("--reward", action="append", required=True, metavar="SPEC",
                   help=f"a reward, repeatable (the terms are summed): {SPEC_HELP}")
    c = p.add_argument_group("constitution reward (--reward constitution)")
    c.add_argument("--constitution", default=None, help="constitution YAML (default: cairn's own)")
    c.add_argument("--judge", default=None, help="the model that judges replies (default: the bundled model)")
    c.add_argument("--lambda", dest="lam", type=float, default=None,
                   help="λ in R = R_human - λ·R_const (default 1.0)")
    o = p.add_argument_group("RL")
    o.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt (the baseline's group)")
    o.add_argument("--max-new-tokens", type=int, default=64, help="longest completion, in tokens")
    o.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs are of the same "
                   "tempered distribution)")
    o.add_argument("--baseline", choices=["grpo", "rloo"], default="grpo",
                   help="grpo: (r - mean) / (std + 1e-4) over the group; rloo: r - mean of the others")
    o.add_argument("--clip", type=float, default=0.2, help="PPO clip range ε of the probability ratio")
    o.add_argument("--kl", type=float, default=0.04, help="β, the weight of the k3 KL penalty to the reference")
    o.add_argument("--ppo-epochs", type=int, default=1,
                   help="optimizer steps on each rollout (1: on-policy, the ratio is 1 and clipping never acts)")
    add_loop_args(p, steps=100, lr=1e-5, batch_size=4, seq_len=256, warmup=5, out="out/rl")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from cairn.train import lora
    from cairn.train.loop import Trainer
    from cairn.train.preference_cli import _check_resume, _train_config
    from cairn.train.rewards import build_reward, parse_spec
    from cairn.train.rl import (
        HeldOut,
        PolicyGradient,
        PolicySampler,
        Rollouts,
        encode_prompts,
        fingerprint,
        read_prompts,
        split_prompts,
    )
    from cairn.weights import load_model

    if args.parallel != "none":
        raise CairnError(f"cairn train rl runs in one process: leave out --parallel {args.parallel}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile == "auto":  # rows are as long as each rollout's longest sequence: new shapes would recompile
        args.compile = "off"
    uses_constitution = any(parse_spec(s)[1] == "constitution" for s in args.reward)
    stray = [f for f, val in (("--constitution", args.constitution), ("--judge", args.judge), ("--lambda", args.lam))
             if val is not None]
    if stray and not uses_constitution:
        raise CairnError(f"{', '.join(stray)} given without --reward constitution: add it, or leave them out")
    lam = 1.0 if args.lam is None else args.lam
    if not (math.isfinite(lam) and lam >= 0):
        raise CairnError(f"--lambda {lam}: use a number >= 0 (the weight of the constitution's violation penalty)")
    for flag, value, ok in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1),
                            ("--group-size", args.group_size, args.group_size >= 1)):
        if not ok:
            raise CairnError(f"{flag} {value}: use a positive whole number")
    if args.max_new_tokens >= args.seq_len:
        raise CairnError(f"--max-new-tokens {args.max_new_tokens} leaves no room for the prompt in --seq-len "
                         f"{args.seq_len}: raise --seq-len or lower --max-new-tokens")
    objective = PolicyGradient(args.clip, args.kl, args.temperature)  # checks --clip, --kl, --temperature
    log = print
    out = Path(args.out)

    # the reward first (a bad spec fails before any model is loaded), then the prompts it reads
    constitution = None
    if uses_constitution:
        from cairn.train import cai

        constitution = cai.load_constitution(args.constitution)

    def judge():
        return load_model(args.judge, progress=lambda m: print(m, file=sys.stderr, flush=True))

    reward = build_reward(args.reward, judge, constitution, lam)
    prompts = read_prompts(args.data, reward.needs)
    val_prompts = read_prompts(args.val_data, reward.needs) if args.val_data else None
    if val_prompts is None and args.val_fraction:
        prompts, val_prompts = split_prompts(prompts, args.val_fraction, args.seed)

    lm = load_model(args.model, progress=lambda m: print(m, file=sys.stderr, flush=True))
    tok, cfg = lm.tokenizer, replace(lm.config, weight_bits=None)  # the weights train in fp32
    if tok is None:
        raise CairnError(f"{lm.source}: the model has no tokenizer to render prompts with: save it with one")
    if args.seq_len > cfg.max_seq_len:
        raise CairnError(f"--seq-len {args.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    room = args.seq_len - args.max_new_tokens
    prompts, ids, dropped = encode_prompts(tok, prompts, room)
    val_ids, val_dropped = [], 0
    if val_prompts:
        val_prompts, val_ids, val_dropped = encode_prompts(tok, val_prompts, room)
    log(f"{len(prompts)} training and {len(val_ids)} validation prompts"
        + (f"; {dropped + val_dropped} longer than --seq-len - --max-new-tokens = {room} tokens left out"
           if dropped + val_dropped else ""))
    if not prompts:
        raise CairnError(f"every training prompt is longer than {room} tokens (--seq-len {args.seq_len} minus "
                         f"--max-new-tokens {args.max_new_tokens}): raise --seq-len or lower --max-new-tokens")
    extra: dict[str, Any] = {
        "objective": "rl", "model": str(lm.source), "reward": list(args.reward), "constitution": args.constitution,
        "judge": args.judge, "lambda": lam if uses_constitution else None, "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "baseline": args.baseline,
        "clip": args.clip, "kl": args.kl, "ppo_epochs": args.ppo_epochs, "data": fingerprint(ids, prompts),
        "val_data": fingerprint(val_ids, val_prompts) if val_ids else None}
    _check_resume(out, args.resume, extra)
    tc = _train_config(args, extra)

    policy = lm.model.float().train().requires_grad_(True)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)  # the frozen initial model
    n_seq = args.batch_size * args.grad_accum * args.group_size
    sampler = PolicySampler(policy, tok, lm.config, max(n_seq, len(val_ids)), args.seq_len + 1)
    pad = tok.eos_id if tok.eos_id is not None else 0
    try:
        train = Rollouts(prompts, ids, sampler, reward, group_size=args.group_size, batch_size=args.batch_size,
                         grad_accum=args.grad_accum, seed=args.seed, baseline=args.baseline,
                         ppo_epochs=args.ppo_epochs, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, pad_id=pad)
        val = HeldOut(val_prompts, val_ids, sampler, reward, args.max_new_tokens) if val_ids else None
        torch.manual_seed(args.seed)
        exporter = lora.from_args(policy, args, base_model_name=str(lm.source), log=log)  # None without --lora
        trainer = Trainer(tc, policy, cfg, objective, train=train, val=val, tokenizer=tok, log=log,
                          exporter=exporter)
        reference.to(trainer.device)
        train.bind(trainer.model, reference, trainer.device, trainer.compute_dtype)
        if val is not None:
            val.bind(trainer.model)
            from cairn.train import checkpoint

            if not (args.resume and checkpoint.latest(out) is not None):
                _, r0, l0 = val.evaluate()
                log(f"held-out reward before training: {float(r0.mean()):.4f} (greedy, {len(r0)} prompts, "
                    f"{float(l0.mean()):.1f} tokens on average)")
        summary = trainer.run(resume=args.resume)
    finally:
        sampler.close()
    msg = f"done: step {summary['step']}, reward {summary.get('reward', float('nan')):.4f}, " \
          f"KL to reference {summary.get('kl', float('nan')):.4f} per token"
    if "val_reward" in summary:
        msg += f", held-out reward {summary['val_reward']:.4f}"
    log(msg)
    if exporter is not None:
        base = f" {args.model}" if args.model else ""
        what = f"LoRA adapter (cairn generate{base} --adapter {out} --chat -p ...)"
    else:
        what = f"model (cairn generate {out} --chat -p ...)"
    log(f"{what}: {out}, metrics: {out / 'metrics.jsonl'}, curve: {out / 'loss.png'}")
    return 0
