"""``cairn <verb> [model] [--flags]``.

User errors (``CairnError``) print ``error: <message>`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable

from cairn.errors import CairnError
from cairn.openmp import DECODE_COMMANDS, tune_for_decoding

FINISH_REASONS = {"eos": "stop", "max_tokens": "length", "stop_sequence": "stop_sequence",
                  "context_full": "length", "cancelled": "cancelled"}


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(args, quantized: bool = False):
    """The model ``args`` name; ``quantized``: for an engine only (``load_model``'s ``quantized``)."""
    import torch

    from cairn.weights import load_model

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    check_not_adapter(args.model)
    rope = rope_from_args(args)
    adapter = getattr(args, "adapter", None)
    if adapter is None:
        return load_model(args.model, dtype=dtype, progress=_progress, rope_scaling=rope, quantized=quantized)
    from cairn.train.lora import load_merged

    # merged into the fp32 weights, then cast to --dtype; the engine quantizes the merged weights (--quantize)
    return load_merged(load_model(args.model, progress=_progress, rope_scaling=rope), adapter, dtype)


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


def _engine(args, **options):
    """The engine ``_engine_args``' flags ask for; ``options`` (``EngineOptions``' fields) add to them."""
    from cairn.engine import Engine

    opts = {k: getattr(args, k) for k in ("quantize", "group_size", "window", "sinks", "kv_dtype")
            if getattr(args, k, None)}
    return Engine(_load(args, quantized=True), **{**opts, **options})


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

    if args.prompt is None and not sys.stdin.isatty():
        args.prompt = sys.stdin.read()
    if not args.prompt:
        raise CairnError("generate needs a prompt: pass -p TEXT, or pipe it in (echo TEXT | cairn generate)")
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
    from cairn import terminal
    from cairn.serve import memory
    from cairn.serve import self_critique as sc

    critique = sc.settings_from_args(args) if args.self_critique else None  # a bad constitution fails before loading
    if critique is None and (args.constitution or args.critique_principles or args.critique_rounds != 1
                             or args.critique_max_tokens != sc.CRITIQUE_MAX_TOKENS):
        raise CairnError("--constitution and --critique-* set up self-critique: add --self-critique to use them")
    memory_settings = memory.settings_from_args(args)
    if args.load:
        conversation = terminal.read_conversation(args.load)  # a bad file fails before loading the model
    engine = _engine(args)
    tok = engine.tokenizer
    if tok is None or not tok.chat_template:
        raise CairnError(f"{engine.model_name}: no chat template; use `cairn generate` for plain completion")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    chat = terminal.Chat(engine, lambda: _params(args), system=args.system, critique=critique, seed=args.seed,
                         memory=memory_settings,
                         render=terminal.Markdown() if sys.stdout.isatty() else terminal.Plain())
    if args.load:
        chat.system = next((m["content"] for m in conversation if m["role"] == "system"), args.system)
        chat.messages = [m for m in conversation if m["role"] != "system"]
    try:
        if args.prompt is not None:
            chat.turn(args.prompt)
            return 0
        if interactive:
            # Ctrl-C is how a person stops a reply: take SIGINT back if it came in ignored (a shell ignores it for
            # the jobs a script starts in the background, and children inherit that), else Ctrl-C would do nothing
            signal.signal(signal.SIGINT, signal.default_int_handler)
            print(f"cairn chat — {engine.model_name}. /help lists the commands; Ctrl-C stops a reply, Ctrl-D quits."
                  + (" Self-critique: the draft and critique show dimmed on stderr, the revision is the reply."
                     if critique is not None else ""), file=sys.stderr)
        history = None if args.no_history else terminal.history_file(args.history)
        terminal.run(chat, terminal.terminal_lines(history) if interactive else terminal.piped_lines())
    finally:
        engine.close()
    return 0


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
    rope_args(p)


ROPE_FLAG_FIELDS = {  # flag -> (RopeScaling field, the scaling types that read it)
    "rope_beta_fast": ("beta_fast", ("yarn",)),
    "rope_beta_slow": ("beta_slow", ("yarn",)),
    "rope_attention_factor": ("attention_factor", ("yarn", "longrope")),
    "rope_low_freq_factor": ("low_freq_factor", ("llama3",)),
    "rope_high_freq_factor": ("high_freq_factor", ("llama3",)),
    "rope_long_factor": ("long_factor", ("longrope",)),
    "rope_short_factor": ("short_factor", ("longrope",)),
}


def rope_args(p: argparse.ArgumentParser) -> None:
    """``--rope-scaling TYPE --rope-factor F`` and each type's own parameters: one set for every verb that loads a
    model to run it (generate, chat, serve, the evals)."""
    g = p.add_argument_group("RoPE scaling at load (replaces the model's own; raises its context to original × F)")
    g.add_argument("--rope-scaling", choices=["linear", "dynamic", "yarn", "llama3", "longrope"], default=None,
                   help="the scaling type, as HF transformers' rope_type of the same name")
    g.add_argument("--rope-factor", type=float, default=None, metavar="F",
                   help="context stretch factor (>= 1); the usable context becomes original context × F")
    g.add_argument("--rope-original-context", type=int, default=None, metavar="N",
                   help="the context the model was trained at (default: the model's own original context)")
    g.add_argument("--rope-beta-fast", type=float, default=None, help="yarn: fast boundary in rotations (HF: 32)")
    g.add_argument("--rope-beta-slow", type=float, default=None, help="yarn: slow boundary in rotations (HF: 1)")
    g.add_argument("--rope-attention-factor", type=float, default=None,
                   help="yarn, longrope: scale on cos/sin (default from the factor, as HF)")
    g.add_argument("--rope-low-freq-factor", type=float, default=None, help="llama3 (default 1, Llama 3.1's)")
    g.add_argument("--rope-high-freq-factor", type=float, default=None, help="llama3 (default 4, Llama 3.1's)")
    g.add_argument("--rope-long-factor", type=_floats, default=None, metavar="A,B,...",
                   help="longrope: head_dim/2 per-frequency divisors used past the original context (required)")
    g.add_argument("--rope-short-factor", type=_floats, default=None, metavar="A,B,...",
                   help="longrope: head_dim/2 divisors used within the original context (default all 1)")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def rope_from_args(args):
    """The ``RopeScaling`` that ``rope_args``' flags ask for (None without ``--rope-scaling``); a ``CairnError``
    naming the flag for a parameter the type does not read or one it lacks."""
    from cairn.config import RopeScaling

    kind = getattr(args, "rope_scaling", None)
    given = {f: getattr(args, f, None) for f in ("rope_factor", "rope_original_context", *ROPE_FLAG_FIELDS)}
    if kind is None:
        stray = [f for f, v in given.items() if v is not None]
        if stray:
            raise CairnError(f"--{stray[0].replace('_', '-')} sets up RoPE scaling: add --rope-scaling TYPE")
        return None
    if args.rope_factor is None:
        raise CairnError(f"--rope-scaling {kind} needs --rope-factor F (the context stretch, e.g. 4)")
    fields: dict = {"factor": args.rope_factor, "original_max_position_embeddings": args.rope_original_context}
    for flag, (name, types) in ROPE_FLAG_FIELDS.items():
        if given[flag] is not None:
            if kind not in types:
                raise CairnError(f"--{flag.replace('_', '-')} applies to --rope-scaling {' or '.join(types)}, "
                                 f"not {kind}")
            fields[name] = given[flag]
    if kind == "llama3":
        fields.setdefault("low_freq_factor", 1.0)
        fields.setdefault("high_freq_factor", 4.0)
    if kind == "longrope":
        if "long_factor" not in fields:
            raise CairnError("--rope-scaling longrope needs --rope-long-factor A,B,... (head_dim/2 numbers)")
        fields.setdefault("short_factor", [1.0] * len(fields["long_factor"]))
    return RopeScaling(type=kind, **fields)


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    p.add_argument("-p", "--prompt", default=None, help="the prompt (chat: answer this one turn and exit)")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens to generate per reply")
    p.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the most likely tokens up to "
                                                             "this probability mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens only (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed, for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in ``--help``, except where its help already names it or there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is None or action.default is False or action.default == []
                or action.default == argparse.SUPPRESS
                or (not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))):
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """cairn's parsers (the subcommands' too): defaults in ``--help``, and a wrong flag answered by the usage of the
    subcommand it was given to, with the closest flag that subcommand has."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if extra and not any(isinstance(a, argparse._SubParsersAction) for a in self._actions):
            self.error(unknown_arguments(extra, [o for a in self._actions for o in a.option_strings]))
        return ns, extra


def unknown_arguments(extra: list[str], options: list[str]) -> str:
    """``unrecognized arguments: --temprature (did you mean --temperature?)``."""
    import difflib

    msg = "unrecognized arguments: " + " ".join(extra)
    for arg in extra:
        if arg.startswith("-"):
            close = difflib.get_close_matches(arg.split("=", 1)[0], options, n=1, cutoff=0.6)
            if close:
                return msg + f" (did you mean {close[0]}?)"
    return msg


def _describe(parser: argparse.ArgumentParser) -> None:
    """A subcommand without a description gets its one-line help as one, and an option without help shows its
    default (argparse shows nothing for it), all the way down."""
    for action in parser._actions:
        if action.help is None and action.option_strings and HelpFormatter._get_help_string(None, action):
            action.help = "default: %(default)s"
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                if not sub.description and helps.get(name):
                    sub.description = helps[name][0].upper() + helps[name][1:] + "."
                _describe(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cairn", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True

    g = sub.add_parser("generate", help="complete a prompt", description=(
        "Complete a prompt with a model and print the continuation as it is produced. The prompt is -p TEXT, or "
        "standard input when -p is absent and stdin is not a terminal (echo hi | cairn generate). Greedy by "
        "default (--temperature 0): one reproducible completion, as scripts and evals want; cairn chat and the "
        "chat page sample at 0.7, the HTTP APIs keep their own default (1.0)."))
    _model_arg(g)
    _sampling_args(g, temperature=0.0, max_tokens=256)
    _engine_args(g)
    g.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk to a model (multi-turn)", description=(
        "Talk to a model in the terminal: a line editor with history across sessions, multi-line input "
        "(Esc then Enter, or end a line with \\), Ctrl-C stops a reply and keeps the conversation, Ctrl-D "
        "quits; /help lists the commands (/reset, /system, /save, /load, /stats). Replies are rendered as "
        "markdown on a terminal, plain when piped. Samples at --temperature 0.7 by default, as the chat page "
        "does (generate is greedy; the HTTP APIs keep their own default, 1.0)."))
    _model_arg(c)
    _sampling_args(c, temperature=0.7, max_tokens=512)
    _engine_args(c)
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--load", default=None, metavar="FILE",
                   help="start from a conversation saved with /save (JSON messages)")
    c.add_argument("--history", default=None, metavar="FILE",
                   help="the line editor's history file, kept across sessions (default: $CAIRN_CHAT_HISTORY, else "
                        "chat_history under $XDG_DATA_HOME/cairn, i.e. ~/.local/share/cairn/chat_history)")
    c.add_argument("--no-history", action="store_true", help="keep no history file")
    from cairn.serve.self_critique import add_arguments

    add_arguments(c, server=False)
    from cairn.serve import memory

    memory.add_arguments(c, server=False)
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
    _describe(parser)
    return parser


def _plugins() -> list[Callable]:
    """Subcommands that live with their feature (accounting, serving, training, evals)."""
    adders = []
    for module in ("cairn.accounting.cli", "cairn.serve.cli", "cairn.data.cli", "cairn.train.cli", "cairn.eval.cli",
                   "cairn.train.cai_cli", "cairn.weights.cache_cli"):
        try:
            mod = __import__(module, fromlist=["add_parser"])
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        adders.append(mod.add_parser)
    return adders


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    if words[:1] and words[0] in DECODE_COMMANDS:
        tune_for_decoding()  # before anything imports torch (cairn.openmp says why)
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
