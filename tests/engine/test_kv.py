"""The paged KV pool: ref counts, prefix cache (hit vs miss logits), LRU eviction, offload round trip."""

import pytest
import torch

from cairn.engine.kv import KVPool, OutOfBlocks, SequenceKV, key_index
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


def tiny_runner(seed: int, n_blocks: int, block_size: int = 8):
    """A tiny model, a pool of ``n_blocks`` and its runner, and a generator for random token ids."""
    lm = tiny(seed=seed)
    cfg = lm.config
    pool = KVPool(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, n_blocks, block_size=block_size)
    return lm, pool, Runner(InferenceWeights(lm.model), pool), torch.Generator().manual_seed(seed)


def test_prefix_cache_hit_and_miss_logits_agree():
    lm, pool, runner, g = tiny_runner(5, 128)
    shared = torch.randint(0, 101, (37,), generator=g).tolist()
    a = shared + [1, 2, 3]
    b = shared + [4, 5, 6, 7, 8]
    first = SequenceKV(pool)
    prefill(runner, first, a, chunk=16)
    first_blocks = list(first.table.blocks[:4])
    first.release()
    hit = SequenceKV(pool)
    # 4 full blocks of the shared 37 tokens, and the 5 shared tokens of a's 5th block copied into one of b's own
    assert hit.match_prefix(b) == 37 and pool.traffic["prefix_hit_tokens_copied"] == 5
    assert hit.table.blocks[:4] == first_blocks and hit.table.blocks[4] not in first_blocks
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


def test_partial_block_reuse_takes_the_longest_shared_run_and_leaves_one_token():
    lm, pool, runner, g = tiny_runner(6, 64)
    head = torch.randint(0, 101, (8,), generator=g).tolist()
    for tail in ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 9, 9, 9, 9, 9]):  # two cached blocks after the same parent
        seq = SequenceKV(pool)
        prefill(runner, seq, head + tail + [0])
        seq.release()
    before = pool.snapshot()
    probe = SequenceKV(pool)
    assert probe.match_prefix(head + [1, 2, 3, 4, 5, 0, 0, 0, 0]) == 8 + 5  # the first block's 5, not the second's 3
    logits = prefill(runner, probe, head + [1, 2, 3, 4, 5, 0, 0, 0, 0])
    with torch.inference_mode():
        ref = lm.model(torch.tensor([head + [1, 2, 3, 4, 5, 0, 0, 0, 0]]))[0, -1]
    assert torch.allclose(logits, ref, atol=1e-4, rtol=0)
    probe.release()
    assert pool.snapshot()[0] == before[0]  # every reference given back (the copied block's source included)
    # a prompt that is a cached block's first tokens exactly: all but its last token come from the cache
    again = SequenceKV(pool)
    assert again.match_prefix(head + [1, 2, 3, 4, 5]) == 8 + 4
    again.release()
    # a different first token after the shared block: nothing to copy
    other = SequenceKV(pool)
    assert other.match_prefix(head + [7, 1, 2, 3]) == 8
    other.release()


def test_partial_block_reuse_forgets_evicted_blocks_and_needs_a_free_block():
    pool = KVPool(2, 1, 4, n_blocks=3, block_size=4)
    tokens = [5, 6, 7, 8, 1, 2, 3, 4]
    seq = SequenceKV(pool)
    pool.k.normal_()
    pool.v.normal_()
    seq.reserve(8)
    seq.commit(tokens, 8)  # two named blocks
    src = seq.table.blocks[1]
    seq.release()
    # all three blocks held: the shared run is there but no block can take it, so nothing is copied
    held = [pool.allocate()]
    busy = SequenceKV(pool)
    assert busy.match_prefix([5, 6, 7, 8, 1, 2, 9, 9]) == 4
    assert pool.traffic["prefix_hit_tokens_copied"] == 0 and len(busy.table.blocks) == 1
    assert pool.ref[src] == 0 and src in pool.lru  # its reference given back: cached, evictable
    busy.release()
    pool.decref(held[0])
    # with a block free, the two shared tokens are copied, exactly
    ok = SequenceKV(pool)
    assert ok.match_prefix([5, 6, 7, 8, 1, 2, 9, 9]) == 6
    own = ok.table.blocks[1]
    assert torch.equal(pool.k[:, own * 4:own * 4 + 2], pool.k[:, src * 4:src * 4 + 2])
    assert torch.equal(pool.v[:, own * 4:own * 4 + 2], pool.v[:, src * 4:src * 4 + 2])
    ok.release()
    # evicted: the block's name leaves the partial index with it
    got = [pool.allocate() for _ in range(3)]
    assert pool.children == {} and pool.child_key == {} and pool.cached == {}
    for b in got:
        pool.decref(b)
    assert SequenceKV(pool).match_prefix([5, 6, 7, 8, 1, 2, 9, 9]) == 0


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


@pytest.mark.parametrize(("window", "sinks"), [(None, 0), (8, 2), (8, 0)])
def test_key_index_lists_what_key_slots_lists(window, sinks):
    """The decode step's CSR key index (built a block at a time) holds, per sequence, exactly the slots and positions
    ``key_slots`` lists: partly filled last blocks, blocks dropped outside a window, sinks kept."""
    pool = KVPool(1, 1, 2, n_blocks=64, block_size=4, prefix_caching=False)
    seqs = []
    for n in (1, 4, 5, 13, 30):
        kv = SequenceKV(pool, window, sinks)
        tokens = list(range(n))
        done = 0
        while done < n:  # a token at a time, as decoding would: blocks leave the window as it moves
            kv.reserve(1)
            kv.commit(tokens, 1)
            done += 1
        kv.reserve(1)  # the slot of the next token, whose key the step attends to as well
        seqs.append((kv, n + 1))
    empty = SequenceKV(pool, window, sinks)  # no keys yet: an empty run in the middle of the index
    seqs.insert(2, (empty, 0))
    starts, slots, pos = key_index(seqs, pool.block_size)
    for i, (kv, upto) in enumerate(seqs):
        hot, hot_pos, cold, _ = kv.key_slots(upto)
        assert not cold
        assert slots[starts[i]:starts[i + 1]].tolist() == hot and pos[starts[i]:starts[i + 1]].tolist() == hot_pos
    assert starts[-1] == len(slots) == len(pos)


def test_key_index_is_none_when_keys_are_offloaded():
    pool = KVPool(1, 1, 2, n_blocks=16, block_size=4, offload_blocks=16, prefix_caching=False)
    kv = SequenceKV(pool, hot_tokens=4)
    tokens = list(range(12))
    kv.reserve(12)
    kv.commit(tokens, 12)
    kv.cool_down()
    assert kv.key_slots(12)[2] and key_index([(kv, 12)], 4) is None
    pool.close()


def test_fp16_pool_halves_block_bytes_and_offloads_exactly():
    pool = KVPool(2, 2, 8, n_blocks=4, block_size=4, dtype=torch.float16, offload_blocks=4)
    assert pool.block_bytes == KVPool(2, 2, 8, n_blocks=4, block_size=4).block_bytes // 2
    b = pool.allocate()
    k = torch.randn(2, 4, 2, 8).half()
    pool.k[:, pool.slots(b)] = k
    t = pool.to_tier(b)
    pool.decref(b)
    back = pool.from_tier(t)
    assert torch.equal(pool.k[:, pool.slots(back)], k)
    pool.close()


def _attend_tail(q, k, v, start: int) -> torch.Tensor:
    """Attention of the queries from ``start`` on over every key, as the runner calls it for a prompt segment: one
    causal call from 0, else through a mask; its queries padded by ``runner._query_pad``."""
    import torch.nn.functional as F

    from cairn.engine.runner import _query_pad

    n_keys = k.shape[2]
    t = n_keys - start
    qq = F.pad(q[:, :, start:], (0, 0, 0, _query_pad(t)))
    if start == 0:
        return F.scaled_dot_product_attention(qq, k, v, is_causal=True, enable_gqa=True)[:, :, :t]
    visible = torch.ones(qq.shape[2], n_keys, dtype=torch.bool)
    for i in range(t):
        visible[i, start + i + 1:] = False
    return F.scaled_dot_product_attention(qq, k, v, attn_mask=visible, enable_gqa=True)[:, :, :t]


def test_padded_queries_make_a_prompt_tails_attention_equal_the_whole_prompts_to_the_bit():
    """What ``runner._query_pad`` relies on in PyTorch's CPU SDPA: the rows of a masked call over a prompt's tail
    equal the same rows of one causal call over the whole prompt, to the bit, when both are padded by it (without
    the padding, most of these cuts differ in the last bits). Fails loudly if a torch upgrade changes the blocking."""
    g = torch.Generator().manual_seed(0)
    for n_keys in (2, 3, 5, 17, 33, 34, 35, 48, 65, 100, 193, 257):
        q, k, v = (torch.randn(1, h, n_keys, 64, generator=g) for h in (9, 3, 3))
        whole = _attend_tail(q, k, v, 0)
        for start in {1, n_keys - 1, n_keys - 2, n_keys - 3, n_keys // 2, max(1, n_keys - 17)}:
            if 1 <= start < n_keys:
                assert torch.equal(_attend_tail(q, k, v, start), whole[:, :, start:]), (n_keys, start)


def test_a_released_sequences_last_shorter_block_is_named_for_the_next_turn():
    lm, pool, runner, g = tiny_runner(7, 64)
    turn = torch.randint(0, 101, (13,), generator=g).tolist()  # one whole block of 8, then 5 tokens
    seq = SequenceKV(pool)
    prefill(runner, seq, turn)
    seq.release(turn)  # (the scheduler passes the sequence's tokens)
    nxt = turn + [7, 7]  # the next turn goes on from where this one stopped (15 tokens: no new whole block)
    hit = SequenceKV(pool)
    assert hit.match_prefix(nxt) == 13 and pool.traffic["prefix_hit_tokens_copied"] == 5
    logits = prefill(runner, hit, nxt)
    hit.release()  # (no tokens: nothing more is named)
    with torch.inference_mode():
        ref = lm.model(torch.tensor([nxt]))[0, -1]
    assert torch.allclose(logits, ref, atol=1e-4, rtol=0)
    assert len(pool.cached) == 2  # turn's whole block and its 5-token tail; hit's tail was not named
    # a shorter block is found only as a partial one: never as a whole block
    other = SequenceKV(pool)
    assert other.match_prefix(turn[:8] + turn[8:13] + [0, 0, 0, 9]) == 13
    other.release()
