"""int8 / int4 weights: kernels against dequantized matmuls, and the default model's greedy text and perplexity."""

import math

import pytest
import torch
import torch.nn.functional as F

from cairn.engine import Engine, Request, SamplingParams
from cairn.engine.runner import InferenceWeights
from cairn.errors import CairnError
from cairn.weights.quant import Int4Linear, Int8Linear, Q8Linear, dequantize_int4, quantize_int4, quantize_int8

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden press adapted from wine making. Within fifty years, "
    "printers in more than two hundred European cities had produced millions of books, and the price of "
    "a book fell so far that ordinary merchants could own a small library."
)


def test_quantizers_round_trip_within_their_step():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    q, s = quantize_int8(w)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6
    for g in (32, 64, 128):
        q4, scale, lo = quantize_int4(w, g)
        assert q4.min() >= 0 and q4.max() <= 15
        err = (dequantize_int4(q4, scale, lo, g) - w).abs().reshape(64, -1, g).amax(-1)
        assert (err <= scale / 2 + 1e-5).all()
    with pytest.raises(CairnError, match="group size"):
        quantize_int4(w, 48)


def test_kernels_match_their_dequantized_weights():
    g = torch.Generator().manual_seed(1)
    w, b, x = torch.randn(96, 128, generator=g), torch.randn(96, generator=g), torch.randn(5, 128, generator=g)
    lin = Int8Linear.from_float(w, b, kernel="weight_only")
    assert torch.allclose(lin(x), F.linear(x, lin.dequantized(), b), atol=1e-3)
    fb = Int8Linear.from_float(w, b, kernel="fbgemm")  # also quantizes activations: looser
    assert (fb(x) - F.linear(x, w, b)).abs().max() < 0.05 * F.linear(x, w, b).abs().max()
    i4 = Int4Linear.from_float(w, b, group_size=32)
    q4, scale, lo = quantize_int4(w, 32)
    assert torch.allclose(i4.dequantized(), dequantize_int4(q4, scale, lo, 32), atol=1e-5)
    assert torch.allclose(i4(x), F.linear(x, i4.dequantized(), b), atol=1e-3)


def perplexity(engine: Engine, ids: list[int], decode_from: int | None = None) -> float:
    logits = engine.runner.score(ids, decode_from)
    return math.exp(F.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item())


@pytest.mark.parametrize(("mode", "kernel", "min_agree"), [
    ("int8", "auto", 0.8),  # decode: cairn's 8-bit kernel, per-channel weights, int16 activations
    ("int8", "fbgemm", 0.7),  # FBGEMM (activations quantized too) with 32 fp32 outlier channels per matrix
    ("int4", "auto", 0.8),  # decode: cairn's 4-bit kernel on the file's own Q4_1 codes; Q8_0 head
])
def test_quantized_default_model_agrees_with_fp32(default_model, default_engine, mode, kernel, min_agree):
    """Greedy tokens of fp32 vs the quantized model: teacher-forced top-1 agreement over the first 64 tokens, each
    fed as a batch-1 decode step (free-running text diverges at the first near-tie and says little after it; the
    benchmark reports where), plus the perplexity change on a fixed text, prompt kernels and decode kernels."""
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Explain how a bicycle works."}])
    params = SamplingParams(max_tokens=64, temperature=0, ignore_eos=True)
    ref = default_engine.generate(Request(prompt, params)).token_ids
    text_ids = tok.encode(TEXT)
    ppl_ref = perplexity(default_engine, text_ids)
    with Engine(default_model, quantize=mode, kernel=kernel, kv_memory_mb=64) as engine:
        forced = engine.runner.score(prompt + ref, decode_from=len(prompt))[len(prompt) - 1:-1].argmax(-1).tolist()
        ppl = perplexity(engine, text_ids)
        ppl_decode = perplexity(engine, text_ids, decode_from=1)
        assert engine.stats()["decode_weight_bytes"] < default_engine.stats()["weight_bytes"] / 3
    agree = sum(a == b for a, b in zip(ref, forced, strict=True))
    print(f"\n{mode}/{kernel}: {agree}/64 greedy tokens agree (teacher-forced decode); perplexity {ppl_ref:.3f} "
          f"(fp32) -> {ppl:.3f} prompt kernels ({100 * (ppl / ppl_ref - 1):+.1f}%), {ppl_decode:.3f} decode kernels "
          f"({100 * (ppl_decode / ppl_ref - 1):+.1f}%)")
    assert agree >= min_agree * 64
    assert ppl < ppl_ref * 1.5 and ppl_decode < ppl_ref * 1.5


def test_int4_g32_reproduces_the_gguf_q4_1_blocks_exactly(default_model):
    """int4 with groups of 32 over the dequantized Q4_1 weights finds the file's own codes, scales and minima, and
    the 8-bit head in groups of 32 the file's Q8_0 embedding: on this GGUF the int4 engine adds no weight
    rounding at all."""
    import gguf

    from cairn.weights import default_model_path
    from cairn.weights.quant import int4_from_q4_1, q4_1_blocks

    reader = gguf.GGUFReader(default_model_path())
    t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
    assert t.tensor_type.name == "Q4_1"
    d, m, q = q4_1_blocks(t.data, int(t.shape[1]), int(t.shape[0]))
    w = default_model.model.layers[3].mlp.down.weight
    q2, scale, lo = quantize_int4(w, 32)
    assert torch.equal(q2, q)
    assert torch.equal(dequantize_int4(q2, scale, lo, 32), w)
    assert torch.allclose(int4_from_q4_1(d, m, q).dequantized(), w, atol=1e-6)
    head = InferenceWeights(default_model.model, "int4").head.small
    assert isinstance(head, Q8Linear) and torch.equal(head.dequantized(), default_model.model.output_weight())


def test_fp16_kv_agrees_with_fp32_kv_on_the_default_model(default_model):
    """int4 "auto" keeps its KV in fp16: against the same engine with fp32 KV, the teacher-forced greedy tokens of
    the first 64 and the perplexity of the decode kernels on a fixed text (the change is printed)."""
    tok = default_model.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Explain how a bicycle works."}])
    text_ids = tok.encode(TEXT)
    out = {}
    for kv_dtype in ("float32", "auto"):
        with Engine(default_model, quantize="int4", kv_dtype=kv_dtype, kv_memory_mb=64) as engine:
            ref = out.get("ref") or engine.generate(Request(prompt, SamplingParams(max_tokens=64, temperature=0,
                                                                                   ignore_eos=True))).token_ids
            out.setdefault("ref", ref)
            forced = engine.runner.score(prompt + ref, decode_from=len(prompt))[len(prompt) - 1:-1].argmax(-1)
            out[kv_dtype] = (engine.pool.dtype, forced.tolist(), perplexity(engine, text_ids, decode_from=1))
    assert out["float32"][0] == torch.float32 and out["auto"][0] == torch.float16
    agree = sum(a == b for a, b in zip(out["float32"][1], out["auto"][1], strict=True))
    ppl32, ppl16 = out["float32"][2], out["auto"][2]
    print(f"\nint4, fp16 KV vs fp32 KV: {agree}/64 teacher-forced greedy tokens agree; decode perplexity {ppl32:.3f} "
          f"-> {ppl16:.3f} ({100 * (ppl16 / ppl32 - 1):+.2f}%)")
    assert agree >= 60 and abs(ppl16 / ppl32 - 1) < 0.02
