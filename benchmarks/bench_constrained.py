"""What does grammar-constrained decoding cost? Decode throughput of a 16-request batch with JSON-schema constraints
on half of the requests, next to the same batch unconstrained; schema compile time, cold and cached.

Both batches decode exactly ``--tokens`` tokens per request (the unconstrained ones with ignore_eos; the schema asks
for more items than fit, so the constrained ones never finish early), so the batch composition is the same step for
step and the ratio is the cost of the masks alone (computed beside the forward pass, see engine/constraint.py).

    PYTHONPATH=src python benchmarks/bench_constrained.py [--requests 16] [--tokens 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cairn.engine import Engine, Request, SamplingParams
from cairn.engine.constraint import ConstraintSpec, allowed_tokens, cache_clear, compile_constraint, fill_masks
from cairn.weights import load_model


def schema(tag: str = "") -> dict:
    """A typical API schema ($defs, nested objects, enums, bounds, an array) that cannot complete in a few tokens."""
    return {
        "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string"},
                                                               "zip": {"type": "integer", "minimum": 0}},
                              "required": ["city", "zip"], "additionalProperties": False}},
        "type": "object",
        "properties": {
            f"people{tag}": {"type": "array", "minItems": 40, "items": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 40},
                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                               "colour": {"enum": ["red", "green", "blue"]},
                               "address": {"$ref": "#/$defs/Address"},
                               "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
                "required": ["name", "age", "colour", "address", "nickname"], "additionalProperties": False}},
        },
        "required": [f"people{tag}"],
        "additionalProperties": False,
    }


def batch(engine: Engine, prompts: list[list[int]], tokens: int, constrained: bool) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds of the whole process, tokens) of one batch run to the end."""
    spec = ConstraintSpec("json_schema", schema())
    reqs = [Request(p, SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=not (constrained and i % 2 == 0),
                                      constraint=spec if constrained and i % 2 == 0 else None))
            for i, p in enumerate(prompts)]
    t, cpu = time.perf_counter(), time.process_time()
    out = engine.generate_many(reqs)
    dt, dcpu = time.perf_counter() - t, time.process_time() - cpu
    assert all(c.finish.reason == "max_tokens" for c in out), [c.finish.reason for c in out]
    return dt, dcpu, sum(len(c.token_ids) for c in out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--quantize", default="auto")
    args = ap.parse_args()

    loaded = load_model(None)
    tok = loaded.tokenizer
    questions = ["people in Paris", "a football team", "my family", "a book club", "the office", "a band",
                 "a chess club", "a class of students"]
    prompts = [tok.encode_chat([{"role": "user", "content": f"List {questions[i % len(questions)]} (#{i}) as JSON."}])
               for i in range(args.requests)]
    with Engine(loaded, quantize=args.quantize) as engine:
        # compile: the tokenizer's llguidance view is made once per model; a schema once per spec
        t = time.perf_counter()
        compile_constraint(ConstraintSpec("json_object"), tok, loaded.config.vocab_size)
        tokenizer_s = time.perf_counter() - t
        cold, cached = [], []
        for i in range(10):
            spec = ConstraintSpec("json_schema", schema(f"_{i}"))
            t = time.perf_counter()
            c = compile_constraint(spec, tok, loaded.config.vocab_size)
            fill_masks([c.matcher()], torch.zeros(1, c.words, dtype=torch.int32))  # llguidance builds lazily
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            compile_constraint(ConstraintSpec("json_schema", schema(f"_{i}")), tok, loaded.config.vocab_size)
            cached.append(time.perf_counter() - t)
        cache_clear()

        batch(engine, prompts, 8, True)  # warm-up (kernels, masks' lexer states)
        runs: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        for r in range(args.repeat):
            for constrained in (False, True) if r % 2 == 0 else (True, False):  # alternate which goes first
                dt, dcpu, n_tokens = batch(engine, prompts, args.tokens, constrained)
                runs[constrained].append(n_tokens / dt)
                cpu[constrained].append(dcpu / n_tokens * 1e3)
        free, half = statistics.median(runs[False]), statistics.median(runs[True])
        cpu_free, cpu_half = statistics.median(cpu[False]), statistics.median(cpu[True])

        # one step's masks for the constrained half, computed alone (in the engine they overlap the forward pass)
        compiled = compile_constraint(ConstraintSpec("json_schema", schema()), tok, loaded.config.vocab_size)
        matchers = [compiled.matcher() for _ in range(args.requests // 2)]
        text = tok.encode('{"people": [{"name": "Ann", "age": 31, "colour": "red", "address": {"city": "Oslo", "zip": '
                          '1234}, "nickname": null}, {"name": "Bo')
        mask_ms = []
        bits = torch.zeros(len(matchers), compiled.words, dtype=torch.int32)
        for t_id in text:
            t = time.perf_counter()
            fill_masks(matchers, bits)
            allowed_tokens(bits, loaded.config.vocab_size)
            mask_ms.append((time.perf_counter() - t) * 1e3)
            for m in matchers:
                m.advance(t_id)

    print(f"engine: {engine.quantize} weights, {torch.get_num_threads()} threads; {args.requests} requests x "
          f"{args.tokens} tokens, greedy; median of {args.repeat}")
    print("| measure | value |")
    print("|---|---|")
    print(f"| batch decode, no constraints | {free:.1f} tok/s |")
    print(f"| batch decode, JSON schema on half | {half:.1f} tok/s ({half / free:.2f}x) |")
    print(f"| CPU time per token, no constraints | {cpu_free:.2f} ms |")
    print(f"| CPU time per token, JSON schema on half | {cpu_half:.2f} ms ({cpu_half / cpu_free:.2f}x) |")
    print(f"| masks for {len(matchers)} rows, one step (median, alone) | {statistics.median(mask_ms):.2f} ms |")
    print(f"| llguidance tokenizer setup (once per model) | {tokenizer_s * 1e3:.0f} ms |")
    print(f"| schema compile + first mask, cold (median of 10 schemas) | {statistics.median(cold) * 1e3:.2f} ms |")
    print(f"| schema compile, cached | {statistics.median(cached) * 1e6:.1f} us |")


if __name__ == "__main__":
    main()
