"""The paged KV pool: ref counts, prefix cache (hit vs miss logits), LRU eviction, offload round trip."""

import pytest
import torch

from cairn.engine.kv import KVPool, OutOfBlocks, SequenceKV
from cairn.engine.runner import InferenceWeights, Runner, Segment
from tests.engine.conftest import tiny


def prefill(runner: Runner, kv: SequenceKV, tokens: list[int], chunk: int = 1000) -> torch.Tensor:
    """Compute ``tokens`` beyond what ``kv`` already holds; logits of the last one."""
    logits = None
    while kv.length < len(tokens):
        n = min(chunk, len(tokens) - kv.length)
        start = kv.length
        slots = kv.reserve(n)
        logits = runner.forward([Segment(kv, tokens[start:start + n], start, slots, True)])
        kv.commit(tokens, n)
    return logits[0]


def test_ref_counts_and_lru_eviction():
    pool = KVPool(1, 1, 2, n_blocks=4, block_size=2)
    a = pool.allocate()
    pool.register(a, 123)
    pool.decref(a)  # named and unreferenced: cached, still findable
    assert pool.n_free() == 4 and pool.stats()["kv_blocks_cached"] == 1
    assert pool.lookup(123) == a and pool.ref[a] == 1
    pool.decref(a)
    got = [pool.allocate() for _ in range(4)]  # the 4th allocation evicts the cached block
    assert sorted(got) == [0, 1, 2, 3] and pool.lookup(123) is None
    assert pool.traffic["evicted_blocks"] == 1
    with pytest.raises(OutOfBlocks):
        pool.allocate()


def test_prefix_cache_hit_and_miss_logits_agree():
    lm = tiny(seed=5)
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 128, block_size=8)
    runner = Runner(InferenceWeights(lm.model), pool)
    g = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 101, (37,), generator=g).tolist()
    a = shared + [1, 2, 3]
    b = shared + [4, 5, 6, 7, 8]
    first = SequenceKV(pool)
    prefill(runner, first, a, chunk=16)
    first.release()
    hit = SequenceKV(pool)
    assert hit.match_prefix(b) == 32  # 4 full blocks of the shared 37 tokens
    logits_hit = prefill(runner, hit, b)
    hit.release()
    pool.clear_cache()
    miss = SequenceKV(pool)
    assert miss.match_prefix(b) == 0
    logits_miss = prefill(runner, miss, b)
    assert torch.allclose(logits_hit, logits_miss, atol=1e-4, rtol=0)
    with torch.inference_mode():
        ref = lm.model(torch.tensor([b]))[0, -1]
    assert torch.allclose(logits_miss, ref, atol=1e-4, rtol=0)


def test_offload_round_trip_is_exact():
    pool = KVPool(3, 2, 4, n_blocks=8, block_size=4, offload_blocks=8)
    b = pool.allocate()
    k = torch.randn(3, 4, 2, 4)
    v = torch.randn(3, 4, 2, 4)
    pool.k[:, pool.slots(b)] = k
    pool.v[:, pool.slots(b)] = v
    t = pool.to_tier(b)
    pool.decref(b)
    pool.k.zero_()
    back = pool.from_tier(t)
    assert torch.equal(pool.k[:, pool.slots(back)], k) and torch.equal(pool.v[:, pool.slots(back)], v)
    s = pool.stats()
    assert s["offload_blocks_out"] == 1 and s["offload_blocks_in"] == 1 and s["offload_bytes_out"] == pool.block_bytes
    pool.close()


def test_swap_out_and_in_keeps_logits():
    lm = tiny(seed=6)
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, 64, block_size=4, offload_blocks=64)
    runner = Runner(InferenceWeights(lm.model), pool)
    tokens = torch.randint(0, 101, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    kv = SequenceKV(pool)
    prefill(runner, kv, tokens[:29])
    kv.swap_out()
    assert kv.table.n_resident() == 0 and pool.n_used() == 0
    kv.swap_in()
    logits = prefill(runner, kv, tokens)
    with torch.inference_mode():
        ref = lm.model(torch.tensor([tokens]))[0, -1]
    assert torch.allclose(logits, ref, atol=1e-5, rtol=0)
    kv.release()
    assert pool.n_used() == 0 and len(pool.tier.free) == 64
    pool.close()
