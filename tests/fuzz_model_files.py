"""The worker of tests/test_file_fuzz.py: loads mutated model files under a memory limit.

Run as ``python -m tests.fuzz_model_files SEED_DIR KIND EXAMPLES AS_LIMIT_BYTES``. It sets the address-space limit,
then lets hypothesis mutate one of the seed model's files (KIND: gguf, safetensors, config, tokenizer) and, for
each mutation, does what ``cairn generate`` does: load the model, encode a prompt when there is a tokenizer, and
decode two tokens through the engine. Every outcome must be a success or a ``CairnError`` (which the CLI prints as
``error: ...`` with exit 2); anything else is a traceback the user would see and fails the run, as does a signal
or running out of the memory limit. Prints one JSON line: how many mutations loaded and how many were refused.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import sys
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cairn.errors import CairnError

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(), st.text(max_size=12)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6)
edge_ints = st.one_of(st.sampled_from([0, 1, -1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 3, 7, 4096, 65536]),
                      st.integers(0, 2**64 - 1))


def byte_edits(size: int):
    """Byte-level damage: overwrite a few bytes (most often in the first 4 KiB, where headers live), or cut the
    file short, or insert bytes."""
    pos = st.one_of(st.integers(0, min(size, 4096) - 1), st.integers(0, size - 1))
    overwrite = st.tuples(st.just("overwrite"), pos, st.binary(min_size=1, max_size=8))
    little_int = st.tuples(st.just("int"), pos, edge_ints)
    truncate = st.tuples(st.just("truncate"), st.integers(0, size - 1), st.just(b""))
    insert = st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8))
    return st.lists(st.one_of(overwrite, little_int, truncate, insert), min_size=1, max_size=3)


def apply_bytes(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, at, value in edits:
        at = min(at, max(len(b) - 1, 0))
        if kind == "overwrite":
            b[at:at + len(value)] = value
        elif kind == "int":
            b[at:at + 8] = struct.pack("<Q", value % 2**64)
        elif kind == "truncate":
            del b[at:]
        else:
            b[at:at] = value
    return bytes(b)


def json_edits(doc):
    """Structure-aware damage to a JSON document: a key set to an arbitrary value, a key dropped, or the whole
    document replaced; falls back to byte damage of its text."""
    paths = _paths(doc)
    set_value = st.tuples(st.just("set"), st.sampled_from(paths), st.one_of(json_values, edge_ints))
    drop = st.tuples(st.just("drop"), st.sampled_from(paths), st.none())
    whole = st.tuples(st.just("whole"), st.just(()), json_values)
    return st.lists(st.one_of(set_value, set_value, drop, whole), min_size=1, max_size=3)


def _paths(doc, prefix=(), depth=0) -> list[tuple]:
    out = [prefix] if prefix else []
    if depth < 3 and isinstance(doc, dict):
        for k, v in list(doc.items())[:40]:
            out += _paths(v, prefix + (k,), depth + 1)
    elif depth < 3 and isinstance(doc, list):
        for i, v in enumerate(doc[:4]):
            out += _paths(v, prefix + (i,), depth + 1)
    return out


def apply_json(doc, edits):
    doc = json.loads(json.dumps(doc))
    for kind, path, value in edits:
        if kind == "whole":
            doc = value
            continue
        parent = doc
        try:
            for k in path[:-1]:
                parent = parent[k]
            if kind == "set":
                parent[path[-1]] = value
            else:
                del parent[path[-1]]
        except (KeyError, IndexError, TypeError):
            pass
    return doc


def run_model(path: Path) -> str:
    """What ``cairn generate PATH -p ... --max-tokens 2`` does; ``"ok"`` or ``"refused"`` (a CairnError)."""
    from cairn.engine import Engine
    from cairn.engine.types import Request, SamplingParams
    from cairn.weights import load_model

    try:
        loaded = load_model(path)
        ids = loaded.tokenizer.encode("Hello there") if loaded.tokenizer is not None else [1, 2, 3]
        engine = Engine(loaded, kv_memory_mb=8)  # (the default pool is sized for serving)
        try:
            req = Request(prompt_ids=ids or [0], params=SamplingParams(max_tokens=2, temperature=0))
            list(engine.events(req))
        finally:
            engine.close()
        if loaded.tokenizer is not None:
            loaded.tokenizer.decode([0, 1, 2])
            loaded.tokenizer.encode_chat([{"role": "user", "content": "hi"}])
        return "ok"
    except CairnError:
        return "refused"


def main() -> int:
    seed_dir, kind, examples, limit = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    import torch

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="cairn-fuzz-"))
    os.environ["CAIRN_CACHE_DIR"] = str(work / "cache")
    outcomes = {"ok": 0, "refused": 0}
    hf_dir = seed_dir / "hf"
    gguf_file = seed_dir / "tiny.gguf"
    target = {"gguf": gguf_file, "safetensors": hf_dir / "model.safetensors", "config": hf_dir / "config.json",
              "tokenizer": hf_dir / "tokenizer.json", "tokenizer_config": hf_dir / "tokenizer_config.json"}[kind]
    original = target.read_bytes()
    is_json = target.suffix == ".json"
    strategy = json_edits(json.loads(original)) if is_json else byte_edits(len(original))
    counter = [0]

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(edits=strategy, as_bytes=st.booleans() if is_json else st.just(False),
           raw=byte_edits(len(original)) if is_json else st.just([]))
    def case(edits, as_bytes, raw):
        counter[0] += 1
        case_dir = work / f"case{counter[0]}"
        if kind == "gguf":
            case_dir.mkdir()
            path = case_dir / "m.gguf"
            path.write_bytes(apply_bytes(original, edits))
        else:
            shutil.copytree(hf_dir, case_dir)
            path = case_dir
            if not is_json:
                data = apply_bytes(original, edits)
            elif as_bytes:  # a damaged text file, not only a wrong document
                data = apply_bytes(original, raw)
            else:
                data = json.dumps(apply_json(json.loads(original), edits)).encode()
            (case_dir / target.name).write_bytes(data)
        try:
            outcomes[run_model(path)] += 1
        finally:
            shutil.rmtree(case_dir, ignore_errors=True)

    try:
        case()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"kind": kind, **outcomes}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
