"""The engine against the model's own forward pass: batching, chunking, windows, cancellation, preemption."""

import asyncio
import queue
import random
import threading

import pytest
import torch

from cairn.engine import Engine, FinishEvent, Request, SamplingParams, TokenEvent
from cairn.errors import CairnError
from cairn.model import DenseKVCache
from tests.engine.conftest import tiny


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Greedy continuation with the model's own forward and a dense cache (no engine involved)."""
    cfg = model.cfg
    cache = DenseKVCache(cfg.n_layers, 1, cfg.n_kv_heads, cfg.head_dim, len(prompt) + n)
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache=cache, last_only=True)[0, -1]
        for _ in range(n):
            t = int(logits.argmax())
            out.append(t)
            logits = model(torch.tensor([[t]]), cache=cache)[0, -1]
    return out


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(101) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def run_concurrently(engine: Engine, requests: list[Request]) -> dict:
    out = {}
    threads = [threading.Thread(target=lambda r=r: out.__setitem__(r.id, engine.generate(r))) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


def test_batched_mixed_lengths_match_each_alone():
    lm = tiny()
    ps = prompts(6)
    want = [reference_greedy(lm.model, p, 12) for p in ps]
    # small chunks and a tight budget: prompts are split and interleaved with other sequences' decoding
    with Engine(lm, block_size=4, chunk_size=16, max_batch_tokens=24) as engine:
        reqs = [Request(p, greedy(12)) for p in ps]
        got = run_concurrently(engine, reqs)
        for r, w in zip(reqs, want, strict=True):
            assert got[r.id].token_ids == w
            assert got[r.id].finish.reason == "max_tokens"
            assert got[r.id].finish.usage.completion_tokens == 12
        assert engine.stats()["steps"] < 6 * 12  # sequences really shared steps
        engine.wait_idle()
        assert engine.stats()["kv_blocks_used"] == 0


def test_generate_many_batches_requests_and_keeps_their_order():
    lm = tiny()
    ps = prompts(5, seed=1)
    want = [reference_greedy(lm.model, p, 1 + i) for i, p in enumerate(ps)]  # different lengths: out of order
    with Engine(lm, block_size=4) as engine:
        got = engine.generate_many([Request(p, greedy(1 + i)) for i, p in enumerate(ps)])
        assert [c.token_ids for c in got] == want
        assert [c.finish.usage.completion_tokens for c in got] == [1, 2, 3, 4, 5]
        assert engine.stats()["steps"] < sum(range(1, 6))  # they shared steps
        with pytest.raises(CairnError, match="outside the vocabulary"):  # a bad request: nothing left running
            engine.generate_many([Request(ps[0], greedy(50)), Request([10**6], greedy(2))])
        engine.wait_idle()
        assert engine.stats()["running"] == 0


def test_prefix_cache_hit_reports_cached_tokens_and_same_output():
    lm = tiny()
    shared = prompts(1, seed=3, lo=40, hi=41)[0]
    a, b = shared + [5, 6, 7], shared + [9]
    with Engine(lm, block_size=8) as engine:
        ra = engine.generate(Request(a, greedy(6)))
        rb = engine.generate(Request(b, greedy(6)))
        again = engine.generate(Request(a, greedy(6)))
    assert ra.finish.usage.cached_prompt_tokens == 0
    assert rb.finish.usage.cached_prompt_tokens == 40  # 5 full blocks of the shared 40 tokens
    # a hit covers at most len(prompt) - 1 tokens: 5 full blocks, then 2 of the 3 tokens [5, 6, 7] that start a's
    # (cached) 6th block, which a's generated tokens filled
    assert again.finish.usage.cached_prompt_tokens == 42
    assert rb.token_ids == reference_greedy(lm.model, b, 6)
    assert again.token_ids == ra.token_ids


def test_exact_block_multiple_prompt_is_never_fully_cached():
    lm = tiny()
    p = prompts(1, seed=4, lo=32, hi=33)[0]
    with Engine(lm, block_size=8) as engine:
        engine.generate(Request(p, greedy(2)))
        second = engine.generate(Request(p, greedy(2)))
    # not 32: the last prompt token is always computed (3 whole blocks shared, 7 tokens of the 4th copied)
    assert second.finish.usage.cached_prompt_tokens == 31
    assert engine.stats()["prefix_hit_tokens_copied"] == 7


@pytest.mark.parametrize("sinks", [0, 4])
def test_window_matches_full_attention_reference_with_same_mask(sinks):
    lm = tiny(seed=1)
    window = 16
    # reference: the same weights in a model whose every layer has the window, attention over the whole sequence
    from cairn.config import ModelConfig
    from cairn.model import build_model

    cfg = ModelConfig(**{**lm.config.to_dict(), "sliding_window": window})
    ref = build_model(cfg).eval()
    ref.load_state_dict(lm.model.state_dict())
    prompt = prompts(1, seed=5, lo=50, hi=51)[0]
    with Engine(lm, block_size=4, chunk_size=8, window=window, sinks=sinks) as engine:
        out = engine.generate(Request(prompt, greedy(40))).token_ids
    seq = prompt + out
    with torch.inference_mode():
        logits = ref(torch.tensor([seq]), sinks=sinks)[0]
    want = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert out == want


def test_window_with_sinks_keeps_kv_blocks_constant():
    lm = tiny(seed=2)
    window, sinks, bs = 32, 4, 4
    used, finish = [], []
    # max_context beyond the model's 512 positions: allowed with a window, whose KV stays bounded
    with Engine(lm, block_size=bs, window=window, sinks=sinks, max_context=1024) as engine:
        assert engine.max_context == 1024
        req = Request([1, 2, 3], greedy(20 * window, ignore_eos=True))

        def sink(ev):  # called in the engine thread right after each token: the pool as that step left it
            if isinstance(ev, TokenEvent):
                used.append(engine.pool.n_used())
            else:
                finish.append(ev)

        engine.submit(req, sink)
        engine.wait_idle()
    assert finish[0].usage.completion_tokens == 20 * window
    bound = sinks // bs + 1 + window // bs + 1
    assert max(used) <= bound
    assert len(set(used[window:])) <= 2  # flat beyond the window (±1 block as it fills)


def test_cancel_returns_pool_to_previous_state():
    lm = tiny()
    with Engine(lm, block_size=4, kv_blocks=128, chunk_size=8, offload_blocks=64, hot_tokens=16) as engine:
        engine.generate(Request(prompts(1, seed=6)[0], greedy(3)))  # something in the prefix cache
        engine.wait_idle()
        before = engine.pool.snapshot()
        for when in (0, 1, 5):
            req = Request(prompts(1, seed=7 + when, lo=60, hi=61)[0], greedy(50))
            q = queue.Queue()
            engine.submit(req, q.put)
            for _ in range(when):
                assert isinstance(q.get(), TokenEvent)
            engine.cancel(req.id)
            events = [q.get()]
            while not isinstance(events[-1], FinishEvent):
                events.append(q.get())
            assert isinstance(events[-1], FinishEvent) and events[-1].reason == "cancelled"
            engine.wait_idle()
            assert engine.pool.snapshot() == before


def test_closing_the_sync_iterator_early_cancels():
    lm = tiny()
    with Engine(lm, block_size=4, kv_blocks=128) as engine:
        before = engine.pool.snapshot()
        it = engine.events(Request([1, 2, 3], greedy(100)))
        next(it)
        it.close()
        engine.wait_idle()
        assert engine.pool.snapshot() == before


def test_async_stream_and_early_stop():
    lm = tiny()
    with Engine(lm, block_size=4, kv_blocks=128) as engine:
        async def main():
            seen = [ev async for ev in engine.stream(Request([1, 2, 3], greedy(5)))]
            assert isinstance(seen[-1], FinishEvent) and seen[-1].usage.completion_tokens == 5
            agen = engine.stream(Request([4, 5, 6], greedy(100)))
            await agen.__anext__()
            await agen.aclose()

        before = engine.pool.snapshot()
        asyncio.run(main())
        engine.wait_idle()
        assert engine.stats()["cancelled"] == 1
        assert engine.pool.snapshot()[0] == before[0]


@pytest.mark.parametrize("offload", [0, 256])
def test_preemption_under_a_small_pool_keeps_outputs(offload):
    lm = tiny(seed=3)
    ps = prompts(5, seed=11, lo=20, hi=40)
    want = [reference_greedy(lm.model, p, 30) for p in ps]
    # 40 blocks of 4 tokens cannot hold 5 sequences of ~60 tokens: some are preempted and resumed
    with Engine(lm, block_size=4, kv_blocks=40, offload_blocks=offload, prefix_caching=False) as engine:
        reqs = [Request(p, greedy(30)) for p in ps]
        got = run_concurrently(engine, reqs)
        assert engine.stats()["preemptions"] > 0
        if offload:
            assert engine.stats()["offload_blocks_out"] > 0
        engine.wait_idle()
        assert engine.pool.n_used() == 0
    for r, w in zip(reqs, want, strict=True):
        assert got[r.id].token_ids == w


def test_cold_tier_attention_reads_offloaded_blocks_exactly():
    lm = tiny(seed=4)
    p = prompts(1, seed=12, lo=70, hi=71)[0]
    want = reference_greedy(lm.model, p, 20)
    with Engine(lm, block_size=4, chunk_size=16, offload_blocks=64, hot_tokens=16) as engine:
        got = engine.generate(Request(p, greedy(20)))
        s = engine.stats()
    assert got.token_ids == want
    assert s["offload_blocks_out"] > 0 and s["offload_blocks_read"] > 0 and s["offload_bytes_out"] > 0


def test_stop_sequences_max_tokens_context_full_and_errors(default_engine, default_model):
    tok = default_model.tokenizer
    ids = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = default_engine.generate(Request(ids, greedy(32, stop=["Paris"])))
    assert out.finish.reason == "stop_sequence" and out.finish.stop_sequence == "Paris"
    assert "Paris" not in out.text and out.text.endswith("is ")
    out = default_engine.generate(Request([], greedy(8), messages=[{"role": "user", "content": "Hi"}]))
    assert out.finish.reason in ("eos", "max_tokens") and out.finish.usage.prompt_tokens > 0
    lm = tiny()
    with Engine(lm, max_context=40) as engine:
        out = engine.generate(Request(list(range(30)), greedy(100)))
        assert out.finish.reason == "context_full" and 30 + len(out.token_ids) == 40  # prompt + completion fill it
        with pytest.raises(CairnError, match="40 tokens"):
            engine.submit(Request(list(range(45)), greedy(5)))
        with pytest.raises(CairnError, match="vocabulary"):
            engine.submit(Request([1, 1000], greedy(5)))
    with pytest.raises(CairnError, match="unknown engine option"):
        Engine(lm, windw=3)


def test_kv_dtype_auto_follows_the_weights_and_bad_values_say_what_to_use():
    lm = tiny()
    for quantize, kv_dtype, want in (("none", "auto", torch.float32), ("int8", "auto", torch.float16),
                                     ("int4", "auto", torch.float16), ("int4", "float32", torch.float32),
                                     ("none", "bfloat16", torch.bfloat16)):
        with Engine(lm, quantize=quantize, kv_dtype=kv_dtype, kv_memory_mb=1) as engine:
            assert engine.pool.dtype == want, (quantize, kv_dtype)
            assert engine.stats()["kv_dtype"] == str(want).removeprefix("torch.")
            out = engine.generate(Request(list(range(9)), greedy(6)))
            assert len(out.token_ids) == 6
    # the same memory budget holds twice the blocks in fp16
    with Engine(lm, kv_dtype="float16", kv_memory_mb=1) as half, Engine(lm, kv_memory_mb=1) as full:
        assert half.pool.n_blocks == 2 * full.pool.n_blocks
        # an unquantized model with an fp16 pool: the same greedy tokens as the fp32 reference on this prompt
        assert half.generate(Request(list(range(9)), greedy(8))).token_ids == reference_greedy(lm.model,
                                                                                              list(range(9)), 8)
    with pytest.raises(CairnError, match="unknown kv_dtype 'fp8'.*float16"):
        Engine(lm, kv_dtype="fp8")


def test_a_sequence_larger_than_the_pool_ends_with_context_full():
    lm = tiny()
    with Engine(lm, block_size=4, kv_blocks=8) as engine:  # 32 tokens of KV in all
        out = engine.generate(Request(list(range(10)), greedy(100)))
        assert out.finish.reason == "context_full" and 10 + len(out.token_ids) <= 33
        assert out.token_ids == reference_greedy(lm.model, list(range(10)), len(out.token_ids))
        engine.wait_idle()
        assert engine.pool.n_used() == 0
        with pytest.raises(CairnError, match="KV blocks"):
            engine.submit(Request(list(range(40)), greedy(5)))


@pytest.mark.parametrize("offload", [0, 128])
def test_stress_shared_prefixes_small_pool_cancellations(offload):
    """Many requests with shared prefixes through a pool too small for all of them, some cancelled midway:
    every finished one matches its solo greedy reference and no block leaks."""
    lm = tiny(seed=7)
    rng = random.Random(offload)
    stems = prompts(3, seed=21, lo=9, hi=20)
    ps = [rng.choice(stems) + [rng.randrange(101) for _ in range(rng.randrange(1, 12))] for _ in range(10)]
    with Engine(lm, block_size=4, kv_blocks=32, chunk_size=8, max_batch_tokens=20, offload_blocks=offload) as engine:
        before = engine.pool.snapshot()
        qs, reqs = [], []
        for p in ps:
            q = queue.Queue()
            r = Request(p, greedy(16))
            engine.submit(r, q.put)
            qs.append(q)
            reqs.append(r)
        for r in reqs[::4]:
            engine.cancel(r.id)
        results = []
        for q in qs:
            ids, ev = [], q.get()
            while not isinstance(ev, FinishEvent):
                ids += ev.token_ids
                ev = q.get()
            results.append((ids, ev))
        engine.wait_idle()
        stats = engine.stats()
        assert engine.pool.snapshot()[0] == before[0]  # every ref count back to zero
        assert engine.pool.n_used() == 0
    for p, (ids, ev) in zip(ps, results, strict=True):
        if ev.reason == "cancelled":
            continue
        assert ev.reason == "max_tokens"
        assert ids == reference_greedy(lm.model, p, 16)
    assert sum(ev.reason == "cancelled" for _, ev in results) >= 1
    assert stats["preemptions"] > 0 and stats["prefix_hit_blocks"] > 0
    if offload:
        assert stats["offload_blocks_in"] > 0


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_mixture_of_experts_models_run_in_the_engine(quantize):
    """MoE layers (routed + shared experts, a dense first layer) run as the model's own module; their dense
    projections take the engine's kernels. fp32 equals the model's own greedy decode; quantized ones run."""
    lm = tiny(n_layers=3, d_model=64, n_experts=4, experts_per_token=2, moe_d_ff=32, n_shared_experts=1,
              shared_expert_gate=True, first_k_dense=1)
    ps = prompts(3, seed=5)
    with Engine(lm, block_size=4, chunk_size=16, quantize=quantize) as engine:
        reqs = [Request(p, greedy(10)) for p in ps]
        got = run_concurrently(engine, reqs)
        assert all(len(c.token_ids) == 10 for c in got.values())
        if quantize == "none":
            for r, p in zip(reqs, ps, strict=True):
                assert got[r.id].token_ids == reference_greedy(lm.model, p, 10)
        assert engine.stats()["weight_bytes"] > 0
