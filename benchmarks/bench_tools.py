"""How well does a model call tools, with and without the call grammar?

Over a held-out set of tool-use requests (``examples/tools/heldout.jsonl``: a request, the tools offered, the
expected call), the model is prompted as the server prompts it (``cairn.serve.tools``: its own chat template's tool
format, else cairn's system prompt) and its reply parsed as the server parses it. Four ways, greedy:

- ``auto, free``: tool_choice auto, no grammar (the model may answer in text);
- ``auto, grammar``: tool_choice auto with the lazy call grammar (free until the model writes ``<tool_call>``);
- ``forced, free``: the reply is prefilled with ``<tool_call>\\n`` (the unconstrained way to ask for a call);
- ``forced, grammar``: tool_choice required, the grammar from the first token (what the servers do).

Per way: how many replies contain a call (``called``), a *valid* call (a declared tool, arguments that validate
against its JSON schema, checked with ``jsonschema``), the right tool (the first call's name), and the arguments:
exactly the expected ones, and the share of expected argument values matched (strings compared case-insensitively,
trimmed).

    PYTHONPATH=src python benchmarks/bench_tools.py [MODEL] [--data examples/tools/heldout.jsonl] [--max-tokens 96]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jsonschema

from cairn.engine import Engine
from cairn.engine.types import Request, SamplingParams
from cairn.serve.tools import OPEN, CallParser, Choice, Tool, call_constraint, encode
from cairn.weights import load_model

WAYS = [("auto, free", "auto", False), ("auto, grammar", "auto", True), ("forced, free", "required", False),
        ("forced, grammar", "required", True)]


def _norm(v):
    return v.strip().lower() if isinstance(v, str) else v


def score(case: dict, text: str) -> dict:
    tools = {t["name"]: t["parameters"] for t in case["tools"]}
    _, calls = CallParser(set(tools)).feed_all(text)
    out = {"called": bool(calls), "valid": False, "tool": False, "exact": False, "arg_share": 0.0}
    if not calls:
        return out
    call = calls[0]
    try:
        args = call.input
        jsonschema.validate(args, tools[call.name])
        out["valid"] = True
    except (ValueError, jsonschema.ValidationError):
        args = None
    want = case["expected"]
    out["tool"] = call.name == want["name"]
    if out["tool"] and isinstance(args, dict):
        hits = [_norm(args.get(k)) == _norm(v) for k, v in want["arguments"].items()]
        out["arg_share"] = sum(hits) / len(hits)
        out["exact"] = all(hits) and set(args) == set(want["arguments"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="a model (default: the bundled SmolLM2-135M-Instruct)")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parent.parent / "examples/tools/heldout.jsonl"))
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases (a quick check)")
    args = ap.parse_args()
    cases = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][:args.limit]
    engine = Engine(load_model(args.model))
    tok = engine.tokenizer
    print(f"{len(cases)} cases, model {getattr(engine, 'model_name', args.model or 'default')}, greedy, "
          f"max_tokens {args.max_tokens}")
    rows = []
    for label, mode, grammar in WAYS:
        requests = []
        for case in cases:
            tools = [Tool(t["name"], t["description"], t["parameters"]) for t in case["tools"]]
            turns = [{"role": "user", "content": case["request"]}]
            prefill = OPEN + "\n" if mode == "required" and not grammar else None
            ids = encode(tok, turns, tools, prefill)
            spec = call_constraint(tools, Choice(mode, None, parallel=False)) if grammar else None
            requests.append(Request(ids, SamplingParams(max_tokens=args.max_tokens, temperature=0.0,
                                                        constraint=spec)))
        t = time.perf_counter()
        done = engine.generate_many(requests)
        seconds = time.perf_counter() - t
        results = []
        for case, c in zip(cases, done, strict=True):
            text = (OPEN + "\n" + c.text) if mode == "required" and not grammar else c.text
            results.append(score(case, text))
        n = len(results)

        def pct(key, results=results, n=n):
            return 100.0 * sum(float(x[key]) for x in results) / n

        rows.append((label, pct("called"), pct("valid"), pct("tool"), pct("exact"), pct("arg_share"), seconds))
    print("\n| way | called | valid call | right tool | exact arguments | argument values | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for label, called, valid, tool, exact, share, seconds in rows:
        print(f"| {label} | {called:.0f}% | {valid:.0f}% | {tool:.0f}% | {exact:.0f}% | {share:.0f}% | {seconds:.1f} |")
    engine.close()


if __name__ == "__main__":
    main()
