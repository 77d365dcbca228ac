"""``cairn serve``: the HTTP server from the command line.

``add_parser(subparsers)`` registers the verb with ``cairn``'s argparse; ``python -m cairn.serve.cli serve ...``
runs it on its own.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over the Anthropic Messages and OpenAI APIs, with a web chat page",
        description="Serve a model over HTTP: the Anthropic Messages API (/v1/messages), OpenAI chat completions "
        "and completions (/v1/chat/completions, /v1/completions), /v1/models, /health, /metrics and a chat page "
        "at /. API keys come from --api-key, --api-keys-file and the CAIRN_API_KEYS environment variable "
        "(comma-separated); with none configured, no key is needed.",
    )
    p.add_argument("model", nargs="?", default=None,
                   help="a GGUF file, HF directory or cairn checkpoint (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="without API keys, a Host header name to accept besides localhost and --host (repeatable); "
                        "other names are refused, against DNS rebinding. Bound to 0.0.0.0 or :: with no names given, "
                        "any Host is accepted")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this API key (x-api-key or Authorization: Bearer); repeat for several")
    p.add_argument("--api-keys-file", metavar="FILE", help="a file of API keys, one per line (# comments)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="most generation requests held at once, running or waiting; more get 529 (default 256)")
    p.add_argument("--rate-limit", type=float, default=None, metavar="RPM",
                   help="requests per minute per API key (per client address without keys); more get 429")
    p.add_argument("--max-body-mb", type=float, default=32.0, metavar="MB",
                   help="largest request body in MiB; larger ones get 413 (default 32, as Anthropic's)")
    p.add_argument("--max-context", type=int, default=None, metavar="TOKENS",
                   help="cap the context length below the model's own")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine option (e.g. kv_memory_mb=512, quantize=int8, threads=2); repeat for several")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients use and see (default: the model's name)")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="also serve the model with this LoRA adapter (PEFT's layout) merged in, as model NAME "
                        "(default: the directory's name); repeat for several. Each is a full copy of the model with "
                        "its own engine and KV cache; requests pick one by their model field")
    p.add_argument("--read-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client has to send a request's headers, and the base allowance for its body; a "
                        "slower one gets 408 and is disconnected (default 10)")
    p.add_argument("--min-body-rate", type=float, default=16.0, metavar="KIB_PER_S",
                   help="beyond --read-timeout, a request body must arrive at least this fast (default 16 KiB/s)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="S",
                   help="on Ctrl-C/SIGTERM, seconds to let in-flight requests finish (default 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    from cairn.cli import rope_args
    from cairn.serve import memory
    from cairn.serve.self_critique import add_arguments

    add_arguments(p, server=True)
    memory.add_arguments(p, server=True)
    rope_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cairn.errors import CairnError
    from cairn.serve.timeouts import header_guard

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    sock = None
    try:
        sock = bind_port(args.host, args.port)  # before the model: a busy port fails at once, not after loading
        app, engines, keys = build_app(args)
    except CairnError as e:
        if sock is not None:
            sock.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn  # (build_app imported it, while a first start's conversion ran)

    state = app.state.cairn
    shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host

    def announce() -> None:  # once the server accepts connections
        print(f"cairn serving {', '.join(state.model_names())} at http://{shown}:{args.port}/ "
              f"(chat page at /, API at /v1/messages and /v1/chat/completions; "
              f"{'API keys required' if keys else 'no API key needed'}"
              f"{'; self-critique on by default' if args.self_critique else ''})", file=sys.stderr, flush=True)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if not self.should_exit:
                announce()

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_timeout, http=header_guard(args.read_timeout))
    # uvicorn drains in-flight requests on SIGINT/SIGTERM, then re-raises the signal: exit cleanly on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        for engine in engines:
            engine.close()
    return 0


def bind_port(host: str, port: int):
    """A socket bound to ``host:port`` for the server to listen on; a ``CairnError`` naming the fix when the port
    is taken or the address cannot be had."""
    import errno
    import socket

    from cairn.errors import CairnError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise CairnError(f"--host {host!r}: not an address of this machine ({e}); e.g. 127.0.0.1 or 0.0.0.0") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait out TIME_WAIT
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise CairnError(f"port {port} on {host} is already in use (another server?): stop it, or pick a free "
                             "port with --port") from None
        raise CairnError(f"cannot listen on {host}:{port} ({e.strerror or e}): check --host and --port") from None
    return sock


def build_app(args: argparse.Namespace):
    """``(app, engines, api keys)`` from ``cairn serve``'s flags: the model (and one engine per ``--adapter``)
    loaded, the app made. Raises ``CairnError`` for anything the flags got wrong."""
    import copy
    from dataclasses import replace

    from cairn.errors import CairnError
    from cairn.weights import prepared_ahead

    # a GGUF's first conversion and the kernels' first build run in child processes (no torch) while this one checks
    # the flags and imports torch and the server: torch must not be imported before this line, or nothing overlaps
    with prepared_ahead(args.model):
        from cairn.cli import check_not_adapter, rope_from_args
        from cairn.serve.auth import load_keys

        keys = load_keys(args.api_key, args.api_keys_file)
        options = engine_options(args)
        if args.max_queue < 1:
            raise CairnError(f"--max-queue must be at least 1, got {args.max_queue}")
        adapters = adapter_specs(args.adapter)
        from cairn.serve.self_critique import settings_from_args

        critique = settings_from_args(args)  # the constitution is read before the model: a bad file fails at once
        from cairn.serve import memory

        memory_settings = memory.settings_from_args(args)
        check_not_adapter(args.model)
        rope = rope_from_args(args)
        print(f"loading {args.model or 'the default model (SmolLM2-135M-Instruct)'} ...", file=sys.stderr,
              flush=True)
        import uvicorn  # noqa: F401  (for run(): imported here, beside the conversion)

        from cairn.engine import Engine
        from cairn.serve.app import create_app  # (FastAPI and pydantic: the largest imports after torch)
    from cairn.weights import load_model

    # an engine runs a GGUF's 4- and 8-bit blocks as they are (no fp32 copy); a LoRA merge needs the fp32 weights
    loaded = load_model(args.model, rope_scaling=rope, quantized=not adapters)
    adapted = {}
    if adapters:
        from cairn.train.lora import load_merged

        for name, path in adapters.items():  # each merged into its own fp32 copy, before any engine fuses weights
            print(f"loading adapter {name} from {path} ...", file=sys.stderr, flush=True)
            adapted[name] = load_merged(replace(loaded, model=copy.deepcopy(loaded.model)), path, name=name)
    options.setdefault("eager_kernels", True)  # a server batches: no pause at its first concurrent requests
    engines = []
    try:
        engines.append(Engine(loaded, **options))
        for lm in adapted.values():
            engines.append(Engine(lm, **options))
        app = create_app(engines[0], api_keys=keys, max_queue=args.max_queue, rate_limit=args.rate_limit,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         model_name=args.served_model_name or loaded.name,
                         adapters=dict(zip(adapted, engines[1:], strict=True)),
                         self_critique=args.self_critique, critique_settings=critique,
                         allowed_hosts=_allowed_hosts(args), read_timeout=args.read_timeout,
                         min_body_rate=args.min_body_rate * 1024)
        app.state.cairn.memory = memory_settings  # token memory by default on chat requests (None: off)
    except TypeError as e:  # an option this engine does not have
        for engine in engines:
            engine.close()
        raise CairnError(f"--engine-option: {e}") from None
    except BaseException:
        for engine in engines:
            engine.close()
        raise
    return app, engines, keys


def adapter_specs(items: list[str]) -> dict[str, str]:
    """``--adapter [NAME=]DIR`` values as {model name: directory}; the name defaults to the directory's name."""
    from pathlib import Path

    from cairn.errors import CairnError

    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or Path(item).is_dir():
            name, path = Path(item).resolve().name, item
        name = name.strip()
        if not name or not path:
            raise CairnError(f"--adapter {item!r}: write it as NAME=DIR or DIR")
        if name.lower() in (n.lower() for n in out):
            raise CairnError(f"--adapter {item!r}: the model name {name!r} is given twice: name each adapter "
                             "differently (NAME=DIR)")
        out[name] = path
    return out


def engine_options(args: argparse.Namespace) -> dict:
    from cairn.errors import CairnError

    opts: dict = {}
    if args.max_context:
        opts["max_context"] = args.max_context
    for item in args.engine_option:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise CairnError(f"--engine-option {item!r}: write it as KEY=VALUE, e.g. kv_memory_mb=512")
        opts[key.strip().replace("-", "_")] = _value(raw.strip())
    return opts


def _value(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(raw)
        except ValueError:
            pass
    return raw


def _allowed_hosts(args) -> list[str] | None:
    """The Host names a keyless server answers to: localhost's, the bound address and --allowed-host; None (any)
    for a wildcard bind with no names given, where the server cannot know the names it is reached by."""
    if args.host in ("0.0.0.0", "::", "") and not args.allowed_host:
        return None
    return ["localhost", "127.0.0.1", "::1", args.host, *args.allowed_host]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cairn")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

