"""cairn's own C kernels (``cairn.kernels``): the 4-bit matmul with its fused forms, and batch-1 decode attention,
each against a PyTorch reference; the GGUF layout; the fallback when no compiler is there."""

import ctypes
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cairn.engine import Engine, Request, SamplingParams
from cairn.engine.kv import KVPool, SequenceKV
from cairn.engine.runner import InferenceWeights, Runner, Segment
from cairn.kernels import pack_q4, unpack_q4
from cairn.weights.quant import (
    Int8Linear,
    Q4Linear,
    Q8Linear,
    dequantize_int4,
    q4_1_blocks,
    quantize_int4,
    quantize_linear,
    quantize_q8,
)

from .conftest import tiny

ROOT = Path(__file__).resolve().parents[2]


def rounded(x: torch.Tensor, levels: int = 127) -> torch.Tensor:
    """What the kernels multiply: each group of 32 activations rounded with scale max|x| / ``levels`` (the 4-bit
    kernel: int8, 127; the 8-bit kernel: int16, 32767)."""
    m, k = x.shape
    g = x.reshape(m, k // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / levels
    return (torch.round(g * (1 / torch.where(d > 0, d, torch.ones_like(d)))) * d).reshape(m, k)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("rows", [1, 2, 3, 70])  # int16 activations: 1 and 2 unpacking codes as they go; 3 and
# 70 (two chunks of 35 rows: register blocks of 6 and a tail of 5) from codes widened once per task
def test_q4_matmul_is_the_dequantized_product_of_rounded_activations(group_size, rows):
    gen = torch.Generator().manual_seed(rows * group_size)
    w = torch.randn(77, 256, generator=gen)  # 77 outputs: a last tile of 5 columns
    bias = torch.randn(77, generator=gen)
    lin = Q4Linear.from_float(w, bias, group_size)
    assert torch.equal(lin.dequantized(), dequantize_int4(*quantize_int4(w, group_size, fp16=True), group_size))
    x = torch.randn(rows, 256, generator=gen) * 3
    ref = F.linear(rounded(x), lin.dequantized(), bias)
    assert (lin(x) - ref).abs().max() < 1e-5 * ref.abs().max()
    # and close to the unrounded product: the rounding is per group of 32, 8 bits
    exact = F.linear(x, lin.dequantized(), bias)
    assert (lin(x) - exact).abs().max() < 0.02 * exact.abs().max()
    assert lin(x[None]).shape == (1, rows, 77)
    # with int16 activations (prompt chunks): within float rounding of the exact product
    ref16 = F.linear(rounded(x, 32767), lin.dequantized(), bias)
    assert (lin(x, wide=True) - ref16).abs().max() < 1e-5 * ref16.abs().max()
    assert (lin(x, wide=True) - exact).abs().max() < 1e-4 * exact.abs().max()


def test_int4_prompt_chunks_use_the_4bit_tiles_up_to_their_row_limit():
    """int4 "auto": short prompt chunks (memory-bound) run the 4-bit tiles with int16 activations, longer ones the
    fp32 weights; both give the product of the int4 values to within float rounding."""
    from cairn.weights.quant import PROMPT_Q4_ROWS, ByStep, PromptQ4

    gen = torch.Generator().manual_seed(4)
    w4 = dequantize_int4(*quantize_int4(torch.randn(40, 64, generator=gen), 32, fp16=True), 32)
    lin = quantize_linear(w4, None, "int4")
    assert isinstance(lin, ByStep) and isinstance(lin.prefill, PromptQ4)
    calls, q4_forward = [], lin.prefill.q4.forward
    lin.prefill.q4.forward = lambda x, wide=False: calls.append(wide) or q4_forward(x, wide)
    for rows, want in ((1, [True]), (PROMPT_Q4_ROWS, [True]), (PROMPT_Q4_ROWS + 1, [])):
        calls.clear()
        x = torch.randn(rows, 64, generator=gen)
        y = lin.pick(rows, prefill=True)(x)
        assert (y - x @ w4.T).abs().max() < 1e-4 * (x @ w4.T).abs().max() and calls == want, rows


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_q8_matmul_is_the_dequantized_product_of_rounded_activations(per_channel, rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(45, 96, generator=gen)
    w[3, 40] = 9.0  # an outlier weight: per channel its row gets a coarse scale, per group only its group
    bias = torch.randn(45, generator=gen)
    lin = Q8Linear.from_float(w, bias, per_channel=per_channel)
    q, d = quantize_q8(w, per_channel)
    assert torch.equal(lin.dequantized(), (q.float().view(45, 3, 32) * d[..., None]).view(45, 96))
    assert (d[3] == d[3, 0]).all() == per_channel
    assert (lin.dequantized() - w).abs().max() <= d.max() / 2 + 1e-6
    x = torch.randn(rows, 96, generator=gen) * 3
    ref = F.linear(rounded(x, 32767), lin.dequantized(), bias)
    assert (lin(x) - ref).abs().max() < 1e-5 * ref.abs().max()
    exact = F.linear(x, lin.dequantized(), bias)  # int16 activations: within float rounding of the exact product
    assert (lin(x) - exact).abs().max() < 1e-4 * exact.abs().max()


@pytest.mark.parametrize(("cls", "levels"), [(Q4Linear, 127), (Q8Linear, 32767)])
def test_fused_norm_swiglu_and_residual_forms(cls, levels):
    gen = torch.Generator().manual_seed(1)
    lin = cls.from_float(torch.randn(48, 64, generator=gen))
    w = lin.dequantized()
    x, g = torch.randn(3, 64, generator=gen) * 5, torch.rand(64, generator=gen) + 0.5
    ref = rounded(F.rms_norm(x, (64,), g, 1e-5), levels) @ w.T
    assert torch.allclose(lin.fused(x, norm=(g, 1e-5)), ref, atol=1e-4)
    gate_up = torch.randn(3, 128, generator=gen) * 4  # |x| up to ~16: silu's exp in its steep part, and past it
    ref = rounded(F.silu(gate_up[:, :64]) * gate_up[:, 64:], levels) @ w.T
    assert torch.allclose(lin.fused(gate_up, swiglu=True), ref, atol=1e-4)
    acc = torch.randn(3, 48, generator=gen)
    out = acc.clone()
    assert lin.fused(x, out=out) is out
    assert torch.allclose(out, acc + rounded(x, levels) @ w.T, atol=1e-4)
    with pytest.raises(ValueError, match="columns"):
        lin.fused(gate_up)
    with pytest.raises(ValueError, match="contiguous fp32"):
        lin.fused(x, out=torch.zeros(3, 47))


def test_q4_tiles_hold_the_gguf_q4_1_blocks_exactly(default_model):
    """The kernel reads a Q4_1 file's own numbers: re-quantizing the default model's dequantized weights gives
    back each block's 32 codes, and its scale and minimum as the file's own fp16 values."""
    import gguf

    reader = gguf.GGUFReader(str(default_model.source))
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    rows, cols = int(t.shape[1]), int(t.shape[0])
    raw = np.asarray(t.data, dtype=np.uint8).reshape(rows, cols // 32, 20)
    d, m, q = q4_1_blocks(t.data, rows, cols)
    lin = Q4Linear.from_float(dequantize_int4(q, d, m, 32))
    q2, d2, m2 = unpack_q4(lin.tiles, rows)
    assert torch.equal(q2, q) and torch.equal(d2, d) and torch.equal(m2, m)
    for values, at in ((d2, slice(0, 2)), (m2, slice(2, 4))):  # the fp16 bytes themselves
        assert torch.equal(values.half().view(torch.uint8).view(rows, -1, 2), torch.from_numpy(raw[..., at].copy()))
    assert torch.equal(pack_q4(q, d, m), lin.tiles)
    assert lin.nbytes() == rows * cols * 5 // 8  # 5 bits a weight, as in the file


def _portable_library(tmp_path, name: str):
    """``name``.c built without ``-march=native`` (x86-64's baseline: no AVX2), so its plain C path runs."""
    from cairn import kernels

    package = Path(kernels.__file__).parent
    headers = {h.name: h.read_bytes() for h in package.glob("*.h")}
    out = tmp_path / f"{name}-portable.so"
    kernels._compile(name, (package / f"{name}.c").read_bytes(), headers, kernels._compiler(), out,
                     flags=["-O2", "-fPIC", "-shared", "-std=c11"])
    return ctypes.CDLL(str(out))


def test_the_portable_c_paths_compute_what_the_avx2_paths_do(tmp_path):
    """The kernels' plain C paths (CPUs without AVX2) on the same tiles and inputs give the same products."""
    from cairn import kernels

    lib = _portable_library(tmp_path, "qgemm")
    gen = torch.Generator().manual_seed(3)
    for cls, symbol, wide in ((Q4Linear, "cairn_q4_gemm", False), (Q4Linear, "cairn_q4w_gemm", True),
                              (Q8Linear, "cairn_q8_gemm", False)):
        fn = getattr(lib, symbol)
        fn.restype, fn.argtypes = ctypes.c_int, kernels._SIGNATURES["q4"][2]
        lin = cls.from_float(torch.randn(21, 64, generator=gen), torch.randn(21, generator=gen))
        for prologue, x, kw in ((0, torch.randn(6, 64, generator=gen), {"wide": wide}),
                                (2, torch.randn(6, 128, generator=gen) * 3, {"swiglu": True, "wide": wide})):
            y = torch.empty(6, 21)
            assert fn(x.data_ptr(), lin.tiles.data_ptr(), lin.bias.data_ptr(), y.data_ptr(), 6, 21, 64, 2,
                      prologue, None, 0.0, 0) == 0
            assert torch.allclose(y, lin.fused(x, **kw), atol=1e-4, rtol=1e-5), cls.__name__
    # decode attention: 3 sequences over their own keys, with a window and a sink
    lib = _portable_library(tmp_path, "attention")
    portable = lib.cairn_decode_attention
    portable.restype, portable.argtypes = ctypes.c_int, kernels._SIGNATURES["attention"][2]
    h, hk, d, slots_total = 4, 2, 16, 40
    qkv, cos, sin = torch.randn(3, (h + 2 * hk) * d, generator=gen), torch.randn(3, d, generator=gen), \
        torch.randn(3, d, generator=gen)
    starts, key_slots = torch.tensor([0, 5, 12, 20]), torch.randperm(20, generator=gen)
    key_pos = torch.cat([torch.arange(5), torch.arange(7), torch.arange(8)])
    q_pos, slots = torch.tensor([4, 6, 7]), key_slots[starts[1:] - 1]  # each writes its newest key's slot
    for dtype in (torch.float32, torch.float16):  # the pool in fp32, and in fp16 (converted as keys load and store)
        outs = []
        for fn in (portable, kernels.attention_kernel()):
            pool_k = torch.randn(slots_total, hk, d, generator=torch.Generator().manual_seed(9)).to(dtype)
            pool_v = torch.randn(slots_total, hk, d, generator=torch.Generator().manual_seed(10)).to(dtype)
            out = torch.empty(3, h * d)
            ptrs = [t.data_ptr() for t in (qkv, cos, sin, pool_k, pool_v, slots, starts, key_slots, key_pos, q_pos)]
            assert fn(*ptrs, 3, 4, 1, h, hk, d, out.data_ptr(), 2, int(dtype == torch.float16)) == 0
            outs.append((out, pool_k, pool_v))
        (out_a, *pools_a), (out_b, *pools_b) = outs
        assert torch.allclose(out_a, out_b, atol=1e-5), dtype
        for a, b in zip(pools_a, pools_b, strict=True):  # the new keys and values, rounded the same way
            assert torch.equal(a, b), dtype


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("window", "sinks"), [(0, 0), (300, 4)])
def test_decode_attention_splits_long_sequences_and_merges_exactly(kv_dtype, window, sinks):
    """A long sequence's keys are split across threads in chunks whose softmax partials are merged: the result is
    the softmax attention over all its visible keys (here 1,500 keys, several chunks, next to a 3-key sequence)."""
    from cairn import kernels

    gen = torch.Generator().manual_seed(11)
    h, hk, d, lengths = 4, 2, 16, [1500, 3]
    n_slots = sum(lengths) + 8
    pool_k = torch.randn(n_slots, hk, d, generator=gen).to(kv_dtype)
    pool_v = torch.randn(n_slots, hk, d, generator=gen).to(kv_dtype)
    key_slots = torch.randperm(n_slots, generator=gen)[:sum(lengths)]
    starts = torch.tensor([0, lengths[0], sum(lengths)])
    key_pos = torch.cat([torch.arange(n) for n in lengths])
    q_pos = torch.tensor([n - 1 for n in lengths])
    slots = key_slots[starts[1:] - 1]  # each sequence's newest key is the one this step writes
    qkv = torch.randn(2, (h + 2 * hk) * d, generator=gen)
    cos, sin = torch.ones(2, d), torch.zeros(2, d)  # no rotation: the reference needs no RoPE
    out = torch.empty(2, h * d)
    ptrs = [t.data_ptr() for t in (qkv, cos, sin, pool_k, pool_v, slots, starts, key_slots, key_pos, q_pos)]
    assert kernels.attention_kernel()(*ptrs, 2, window, sinks, h, hk, d, out.data_ptr(), 2,
                                      int(kv_dtype == torch.float16)) == 0
    for b, n in enumerate(lengths):
        ks = key_slots[starts[b]:starts[b + 1]]
        pos = key_pos[starts[b]:starts[b + 1]]
        visible = pos <= q_pos[b]
        if window:
            visible &= (pos > q_pos[b] - window) | (pos < sinks)
        q = qkv[b, :h * d].view(h, d)
        k = pool_k[ks].float().repeat_interleave(h // hk, dim=1)  # [n, h, d]
        v = pool_v[ks].float().repeat_interleave(h // hk, dim=1)
        scores = torch.einsum("hd,nhd->hn", q, k) / d ** 0.5
        scores[:, ~visible] = float("-inf")
        ref = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).reshape(-1)
        assert torch.allclose(out[b], ref, atol=1e-5), (b, n)


def decode_logits(lm, fast: bool, quantize=None, window=None, sinks=0, steps=40, kv_dtype=torch.float32
                  ) -> torch.Tensor:
    """Greedy decode logits of a prompt + ``steps`` tokens through the runner, fused batch-1 path on or off."""
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 64, 4, kv_dtype, 0, None, False)
    runner = Runner(InferenceWeights(lm.model, quantize), pool, window, sinks)
    if not fast:
        runner._fast = False
    assert runner._fast_ok() == fast
    kv = SequenceKV(pool, window, sinks)
    tokens = list(range(5, 18))
    slots = kv.reserve(len(tokens))
    out = [runner.forward([Segment(kv, tokens, 0, slots, True)])]
    kv.commit(tokens, len(tokens))
    for _ in range(steps):
        tokens.append(int(out[-1][0].argmax()))
        pos = len(tokens) - 1
        slots = kv.reserve(1)
        out.append(runner.forward([Segment(kv, tokens[-1:], pos, slots, True)]))
        kv.commit(tokens, 1)
    kv.release()
    return torch.cat(out)


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "window", "sinks"), [
    (4, 2, None, 0),  # GQA
    (4, 4, None, 0),  # MHA
    (4, 1, 8, 2),  # MQA, a window of 8 with 2 sinks: blocks leave and masks cut inside blocks
    (4, 2, 8, 0),
])
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_decode_attention_kernel_matches_pytorch_sdpa(n_heads, n_kv_heads, window, sinks, kv_dtype):
    """The kernel against PyTorch's SDPA on the same pool; with an fp16 pool both round the new keys and values
    the same way (to nearest even) and compute in fp32."""
    lm = tiny(n_heads=n_heads, n_kv_heads=n_kv_heads)
    fast = decode_logits(lm, True, window=window, sinks=sinks, kv_dtype=kv_dtype)
    ref = decode_logits(lm, False, window=window, sinks=sinks, kv_dtype=kv_dtype)
    assert (fast - ref).abs().max() < 1e-4


def test_int4_decode_takes_the_fused_path_and_matches_the_unfused_kernels():
    """The fused 4-bit decode (norm, SwiGLU and residual inside the kernel) equals the same kernels called one
    by one on the PyTorch path, up to float summation order, which can move an activation across an int8 rounding
    boundary; the 8-bit head returns bf16-rounded logits (a step of 2⁻⁷ near 1)."""
    lm = tiny(d_model=64, d_ff=128)
    fast = decode_logits(lm, True, quantize="int4", steps=12)
    ref = decode_logits(lm, False, quantize="int4", steps=12)
    assert torch.equal(fast.argmax(-1), ref.argmax(-1))  # the same greedy text, so the same KV all along
    assert (fast - ref).abs().max() < 0.05


def test_default_model_int4_decode_is_fused(default_model):
    with Engine(default_model, quantize="int4", kv_memory_mb=64) as engine:
        out = engine.generate(Request(default_model.tokenizer.encode_chat(
            [{"role": "user", "content": "What is the capital of France?"}]), SamplingParams(max_tokens=12,
                                                                                            temperature=0)))
        assert engine.runner._fast_ok()
        assert all(isinstance(m, Q4Linear) for layer in engine.runner._fused_mods(1) for m in layer)
    assert "Paris" in out.text


def test_without_a_compiler_int4_falls_back_and_native_says_why(tmp_path):
    """No C compiler: int4 "auto" still serves (FBGEMM takes the decode steps, one warning), and asking for the
    native kernel outright is an error that names the problem and the fix."""
    script = (
        "import logging, sys, torch\n"
        "logging.basicConfig(level=logging.WARNING, stream=sys.stdout)\n"
        "from cairn.errors import CairnError\n"
        "from cairn.weights.quant import ByStep, Int8Linear, quantize_linear\n"
        "w = torch.randn(16, 64)\n"
        "lin = quantize_linear(w, None, 'int4')\n"
        "assert isinstance(lin, ByStep) and isinstance(lin.pick(1), type(lin.batch.forward))\n"
        "assert lin.small is None and isinstance(lin.batch, Int8Linear)\n"
        "print('auto ok', tuple(lin(torch.randn(1, 64)).shape))\n"
        "try:\n"
        "    quantize_linear(w, None, 'int4', kernel='native')\n"
        "except CairnError as e:\n"
        "    print('native error:', e)\n"
    )
    env = dict(os.environ, CC="no-such-compiler", PATH=str(tmp_path), CAIRN_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "auto ok (1, 16)" in r.stdout
    assert "cairn's quantized kernels are unavailable" in r.stdout
    assert "native error: no C compiler found" in r.stdout and "install one" in r.stdout


def prefilled(runner, pool, lengths, window=None, sinks=0) -> list[tuple]:
    """Sequences of the given prompt lengths, prefilled through ``runner``: ``[(SequenceKV, tokens), ...]``."""
    seqs = []
    for n in lengths:
        kv = SequenceKV(pool, window, sinks)
        tokens = [(7 * n + i) % 101 for i in range(n)]
        runner.forward([Segment(kv, tokens, 0, kv.reserve(n), True)])
        kv.commit(tokens, n)
        seqs.append((kv, tokens))
    return seqs


def decode_segments(seqs, step: int) -> list[Segment]:
    """One new token for each sequence, as a decode step's segments (commit them after the step)."""
    segs = []
    for kv, tokens in seqs:
        tokens.append((step * 13 + len(tokens)) % 101)
        segs.append(Segment(kv, tokens[-1:], len(tokens) - 1, kv.reserve(1), True))
    return segs


@pytest.mark.parametrize(("window", "sinks"), [(None, 0), (6, 2)])
def test_batched_decode_attention_kernel_matches_pytorch_sdpa(window, sinks):
    """Several sequences of different lengths in one decode step: each attends over its own keys (CSR lists in
    the kernel, padded and masked rows in PyTorch's path)."""
    lm = tiny(n_heads=4, n_kv_heads=2)
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 96, 4, torch.float32, 0, None, False)
    runner = Runner(InferenceWeights(lm.model), pool, window, sinks)
    assert runner._fast_ok()
    seqs = prefilled(runner, pool, (3, 11, 17), window, sinks)
    for step in range(6):
        segs = decode_segments(seqs, step)
        fast = runner.forward(segs)
        runner._fast = False
        ref = runner.forward(segs)  # the same step again: the KV writes are idempotent
        runner._fast = True
        assert (fast - ref).abs().max() < 1e-4
        for (kv, tokens), _ in zip(seqs, segs, strict=True):
            kv.commit(tokens, 1)


def test_an_unwritable_cache_directory_is_a_clear_kernel_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    script = (
        "from cairn.kernels import KernelUnavailable, q4_kernel\n"
        "try:\n"
        "    q4_kernel()\n"
        "except KernelUnavailable as e:\n"
        "    print('error:', e)\n"
    )
    env = dict(os.environ, CAIRN_CACHE_DIR=str(blocker / "cache"), PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "error: cannot write qgemm's library under" in r.stdout and "set CAIRN_CACHE_DIR" in r.stdout


def test_batched_int8_decode_fused_activation_pass_matches_pytorch_ops():
    """With the FBGEMM kernel, decode steps run it behind cairn's rows.c (norm, outlier split and row scales in one
    pass); the logits equal those of the same kernels behind PyTorch ops."""
    lm = tiny(d_model=64, d_ff=128)
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 96, 4, torch.float32, 0, None, False)
    runner = Runner(InferenceWeights(lm.model, "int8", kernel="fbgemm", outliers=4), pool)
    assert runner._fast_ok() and isinstance(runner._fused_mods(5)[0][0], Int8Linear)
    seqs = prefilled(runner, pool, (3, 7, 9, 12, 5))
    for step in range(4):
        segs = decode_segments(seqs, step)
        fast = runner.forward(segs)
        runner._fused_cache["batch"] = None  # the same kernels, called one by one
        ref = runner.forward(segs)
        del runner._fused_cache["batch"]
        assert (fast - ref).abs().max() < 1e-3 * ref.abs().max()
        for kv, tokens in seqs:
            kv.commit(tokens, 1)


def test_int8_auto_takes_any_input_width():
    """cairn's 8-bit kernel needs groups of 32 inputs; int8 ``auto`` on other widths uses PyTorch's kernels."""
    w, x = torch.randn(24, 40), torch.randn(3, 40)
    lin = quantize_linear(w, None, "int8")
    assert isinstance(lin.small, Int8Linear)
    assert torch.allclose(lin(x), x @ w.T, atol=0.05 * (x @ w.T).abs().max())
    assert isinstance(quantize_linear(torch.randn(24, 64), None, "int8").small, Q8Linear)


@pytest.mark.parametrize(("quantize", "lengths", "window", "sinks"), [
    ("int4", (9,), None, 0),  # batch 1
    ("int4", (3, 11, 17, 6, 9), 8, 2),  # a batch, with a window and sinks
    ("int8", (3, 11, 17), None, 0),  # 8-bit tiles
    ("int4", (300, 5), None, 0),  # a sequence long enough for its keys to be split in chunks and merged
])
def test_decode_layer_loop_in_c_equals_the_python_loop(quantize, lengths, window, sinks):
    """A fused decode step runs its loop over the layers in C (step.c), calling the same kernels in the same order
    as the Python loop: the logits are identical, and so are the keys and values written to the pool."""
    lm = tiny(d_model=64, d_ff=128, n_layers=3, n_heads=4, n_kv_heads=2)
    gen = torch.Generator().manual_seed(5)
    for block in lm.model.layers:  # norms that differ from layer to layer and from each other
        for norm in (block.attn_norm, block.mlp_norm):
            norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 96, 4, torch.float16, 0, None, False)
    runner = Runner(InferenceWeights(lm.model, quantize), pool, window, sinks)
    assert runner._fast_ok()
    seqs = prefilled(runner, pool, lengths, window, sinks)
    for step in range(5):
        segs = decode_segments(seqs, step)
        assert runner._layers_call(runner._fused_mods(len(segs))) is not None
        assert_step_as_python_loop(runner, pool, segs, step)
        for kv, tokens in seqs:
            kv.commit(tokens, 1)


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_step_team_gives_the_same_numbers_with_any_thread_count(threads):
    """A decode step runs as one team (team.h): its threads split every product's tiles and attention's tasks among
    themselves and meet at the team's barriers. One thread, or three on this 2-core machine (an uneven split, and
    waits long enough to sleep on the futex), give the logits and KV writes of two, bit for bit."""
    lm = tiny(d_model=64, d_ff=128, n_layers=3, n_heads=4, n_kv_heads=2)
    cfg = lm.config
    results = []
    before = torch.get_num_threads()
    try:
        for n in (2, threads):
            torch.set_num_threads(n)
            pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 128, 4, torch.float16, 0, None, False)
            pool.k.zero_(), pool.v.zero_()  # (slots no sequence uses would otherwise hold whatever memory held)
            runner = Runner(InferenceWeights(lm.model, "int4"), pool)
            assert runner._fast_ok()
            seqs = prefilled(runner, pool, (300, 7, 12))  # one sequence long enough to split its attention
            out = []
            for step in range(3):
                segs = decode_segments(seqs, step)
                assert runner._layers_call(runner._fused_mods(len(segs))) is not None
                out.append(runner.forward(segs, greedy=True))
                # the step's greedy tokens, each thread's share of the head merged: the logits' own argmax
                assert runner.argmax == out[-1].argmax(dim=-1).tolist()
                for kv, tokens in seqs:
                    kv.commit(tokens, 1)
            results.append((out, pool.k.clone(), pool.v.clone()))
    finally:
        torch.set_num_threads(before)
    (a, ka, va), (b, kb, vb) = results
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)
    assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("portable", [False, True])
def test_the_steps_argmax_is_torchs_with_ties_nans_and_any_split(tmp_path, portable):
    """The decode step's greedy choice (step.c, each thread over its share of a row, merged): the first largest
    value's index, a NaN counting as the largest, -inf rows giving 0, as ``torch.argmax`` has it, whatever the row's
    length and however many parts it is split into; the same in the plain C path (CPUs without AVX2)."""
    from cairn import kernels

    if portable:
        fn = _portable_library(tmp_path, "step").cairn_argmax_rows
        fn.restype, fn.argtypes = ctypes.c_int, kernels._SIGNATURES["argmax"][2]
    else:
        fn = kernels.argmax_kernel()
    gen = torch.Generator().manual_seed(4)
    for v in (1, 3, 8, 9, 31, 200, 49152):
        x = torch.randn(6, v, generator=gen)
        x[1] = torch.round(x[1])  # ties, the first wins
        x[2] = float("-inf")
        x[3, v // 2], x[3, -1] = float("nan"), float("nan")  # the first NaN wins
        x[4] = 1.0
        x[5, -1] = 100.0  # in the last part
        for parts in (1, 2, 3, 5):
            out = torch.empty(6, dtype=torch.int64)
            assert fn(x.data_ptr(), 6, v, parts, out.data_ptr()) == 0
            assert out.tolist() == torch.argmax(x, dim=-1).tolist(), (v, parts)


def assert_step_as_python_loop(runner, pool, segs, step) -> None:
    """``runner.forward(segs)`` as it runs (in C) and again with the layer loop in Python: the same logits and KV
    writes, bit for bit."""
    fast = runner.forward(segs)
    written = pool.k.clone(), pool.v.clone()
    runner._layers_cache = {k: (f, None) for k, (f, _) in runner._layers_cache.items()}  # again, in Python
    ref = runner.forward(segs)
    del runner._layers_cache
    assert torch.equal(fast, ref), step
    for now, before in zip((pool.k, pool.v), written, strict=True):  # (unused slots hold whatever was there)
        assert torch.allclose(now, before, rtol=0, atol=0, equal_nan=True)


def q8_0_blocks(w: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0 blocks [N, K/32, 34] of ``w`` (fp16 scale, 32 int8 codes), as llama.cpp's quantizer makes them."""
    g = w.reshape(w.shape[0], -1, 32)
    d = (g.abs().amax(-1, keepdim=True) / 127).half()
    q = torch.round(g / d.float().clamp_min(1e-30)).clamp(-127, 127).to(torch.int8)
    return torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=-1).contiguous()


def test_whole_decode_step_in_c_reads_a_tied_q8_embedding_from_the_head_tiles():
    """With a tied embedding kept as Q8_0 blocks that the head runs as they are, step.c reads a token's embedding
    from the head's tiles (no Python lookup): the logits and the pool are those of the Python loop, bit for bit."""
    from cairn.weights.gguf import Blocks

    lm = tiny(d_model=64, d_ff=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=203, tie_embeddings=True)
    assert lm.model.head is None  # tied
    blocks = {"embed.weight": Blocks("Q8_0", q8_0_blocks(lm.model.embed.weight.detach()))}
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 64, 4, torch.float16, 0, None, False)
    runner = Runner(InferenceWeights(lm.model, "int4", blocks=blocks), pool)
    assert runner._fast_ok()
    seqs = prefilled(runner, pool, (7,))
    for step in range(4):
        segs = decode_segments(seqs, step)
        call = runner._step_call(runner._fused_mods(1), 1)
        assert call is not None and call[3] == 1  # the embedding from the head's tiles
        assert_step_as_python_loop(runner, pool, segs, step)
        for kv, tokens in seqs:
            kv.commit(tokens, 1)


def test_rope_rows_are_the_models_tables_at_any_position():
    """A decode step's RoPE rows come from one table that grows by doubling (and past ROPE_TABLE_MAX are
    computed for the step): the values are ``_rope_tables``' at each position, exactly."""
    lm = tiny()
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 16, 4, torch.float32, 0, None, False)
    runner = Runner(InferenceWeights(lm.model), pool)
    runner.ROPE_TABLE_MAX = 4096
    for positions in ([0], [5, 1500], [3000, 2], [4095], [4096, 7], [9000]):
        cos, sin, rows = runner._rope_rows(positions)
        ref_cos, ref_sin = runner._rope_tables(torch.tensor(positions), torch.float32)
        assert torch.equal(cos[rows], ref_cos.reshape(len(positions), -1))
        assert torch.equal(sin[rows], ref_sin.reshape(len(positions), -1))
    assert runner._rope_n == 4096


@pytest.mark.parametrize("damage", ["truncate", "foreign", "no digest"])
def test_a_damaged_cached_library_is_rebuilt_not_loaded(tmp_path, damage):
    """A truncated library used to die with SIGBUS (printing nothing), a foreign one with a traceback: the cache
    keeps each library's digest and rebuilds one whose bytes do not match it."""
    env = dict(os.environ, CAIRN_CACHE_DIR=str(tmp_path / "cache"), PYTHONPATH=str(ROOT / "src"))
    script = ("import torch\nfrom cairn.kernels import rows_kernel\nrows_kernel()\nfrom cairn.kernels import _build\n"
              "print(_build('rows'))\n")

    def run():
        r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
        return Path(r.stdout.strip().splitlines()[-1])

    lib = run()
    good = lib.read_bytes()
    if damage == "truncate":
        lib.write_bytes(good[: len(good) // 3])
    elif damage == "foreign":
        lib.write_bytes(b"\x7fELF" + b"\0" * 100)
    else:
        lib.with_suffix(".sha256").unlink()
    assert run() == lib
    assert lib.with_suffix(".sha256").read_text() == hashlib.sha256(lib.read_bytes()).hexdigest()
    assert len(lib.read_bytes()) == len(good)


def test_a_start_builds_its_kernels_ahead_in_a_child_without_torch(tmp_path, monkeypatch):
    """``cairn.weights.prepared_ahead`` compiles the kernels the cache lacks in a child process that runs
    ``kernels/build.py`` by its path (no torch: the parent imports it meanwhile); the library it leaves is the one
    ``cairn.kernels`` loads, without building it again, and with it built no child is started."""
    import subprocess
    import sys

    from cairn.kernels import build
    from cairn.weights import _start_kernel_builds, prepared_ahead

    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path))
    assert not build.built("rows")
    with monkeypatch.context() as m:  # (as in a server's start: torch not imported yet)
        m.delitem(sys.modules, "torch")
        with prepared_ahead(tmp_path / "no-model.gguf", kernels=("rows",)):
            pass
    assert build.built("rows")
    lib = build._library_path("rows")
    stamp = lib.stat().st_mtime_ns
    assert build.library("rows") == lib and lib.stat().st_mtime_ns == stamp  # found, not rebuilt
    assert _start_kernel_builds(("rows",)) is None
    # the child's command, as the start runs it, imports no torch
    path = Path(build.__file__)
    r = subprocess.run([sys.executable, "-X", "importtime", str(path), "rows"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "CAIRN_CACHE_DIR": str(tmp_path / "other"),
                                         "PYTHONPATH": str(path.parents[2])})
    assert r.returncode == 0 and "cairn.errors" in r.stderr, r.stderr[-2000:]
    assert not [line for line in r.stderr.splitlines() if line.rstrip().endswith("| torch")]
    assert (tmp_path / "other" / "kernels" / lib.name).is_file()


def test_greedy_steps_take_the_steps_argmax_and_sampled_ones_do_not():
    """A batch of greedy requests takes its tokens from the step's own argmax (no second parallel region after the
    step), with the tokens torch.argmax picks from the same logits; a request that wants log-probabilities, or
    samples, has the step find none."""
    lm = tiny(d_model=64, d_ff=128)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    seen: list = []
    with Engine(lm, quantize="int4", kv_memory_mb=16) as engine:
        forward = engine.runner.forward

        def spy(segments, *args, **kw):
            logits = forward(segments, *args, **kw)
            if all(len(s.tokens) == 1 for s in segments):  # decode steps
                seen.append((kw.get("greedy", False), engine.runner.argmax, logits.argmax(-1).tolist()))
            return logits

        engine.runner.forward = spy
        greedy = engine.generate_many([Request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                                       for p in prompts])
        steps = list(seen)
        assert steps and all(asked and mine == torch_s for asked, mine, torch_s in steps)
        seen.clear()
        engine.generate(Request(prompts[0], SamplingParams(max_tokens=4, temperature=0, logprobs=True,
                                                           ignore_eos=True)))
        engine.generate(Request(prompts[0], SamplingParams(max_tokens=4, temperature=0.8, seed=1, ignore_eos=True)))
        assert seen and all(not asked and mine is None for asked, mine, _ in seen)
        engine.runner.forward = lambda segments, *a, **kw: forward(segments, *a, **{**kw, "greedy": False})
        again = engine.generate_many([Request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
                                      for p in prompts])
    assert [c.token_ids for c in greedy] == [c.token_ids for c in again]
