"""`cairn params` and `cairn audit`: registered on the main CLI by ``add_parser``; also runnable on their own as
``python -m cairn.accounting.cli {params,audit} ...``."""

from __future__ import annotations

import argparse
import json
import sys

from cairn.accounting.costs import DTYPE_BITS, account
from cairn.errors import CairnError


def _params(args: argparse.Namespace) -> int:
    from cairn import presets
    from cairn.accounting.load import load_config
    from cairn.accounting.report import human_count, text_report, write_plot

    if args.list:
        for name in presets.names():
            total = account(presets.get(name)).total_params
            print(f"{name:26s} {human_count(total):>9s}  {presets.describe(name)['description']}")
        return 0
    if not args.model:
        raise CairnError("cairn params needs a MODEL (a preset, config.json, model directory or .gguf), or --list")
    for flag in ("dtype", "kv_dtype"):
        if getattr(args, flag) not in DTYPE_BITS:
            raise CairnError(f"--{flag.replace('_', '-')} {getattr(args, flag)!r}: use one of {', '.join(DTYPE_BITS)}")
    acc = account(load_config(args.model))
    report = acc.to_json(context=args.context, batch=args.batch, dtype=args.dtype, kv_dtype=args.kv_dtype,
                         group_size=args.group_size)
    if args.plot:
        write_plot(acc, args.plot, args.kv_dtype, args.context, args.batch)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(text_report(acc, report))
        if args.plot:
            print(f"\nwrote {args.plot}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from cairn.accounting.audit import audit_file

    result = audit_file(args.claims)
    print(result.render())
    return 1 if result.failed else 0


def add_parser(subparsers) -> None:
    """Register ``params`` and ``audit`` on an argparse subparsers object (each sets ``func``)."""
    p = subparsers.add_parser(
        "params", help="exact parameter counts, memory, KV cache and FLOPs of a model, from its config alone",
        description="MODEL is a preset (see --list), an HF config.json or its directory, a GGUF file or a cairn "
                    "checkpoint directory. Nothing is allocated: deepseek-v3 works on a laptop.",
    )
    p.add_argument("model", nargs="?", help="preset name, config.json, model directory or .gguf file")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.add_argument("--context", type=int, default=4096, help="context length T for KV cache and FLOPs (4096)")
    p.add_argument("--batch", type=int, default=1, help="batch size for KV cache and training memory (1)")
    p.add_argument("--dtype", default="bf16", help=f"training dtype: {', '.join(DTYPE_BITS)} (bf16)")
    p.add_argument("--kv-dtype", default="bf16", help="KV-cache dtype (bf16)")
    p.add_argument("--group-size", type=int, default=128, help="quantization group size for fp8/int8/int4 (128)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="write parameters by component and KV cache vs context")
    p.set_defaults(func=_params)

    a = subparsers.add_parser(
        "audit", help="check a claims file (an article's model and its numbers) claim by claim",
        description="Each claim is printed as holds / fails with the corrected figure and a reason; exit status 1 "
                    "when any claim fails. Format: docs/accounting.md.",
    )
    a.add_argument("claims", help="a claims YAML file (see examples/claims/)")
    a.set_defaults(func=_audit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cairn", description="cairn accounting: params and audit")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CairnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `cairn params … | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
