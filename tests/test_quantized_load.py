"""A quantized GGUF served from its own blocks (issue 18: a server that starts fast and stays small; issue 14: the
cache stores the quantized codes, not fp32 copies).

The references are independent of the new path: the ``gguf`` package's own reader and dequantizer, cairn's
``pack_q4``/``pack_q8`` (the kernels' layout, from unpacked codes), and an engine built the old way, from the fp32
weights the file dequantizes to.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cairn.errors import CairnError
from cairn.kernels import (
    pack_q4,
    pack_q4_1_blocks,
    pack_q8,
    pack_q8_0_blocks,
    unpack_q4_1_blocks,
    unpack_q8_0_blocks,
)
from cairn.weights.gguf import Blocks
from cairn.weights.quant import q4_1_blocks


def _random_blocks(kind: str, rows: int, groups: int, gen: torch.Generator) -> torch.Tensor:
    size, scales = {"Q4_1": (20, 4), "Q8_0": (34, 2)}[kind]
    raw = torch.randint(0, 256, (rows, groups, size), dtype=torch.uint8, generator=gen)
    halves = torch.randn(rows, groups, scales // 2, generator=gen).half()  # finite fp16 scales and minima
    raw[..., :scales] = halves.view(torch.uint8).view(rows, groups, scales)
    return raw


@pytest.mark.parametrize("rows", [[8], [13], [576, 192, 192], [16, 5, 7]])
def test_blocks_move_into_the_kernels_tiles_as_pack_q4_and_pack_q8_lay_them_out(rows):
    gen = torch.Generator().manual_seed(sum(rows))
    parts = [_random_blocks("Q4_1", n, 3, gen) for n in rows]
    unpacked = [q4_1_blocks(p.numpy(), p.shape[0], 96) for p in parts]  # (d, m, q) each
    d, m, q = (torch.cat([u[i] for u in unpacked]) for i in range(3))
    tiles = pack_q4_1_blocks(*parts)
    assert torch.equal(tiles, pack_q4(q, d, m))
    every = torch.cat(parts)
    assert torch.equal(unpack_q4_1_blocks(tiles, torch.arange(sum(rows))), every)
    pick = torch.tensor([sum(rows) - 1, 0, 3, 3])
    assert torch.equal(unpack_q4_1_blocks(tiles, pick), every[pick])

    parts8 = [_random_blocks("Q8_0", n, 3, gen) for n in rows]
    every8 = torch.cat(parts8)
    q8 = every8[..., 2:].contiguous().view(torch.int8).reshape(sum(rows), 96)
    d8 = every8[..., :2].contiguous().view(torch.float16).reshape(sum(rows), 3).float()
    tiles8 = pack_q8_0_blocks(*parts8)
    assert torch.equal(tiles8, pack_q8(q8, d8))
    assert torch.equal(unpack_q8_0_blocks(tiles8, torch.arange(sum(rows))), every8)


@pytest.fixture(scope="module")
def reader(default_model):
    from cairn.weights.gguf import open_gguf

    return open_gguf(default_model.source)


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.3.attn_q.weight", "token_embd.weight"])
def test_blocks_dequantize_to_the_gguf_packages_values_bit_for_bit(reader, name):
    import gguf

    t = next(t for t in reader.tensors if t.name == name)
    kind = t.tensor_type.name
    rows, cols = int(t.shape[1]), int(t.shape[0])
    raw = torch.from_numpy(np.array(t.data, dtype=np.uint8).reshape(rows, cols // 32, -1))
    want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(rows, cols))
    b = Blocks(kind, raw)
    assert b.shape == (rows, cols)
    assert torch.equal(b.dequantize(), want)
    ids = torch.tensor([[5, 0], [rows - 1, 5]])
    assert torch.equal(b.dequantize(ids), want[ids])


def test_cairns_reader_reads_what_the_gguf_package_reads(default_model, reader):
    import gguf

    from cairn.weights.gguf import read_metadata

    ref = gguf.GGUFReader(default_model.source)
    ours, theirs = read_metadata(reader), read_metadata(ref)
    assert ours.keys() == theirs.keys() and len(ours["tokenizer.ggml.tokens"]) == 49152
    for key, value in theirs.items():
        assert np.array_equal(ours[key], value) if isinstance(value, np.ndarray) else ours[key] == value, key
    assert [(t.name, t.tensor_type, list(t.shape), int(t.data_offset)) for t in reader.tensors] == [
        (t.name, t.tensor_type, list(t.shape), int(t.data_offset)) for t in ref.tensors]


def test_a_file_cut_inside_its_token_strings_is_an_error_naming_it(tmp_path, default_model):
    from cairn.weights.gguf import open_gguf

    data = default_model.source.read_bytes()
    at = data.index(b"tokenizer.ggml.token_type")  # the token strings come just before it
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:at - 5000])
    with pytest.raises(CairnError, match=r"cut\.gguf: cannot read this GGUF file.*past the end of the file"):
        open_gguf(bad)


@pytest.fixture(scope="module")
def blocks_engine():
    """The default model loaded as an engine loads it (``quantized=True``), and its int4 engine."""
    from cairn.engine import Engine
    from cairn.weights import load_model

    loaded = load_model(None, quantized=True)
    engine = Engine(loaded)
    yield loaded, engine
    engine.close()


@pytest.fixture(scope="module")
def fp32_int4_engine(default_model):
    """The reference: the int4 engine built from the fp32 weights the file dequantizes to (the old way)."""
    from cairn.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # quantizing 135M weights: two threads on the shared 2 cores spin against each other
    try:
        engine = Engine(default_model, quantize="int4")
    finally:
        torch.set_num_threads(threads)
    yield engine
    engine.close()


def test_a_quantized_load_keeps_the_files_blocks_and_no_fp32_copy_of_them(blocks_engine):
    from cairn.weights.gguf import CONVERTER_VERSION, cache_dir

    loaded, engine = blocks_engine
    names = set(loaded.quantized)
    assert {"embed.weight", "layers.0.attn.q.weight", "layers.29.mlp.down.weight"} <= names and len(names) == 211
    params = dict(loaded.model.named_parameters())
    assert all(params[n].is_meta for n in names)  # shapes only: no fp32 copy of any of them
    real = sum(p.numel() * p.element_size() for p in params.values() if not p.is_meta)
    assert real == (2 * 30 + 1) * 576 * 4  # the norms (fp32 in the file too), nothing else
    # the kernels hold the file's bytes once: 5 bits a weight (layers), 8.5 (the tied head, which the embedding's
    # lookups read too)
    assert engine.weights.weight_bytes() == 30 * (576 * 960 + 576 * 576 + 576 * 3072 + 1536 * 576) * 5 // 8 + \
        49152 * 576 * 34 // 32
    assert all(b._data is None for b in loaded.quantized.values())
    # the cache entry stores the blocks, not fp32 (about a fifth of the 513 MiB it was)
    entry = next((cache_dir() / "gguf").glob(f"*-v{CONVERTER_VERSION}"))
    assert (entry / "model.safetensors").stat().st_size < 100 * 2**20


def test_the_engine_on_blocks_computes_what_the_fp32_built_engine_does_bit_for_bit(blocks_engine, fp32_int4_engine):
    from cairn.engine.types import Request, SamplingParams

    loaded, engine = blocks_engine
    tok = loaded.tokenizer
    for text in ("What is the capital of France?", "Write a haiku about the sea."):
        ids = tok.encode_chat([{"role": "user", "content": text}])
        params = SamplingParams(max_tokens=24, temperature=0)
        ours = engine.generate(Request(prompt_ids=ids, params=params))
        ref = fp32_int4_engine.generate(Request(prompt_ids=ids, params=params))
        assert ours.token_ids == ref.token_ids and ours.text == ref.text
    assert "Paris" in engine.generate(Request(prompt_ids=tok.encode_chat(
        [{"role": "user", "content": "What is the capital of France?"}]), params=SamplingParams(
        max_tokens=12, temperature=0))).text
    # logits of every position: a 600-token prompt takes the fp32 product (dequantized from the tiles per call),
    # a short one the 4-bit tiles with int16 activations, and teacher-forced decode steps the decode kernels
    long = tok.encode("The quick brown fox jumps over the lazy dog. " * 60)[:600]
    assert torch.equal(engine.runner.score(long), fp32_int4_engine.runner.score(long))
    assert torch.equal(engine.runner.score(long[:40], decode_from=30),
                       fp32_int4_engine.runner.score(long[:40], decode_from=30))


def test_full_weights_gives_the_models_own_forward_pass_its_fp32_weights_for_a_while(blocks_engine, default_model):
    from cairn.serve.openai import score
    from cairn.weights import full_weights

    loaded, engine = blocks_engine
    ids = loaded.tokenizer.encode("The capital of France is Paris.")
    with torch.inference_mode():
        with full_weights(loaded) as model:
            ours = model(torch.tensor([ids]))
        ref = default_model.model(torch.tensor([ids]))
    assert torch.equal(ours, ref)
    assert all(p.is_meta for n, p in loaded.model.named_parameters() if n in loaded.quantized)
    assert score(engine, ids, 2) == score(type("E", (), {"model": default_model.model})(), ids, 2)


def test_an_engine_that_cannot_run_the_blocks_gets_fp32_weights_from_them(default_engine):
    from cairn.engine import Engine
    from cairn.engine.types import Request, SamplingParams
    from cairn.weights import load_model

    loaded = load_model(None, quantized=True)
    engine = Engine(loaded, quantize="none")
    try:
        assert loaded.quantized == {}  # every block became an fp32 parameter
        assert not any(p.is_meta for p in loaded.model.parameters())
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Name a color."}])
        params = SamplingParams(max_tokens=10, temperature=0)
        assert (engine.generate(Request(prompt_ids=ids, params=params)).token_ids
                == default_engine.generate(Request(prompt_ids=ids, params=params)).token_ids)
    finally:
        engine.close()


def test_the_cai_judge_of_an_engines_own_model_gets_its_fp32_weights(default_model):
    """``cairn train cai``/``cairn eval alignment`` judge with the engine's own model (its forward pass): the engine
    keeps running from its tiles, the judge gets the fp32 weights."""
    import argparse

    from cairn.engine import Engine
    from cairn.engine.types import Request, SamplingParams
    from cairn.train.cai_cli import _judge
    from cairn.weights import load_model

    loaded = load_model(None, quantized=True)
    engine = Engine(loaded)
    try:
        ids = loaded.tokenizer.encode_chat([{"role": "user", "content": "Name a color."}])
        params = SamplingParams(max_tokens=8, temperature=0)
        before = engine.generate(Request(prompt_ids=ids, params=params)).token_ids
        judge = _judge(argparse.Namespace(judge=None), engine)
        with torch.inference_mode():
            assert torch.equal(judge.model(torch.tensor([ids])), default_model.model(torch.tensor([ids])))
        assert engine.generate(Request(prompt_ids=ids, params=params)).token_ids == before
    finally:
        engine.close()


@pytest.mark.parametrize("question", [
    "Name three rivers of Europe and say which seas they flow into, with one fact each.",  # 48 tokens
    "Name a color.",  # 34: the whole prompt's last block of queries is 2 rows
    "Name two colors and one animal, please.",
])
def test_a_prompt_from_the_prefix_cache_decodes_as_without_it_bit_for_bit(blocks_engine, question):
    """The same request twice, with other requests between: the second's prompt comes from the prefix cache but for
    its last token (the first's tokens were cached, in whole blocks and the first tokens of another), which attends
    over the cached keys through a mask. Its greedy tokens and log-probabilities equal the first's to the last bit:
    its attention call is padded as the whole prompt's was (``runner._query_pad``), masked blocks add exact zeros,
    and a prompt's token takes the prompt's kernels even alone. (Two maskless halves merged by log-sum-exp, 15%
    faster at 8k, differ in the last bits and changed server replies with the cache's state: docs/evals.md.)"""
    from cairn.engine import FinishEvent, Request, SamplingParams

    _, engine = blocks_engine
    prompt = engine.tokenizer.encode_chat([{"role": "user", "content": question}])

    def run(ids):
        out, logprobs, finish = [], [], None
        for ev in engine.events(Request(ids, SamplingParams(max_tokens=24, temperature=0, logprobs=True))):
            if isinstance(ev, FinishEvent):
                finish = ev
            else:
                out += ev.token_ids
                logprobs += ev.logprobs
        return out, logprobs, finish.usage.cached_prompt_tokens

    first = run(prompt)
    run(prompt[:-3] + [28, 28, 28])  # (another prompt that shares all but the last few tokens)
    second = run(prompt)
    assert second[2] == len(prompt) - 1 and second[2] > first[2]
    assert first[:2] == second[:2]
