"""``cairn <verb> [model] [--flags]``.

User errors (``CairnError``) print ``error: <message>`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from cairn.errors import CairnError

FINISH_REASONS = {"eos": "stop", "max_tokens": "length", "stop_sequence": "stop_sequence",
                  "context_full": "length", "cancelled": "cancelled"}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args):
    import torch

    from cairn.weights import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    check_not_adapter(args.model)
    adapter = getattr(args, "adapter", None)
    if adapter is None:
        return load_model(args.model, dtype=dtype, progress=_progress)
    from cairn.train.lora import load_merged

    # merged into the fp32 weights, then cast to --dtype; the engine quantizes the merged weights (--quantize)
    return load_merged(load_model(args.model, progress=_progress), adapter, dtype)


def check_not_adapter(model) -> None:
    """A LoRA adapter directory given as the model: say what to do instead."""
    from pathlib import Path

    if model is None or not Path(model).is_dir():
        return
    path = Path(model)
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        try:
            base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            base = None
        raise CairnError(f"{path} is a LoRA adapter, not a model: pass its base model and --adapter {path}"
                         + (f" (it was trained on {base})" if base else ""))


def _engine(args):
    from cairn.engine import Engine

    opts = {k: getattr(args, k) for k in ("quantize", "group_size", "window", "sinks", "kv_dtype")
            if getattr(args, k, None)}
    return Engine(_load(args), **opts)


def _params(args, **overrides):
    from cairn.engine import SamplingParams

    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              seed=args.seed, stop=list(args.stop or []))
    kw.update(overrides)
    return SamplingParams(**kw)


def _stream_reply(engine, request, out=sys.stdout) -> tuple[str, list[int], object]:
    from cairn.engine import TokenEvent

    text, ids, finish = [], [], None
    for ev in engine.events(request):
        if isinstance(ev, TokenEvent):
            ids.extend(ev.token_ids)
        else:
            finish = ev
        if ev.text:
            text.append(ev.text)
            if out is not None:
                out.write(ev.text)
                out.flush()
    return "".join(text), ids, finish


# --------------------------------------------------------------------- verbs
def cmd_generate(args) -> int:
    from cairn.engine import Request

    if args.prompt is None:
        raise CairnError("generate needs a prompt: pass -p TEXT")
    engine = _engine(args)
    tok = engine.tokenizer
    if tok is None:
        raise CairnError(f"{args.model}: this checkpoint has no tokenizer; save it with one to generate text")
    ids = tok.encode_chat([{"role": "user", "content": args.prompt}]) if args.chat else tok.encode(args.prompt)
    request = Request(ids, _params(args))
    text, out_ids, finish = _stream_reply(engine, request, out=None if args.json else sys.stdout)
    if args.json:
        print(json.dumps({
            "text": text,
            "token_ids": out_ids,
            "prompt_tokens": finish.usage.prompt_tokens,
            "completion_tokens": finish.usage.completion_tokens,
            "finish_reason": FINISH_REASONS[finish.reason],
        }, ensure_ascii=False))
    else:
        print()
    engine.close()
    return 0


def cmd_chat(args) -> int:
    from cairn.engine import Request
    from cairn.serve import self_critique as sc

    critique = sc.settings_from_args(args) if args.self_critique else None  # a bad constitution fails before loading
    if critique is None and (args.constitution or args.critique_principles or args.critique_rounds != 1
                             or args.critique_max_tokens != sc.CRITIQUE_MAX_TOKENS):
        raise CairnError("--constitution and --critique-* set up self-critique: add --self-critique to use them")
    engine = _engine(args)
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        raise CairnError(f"{engine.model_name}: no chat template; use `cairn generate` for plain completion")
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    interactive = sys.stdin.isatty()
    rng = critique.rng(args.seed) if critique is not None else None  # draws principles for the whole session

    def turn(user: str) -> None:
        history.append({"role": "user", "content": user})
        if critique is None:
            request = Request(tok.encode_chat(history), _params(args))
            reply, _, finish = _stream_reply(engine, request)
        else:
            chain = sc.chain(tok, critique, history, _params(args), rng=rng)
            reply = sc.run(engine, chain, _critique_header(interactive), _critique_text)
            finish = chain.stages[-1].finish
        print()
        if finish.reason == "context_full":
            print("[context full: /reset to start over]", file=sys.stderr)
        history.append({"role": "assistant", "content": reply})

    if args.prompt is not None:
        turn(args.prompt)
        engine.close()
        return 0
    print(f"cairn chat — {engine.model_name}. /reset clears the conversation, /exit or Ctrl-D quits."
          + (" Self-critique: the draft and critique show dimmed on stderr, the revision is the reply."
             if critique is not None else ""), file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if args.system else []
            print("[conversation cleared]", file=sys.stderr)
            continue
        if interactive and critique is None:  # with self-critique, printed when the revision starts
            print("assistant> ", end="", flush=True)
        turn(line)
    engine.close()
    return 0


def _dim(text: str) -> str:
    return f"\033[2m{text}\033[0m" if sys.stderr.isatty() else text


def _critique_header(interactive: bool):
    """``cairn chat --self-critique``: each stage but the answer opens a line on stderr (``[draft]``,
    ``[critique: harm]``, ``[revision 1: harm]`` between rounds); the answer goes to stdout as the reply."""

    def on_start(step) -> None:
        if step.kind != "draft":
            print(file=sys.stderr, flush=True)  # ends the previous stage's line
        if step.final:
            if interactive:
                print("assistant> ", end="", flush=True)
            return
        label = {"draft": "[draft]", "critique": f"[critique: {step.principle.id if step.principle else ''}]",
                 "revision": f"[revision {step.round}: {step.principle.id if step.principle else ''}]"}[step.kind]
        sys.stderr.write(_dim(label + " "))
        sys.stderr.flush()

    return on_start


def _critique_text(step, piece: str) -> None:
    out = sys.stdout if step.final else sys.stderr
    out.write(piece if step.final else _dim(piece))
    out.flush()


def cmd_convert(args) -> int:
    from cairn.weights.hf import export_hf_dir
    from cairn.weights.native import save_checkpoint, write_dir

    lm = _load(args)
    save = export_hf_dir if args.to == "hf" else save_checkpoint
    # the whole directory appears at once: a killed convert leaves nothing that loads half-written
    path = write_dir(args.output, lambda tmp: save(tmp, lm.model, lm.config, lm.tokenizer))
    print(f"wrote {args.to} model to {path}")
    return 0


# -------------------------------------------------------------------- parser
def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="GGUF file, HF directory or cairn checkpoint (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (default fp32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for PyTorch")


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter (PEFT's layout: adapter_config.json + adapter_model.safetensors, as "
                        "`cairn train --lora` and PEFT write) merged into the model's fp32 weights before they are "
                        "quantized")
    p.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default=None,
                   help="weights for decode: int8 per channel, int4 group-wise, none (fp32); auto (default): the "
                        "file's own precision class (int4 for a 4-bit GGUF such as the default model, fp32 for "
                        "float weights)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=32, help="int4 group size")
    p.add_argument("--window", type=int, default=None, help="attend to the last N tokens only (bounded KV)")
    p.add_argument("--sinks", type=int, default=0, help="with --window: always keep the first N tokens")
    p.add_argument("--kv-dtype", choices=["auto", "float32", "float16", "bfloat16"], default=None,
                   help="KV cache element type; auto (default): float16 with int8/int4 weights (half the KV memory "
                        "and traffic), else the model's own")


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    p.add_argument("-p", "--prompt", default=None, help="the prompt (chat: answer this one turn and exit)")
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cairn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    g = sub.add_parser("generate", help="complete a prompt")
    _model_arg(g)
    _sampling_args(g, temperature=0.0, max_tokens=256)
    _engine_args(g)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a model (multi-turn)")
    _model_arg(c)
    _sampling_args(c, temperature=0.7, max_tokens=512)
    _engine_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    from cairn.serve.self_critique import add_arguments

    add_arguments(c, server=False)
    c.set_defaults(func=cmd_chat)

    v = sub.add_parser("convert", help="write a model as an HF directory or a cairn checkpoint")
    _model_arg(v)
    v.add_argument("--to", choices=["hf", "cairn"], required=True)
    v.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter to merge into the weights first: the output is the adapted model, standing "
                        "alone (e.g. to fine-tune it further, or to serve it without the adapter)")
    v.add_argument("-o", "--output", required=True, help="output directory")
    v.set_defaults(func=cmd_convert)

    for add in _plugins():
        add(sub)
    return parser


def _plugins() -> list[Callable]:
    """Subcommands that live with their feature (accounting, serving, training, evals)."""
    adders = []
    for module in ("cairn.accounting.cli", "cairn.serve.cli", "cairn.data.cli", "cairn.train.cli", "cairn.eval.cli",
                   "cairn.train.cai_cli"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        adders.append(mod.add_parser)
    return adders


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except CairnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
