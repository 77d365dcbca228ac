"""``cairn cai revise | label | score``: Constitutional AI data from a model and a constitution.

- ``revise``: SL-CAI — per prompt a draft, then ``--rounds`` rounds of critique → revision under drawn principles;
  writes SFT conversations (``cairn train sft --data``) with the draft, principles and critiques recorded.
- ``label``: RL-CAI's AI feedback — two replies per prompt, the judge's soft preference under a drawn principle
  from its (A)/(B) next-token probabilities; writes preference pairs (``cairn train dpo/reward --data``).
- ``score``: per-principle violation scores r_j, ``L_viol = Σ_j 1[r_j > 0]·r_j²`` and ``R = R_human − λ·L_viol``.

The functions behind them are in ``cairn.train.cai``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cairn.data.jsonl import read_jsonl
from cairn.errors import CairnError

PROMPT_FORMAT = '{"prompt": "..."}'


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ files
def read_prompts(path: str | Path, optional: dict[str, str] | None = None) -> list[dict]:
    """The records of a JSONL prompts file: ``{"prompt": "..."}`` per line (blank lines skipped), each a non-empty
    string; ``optional`` names further fields a command reads (``"responses"``: two strings; ``"response"``: a
    string) and how to describe them. Other keys are ignored. Errors name the file and line."""
    optional = optional or {}
    path = Path(path)
    out = []
    for obj, where in read_jsonl(path, f"each line is one object {PROMPT_FORMAT}", "no such prompts file"):
        if not isinstance(obj, dict) or "prompt" not in obj:
            raise CairnError(f'{where}: no "prompt" field: each line is one object {PROMPT_FORMAT}')
        if not isinstance(obj["prompt"], str) or not obj["prompt"].strip():
            raise CairnError(f'{where}: "prompt" must be a non-empty string, not {json.dumps(obj["prompt"])[:80]}')
        rec = {"prompt": obj["prompt"].strip(), "where": where}
        for key, what in optional.items():
            if key not in obj:
                continue
            v = obj[key]
            ok = (isinstance(v, list) and len(v) == 2 and all(isinstance(x, str) and x.strip() for x in v)
                  if key == "responses" else isinstance(v, str))
            if not ok:
                raise CairnError(f'{where}: "{key}" must be {what}, not {json.dumps(v)[:80]}')
            rec[key] = [x.strip() for x in v] if key == "responses" else v.strip()
        out.append(rec)
    if not out:
        raise CairnError(f"{path}: no prompts in the file: write one {PROMPT_FORMAT} per line")
    return out


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    from cairn.weights.native import atomic_write_text

    path = Path(path)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------------ commands
def _setup(args, check=None):
    """The constitution, the prompts' records (``check(records)`` runs on them before any model loads) and the
    engine (the model loaded once: the engine holds it, ``engine.loaded`` is the judge)."""
    from cairn.cli import _engine
    from cairn.train.cai import load_constitution

    if args.max_tokens < 1:
        raise CairnError(f"--max-tokens {args.max_tokens}: give a positive number of tokens")
    if args.temperature < 0:
        raise CairnError(f"--temperature {args.temperature}: give 0 (greedy) or more")
    _params(args)  # bad sampling flags fail before the model loads
    constitution = load_constitution(args.constitution)
    records = read_prompts(args.prompts, getattr(args, "optional_fields", None))
    out = Path(args.out)
    if out.is_dir():
        raise CairnError(f"--out {out} is a directory: give a file name such as {out / 'cai.jsonl'}")
    if check is not None:
        check(records)
    return constitution, records, _engine(args)


def _judge(args, engine):
    """The model whose logits judge: ``--judge MODEL`` when given (loaded in --dtype, without --adapter), else
    MODEL itself as the engine holds it."""
    if getattr(args, "judge", None) is None:
        from cairn.weights import dequantize_weights

        dequantize_weights(engine.loaded)  # the judge's forward pass needs the fp32 weights the engine runs without
        return engine.loaded
    import torch

    from cairn.cli import _progress, check_not_adapter
    from cairn.weights import load_model

    check_not_adapter(args.judge)
    return load_model(args.judge, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype],
                      progress=_progress)


def _params(args):
    from cairn.engine import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)


def cmd_revise(args) -> int:
    from cairn.train.cai import revise

    if args.rounds < 1:
        raise CairnError(f"--rounds {args.rounds}: give at least 1 critique → revision round")
    constitution, records, engine = _setup(args)
    t0 = time.perf_counter()
    _log(f"revise: {len(records)} prompts, {args.rounds} round(s) of critique → revision under "
         f"{len(constitution)} principles ({constitution.source}) ...")
    out = revise(engine, constitution, [r["prompt"] for r in records], args.rounds, _params(args), args.seed,
                 log=_log)
    engine.close()
    kept = [r for r in out if "messages" in r]
    write_jsonl(args.out, kept)
    revised = sum(r["messages"][1]["content"] != r["draft"] for r in kept)
    print(f"wrote {len(kept)} conversations to {args.out} ({revised} changed by revision; "
          f"{time.perf_counter() - t0:.1f} s)")
    if len(kept) < len(out):
        print(f"left out {len(out) - len(kept)} prompt(s) whose draft and revisions were all empty")
    return 0


def cmd_label(args) -> int:
    from cairn.train.cai import label_pairs, sample_pairs

    def check(records):
        if args.temperature == 0 and any("responses" not in r for r in records):
            raise CairnError("--temperature 0 (greedy) gives the same reply twice: sample with a temperature above "
                             "0, or give the two replies as \"responses\" in the prompts file")

    args.optional_fields = {"responses": "two non-empty strings (the replies to compare)"}
    constitution, records, engine = _setup(args, check)
    t0 = time.perf_counter()
    todo = [i for i, r in enumerate(records) if "responses" not in r]
    if todo:
        _log(f"label: sampling two replies for {len(todo)} prompt(s) ...")
        pairs = sample_pairs(engine, [records[i]["prompt"] for i in todo], _params(args), args.seed)
        for i, pair in zip(todo, pairs, strict=True):
            records[i]["responses"] = list(pair)
    engine.close()
    usable = [r for r in records if all(r["responses"]) and r["responses"][0] != r["responses"][1]]
    _log(f"label: judging {len(usable)} pair(s), both orders each ...")
    labels = label_pairs(_judge(args, engine), constitution, [r["prompt"] for r in usable],
                         [tuple(r["responses"]) for r in usable], args.seed)
    write_jsonl(args.out, labels)
    print(f"wrote {len(labels)} preference pairs to {args.out} ({time.perf_counter() - t0:.1f} s)")
    if len(usable) < len(records):
        print(f"left out {len(records) - len(usable)} prompt(s) whose two replies were equal or empty")
    if labels:
        n = len(labels)
        pa = sum(x["p_first_as_a"] + 1 - x["p_first_as_b"] for x in labels) / (2 * n)
        mass = sum(sum(x["option_mass"]) for x in labels) / (2 * n)
        print(f"mean p_chosen {sum(x['p_chosen'] for x in labels) / n:.3f}; the judge's mean P(A) {pa:.3f} "
              f"(0.5 = no position bias; both orders are averaged); mean probability on 'A' or 'B' {mass:.3f}")
    return 0


def cmd_score(args) -> int:
    import math

    from cairn.train.cai import violation_penalty, violation_scores

    if not math.isfinite(args.lam) or args.lam < 0:
        raise CairnError(f"--lambda {args.lam}: give a number >= 0 (the weight of the constitution's penalty)")
    rm = None
    if args.reward_model is not None:
        from cairn.train.preference import load_reward_model

        rm = load_reward_model(args.reward_model)
    args.optional_fields = {"response": "a string (the reply to score)"}
    constitution, records, engine = _setup(args)
    t0 = time.perf_counter()
    todo = [i for i, r in enumerate(records) if "response" not in r]
    if todo:
        from cairn.train.cai import generate_replies

        _log(f"score: generating replies for {len(todo)} prompt(s) ...")
        gen = generate_replies(engine, [[{"role": "user", "content": records[i]["prompt"]}] for i in todo],
                               _params(args), args.seed, "response")
        for i, text in zip(todo, gen, strict=True):
            records[i]["response"] = text
    engine.close()
    prompts, replies = [r["prompt"] for r in records], [r["response"] for r in records]
    _log(f"score: {len(records)} replies × {len(constitution)} principles ...")
    scores = violation_scores(_judge(args, engine), constitution, prompts, replies)
    human = rm.score(prompts, replies) if rm is not None else [0.0] * len(records)
    rows = []
    for p, reply, s, h in zip(prompts, replies, scores, human, strict=True):
        pen = violation_penalty(s)
        rows.append({"prompt": p, "response": reply, "r": s, "l_viol": pen, "r_human": h, "lambda": args.lam,
                     "reward": h - args.lam * pen})
    write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} scored replies to {args.out} ({time.perf_counter() - t0:.1f} s)")
    n = len(rows)
    print(f"{'principle':<14}{'mean r_j':>10}{'r_j > 0':>10}")
    for pr in constitution:
        vals = [r["r"][pr.id] for r in rows]
        print(f"{pr.id:<14}{sum(vals) / n:>10.3f}{sum(v > 0 for v in vals):>7d}/{n}")
    print(f"mean L_viol {sum(r['l_viol'] for r in rows) / n:.4f}; mean R_human {sum(human) / n:.4f}; "
          f"mean R = R_human − {args.lam:g}·L_viol {sum(r['reward'] for r in rows) / n:.4f}")
    return 0


# ------------------------------------------------------------------------------------------------ parser
def add_parser(subparsers) -> None:
    from cairn.cli import _model_arg

    c = subparsers.add_parser("cai", help="Constitutional AI: critique-and-revision data, AI preference labels, "
                                          "violation scores")
    sub = c.add_subparsers(dest="cai_verb", metavar="COMMAND")
    sub.required = True

    def common(p: argparse.ArgumentParser, out_help: str, max_tokens: int = 192) -> None:
        _model_arg(p)
        p.add_argument("--prompts", required=True, metavar="FILE",
                       help=f"JSON Lines, one {PROMPT_FORMAT} per line")
        p.add_argument("--out", required=True, metavar="FILE", help=out_help)
        p.add_argument("--constitution", default=None, metavar="FILE",
                       help="a YAML constitution (default: cairn's own, cairn/data/constitution.yaml)")
        p.add_argument("--seed", type=int, default=0, help="draws of principles and sampling (default 0)")
        p.add_argument("--max-tokens", type=int, default=max_tokens,
                       help=f"tokens per generated reply, critique or revision (default {max_tokens})")
        p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
        p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1: off)")
        p.add_argument("--adapter", default=None, metavar="DIR",
                       help="a LoRA adapter merged into the model (as for generate and chat)")
        p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default=None,
                       help="weights for generation (the engine's; default auto: the file's own precision). The "
                            "judge's probabilities come from the model's own forward pass in --dtype")

    r = sub.add_parser("revise", help="SL-CAI: draft, critique and revise under drawn principles; write SFT data")
    common(r, "the SFT JSONL to write ({\"messages\": [...]} per line, plus the draft, principles and critiques)")
    r.add_argument("--rounds", type=int, default=1, help="critique → revision rounds per prompt (default 1)")
    r.set_defaults(func=cmd_revise)

    lb = sub.add_parser("label", help="RL-CAI: two replies per prompt, soft preference labels from the judge's "
                                      "(A)/(B) probabilities; write preference data")
    common(lb, "the preference JSONL to write ({\"prompt\", \"chosen\", \"rejected\", \"p_chosen\", \"principle\"} "
               "per line)")
    lb.add_argument("--judge", default=None, metavar="MODEL",
                    help="the model whose (A)/(B) probabilities label the pairs (default: MODEL itself)")
    lb.set_defaults(func=cmd_label)

    s = sub.add_parser("score", help="per-principle violation scores r_j, L_viol and R = R_human − λ·L_viol")
    common(s, "the JSONL to write (r_j per principle, l_viol, r_human, reward per reply)")
    s.add_argument("--lambda", dest="lam", type=float, default=0.2,
                   help="λ, the weight of the constitution's penalty in R = R_human − λ·L_viol (default 0.2)")
    s.add_argument("--reward-model", default=None, metavar="DIR",
                   help="R_human from this reward model (a `cairn train reward` output); without it R_human = 0")
    s.add_argument("--judge", default=None, metavar="MODEL",
                   help="the model whose Yes/No probabilities give r_j (default: MODEL itself)")
    s.set_defaults(func=cmd_score)
