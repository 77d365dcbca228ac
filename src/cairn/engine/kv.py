"""The paged KV cache: a preallocated pool of fixed-size blocks, block tables, ref counts, a prefix cache, and a
memory-mapped offload tier.

Layout. Every layer's keys and values live in one ``[n_blocks * block_size, n_kv_heads, head_dim]`` tensor; a
*slot* is one token's row in it, block ``b`` owns slots ``b*bs .. b*bs+bs-1``. Keys are stored after RoPE, at
their absolute positions, so a sequence can drop blocks (sliding window) or share them (prefix cache) without
re-rotating anything: attention only needs each kept key's position, which the block table knows.

Prefix cache. A *full* block is named by ``hash((parent block's hash, its tokens))``, so equal names mean equal
prefixes. Finished or cancelled sequences release their blocks; named blocks with no reference stay in an LRU list
and are reused by the next request whose prompt starts the same way, or evicted when the pool needs room. Where the
cached blocks end, a prompt may still share the first tokens of a cached block that follows the same parent (two
prompts that differ a few tokens into a block): those tokens' keys and values are copied into a new block of the
prompt's own, so a prompt recomputes only from its first differing token, not from its last whole cached block. A
finished sequence's last, shorter block is named too (by its tokens so far), for the next turn of a conversation.

Offload tier. A second, slower pool (a memory-mapped file on a CPU-only machine) holds cold blocks: the early
blocks of long contexts beyond ``hot_tokens`` (attention reads them from the tier on demand) and the blocks of
preempted sequences (copied back when they resume). Traffic both ways is counted in ``stats()``.
"""

from __future__ import annotations

import os
import tempfile
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from cairn.errors import CairnError


class OutOfBlocks(Exception):
    """The pool has no free or evictable block (the scheduler preempts or waits)."""


def block_hash(parent: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((parent, tuple(tokens)))


class OffloadTier:
    """Blocks in a memory-mapped file: ``[n_layers, n_blocks * bs, Hkv, D]`` for keys and for values."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int, block_size: int,
                 dtype: torch.dtype, directory: str | None = None):
        self.n_blocks, self.block_size = n_blocks, block_size
        np_dtype = {torch.float32: np.float32, torch.float16: np.float16}.get(dtype)
        if np_dtype is None:  # bf16 has no numpy type: store its bits as int16
            np_dtype = np.int16
        shape = (2, n_layers, n_blocks * block_size, n_kv_heads, head_dim)
        fd, self.path = tempfile.mkstemp(prefix="cairn-kv-", suffix=".bin", dir=directory)
        os.close(fd)
        self._mm = np.memmap(self.path, dtype=np_dtype, mode="w+", shape=shape)
        try:  # the mapping outlives the name: nothing is left on disk, even after a crash
            os.unlink(self.path)
        except OSError:
            pass
        t = torch.from_numpy(self._mm)
        self.kv = t.view(dtype) if np_dtype is np.int16 else t
        self.free = list(range(n_blocks - 1, -1, -1))
        self.block_bytes = 2 * n_layers * block_size * n_kv_heads * head_dim * self.kv.element_size()

    def allocate(self) -> int:
        if not self.free:
            raise OutOfBlocks("the offload tier is full")
        return self.free.pop()

    def release(self, block: int) -> None:
        self.free.append(block)

    def close(self) -> None:
        self._mm = None
        self.kv = None
        try:
            os.unlink(self.path)
        except OSError:
            pass


@dataclass
class BlockTable:
    """One sequence's blocks. ``blocks[i]`` holds tokens ``i*bs .. i*bs+bs-1``: a pool block id, ``None`` (dropped:
    outside the attention window) or, in ``cold``, an offload-tier block id."""

    blocks: list[int | None] = field(default_factory=list)
    hashes: list[int | None] = field(default_factory=list)  # names of full blocks (prefix cache)
    cold: dict[int, int] = field(default_factory=dict)  # logical block index -> tier block

    def n_resident(self) -> int:
        return sum(b is not None for b in self.blocks)


class KVPool:
    """The preallocated block pool with ref counts, the prefix cache (hash → block) and its LRU list."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, n_blocks: int, block_size: int = 16,
                 dtype: torch.dtype = torch.float32, offload_blocks: int = 0, offload_dir: str | None = None,
                 prefix_caching: bool = True):
        if n_blocks < 2 or block_size < 1:
            raise CairnError(f"the KV pool needs at least 2 blocks of at least 1 token (got {n_blocks} x {block_size})")
        self.n_layers, self.n_blocks, self.block_size = n_layers, n_blocks, block_size
        self.n_kv_heads, self.head_dim, self.dtype = n_kv_heads, head_dim, dtype
        slots = n_blocks * block_size
        # torch.empty: pages are only touched (and counted as memory) when a block is first written
        self.k = torch.empty(n_layers, slots, n_kv_heads, head_dim, dtype=dtype)
        self.v = torch.empty(n_layers, slots, n_kv_heads, head_dim, dtype=dtype)
        self.ref = [0] * n_blocks
        self.name: list[int | None] = [None] * n_blocks
        self.free: list[int] = list(range(n_blocks - 1, -1, -1))  # never named, unreferenced
        self.lru: OrderedDict[int, None] = OrderedDict()  # named, unreferenced: evictable, oldest first
        self.cached: dict[int, int] = {}  # name -> block
        # named blocks by (parent's name, first token) -> {name: tokens}, for prompts that share part of a block
        self.children: dict[tuple[int | None, int], dict[int, tuple[int, ...]]] = {}
        self.child_key: dict[int, tuple[int | None, int]] = {}  # name -> its key in children
        self.prefix_caching = prefix_caching
        self.block_bytes = 2 * n_layers * block_size * n_kv_heads * head_dim * self.k.element_size()
        self.tier = (OffloadTier(n_layers, n_kv_heads, head_dim, offload_blocks, block_size, dtype, offload_dir)
                     if offload_blocks > 0 else None)
        self.traffic = {"offload_blocks_out": 0, "offload_blocks_in": 0, "offload_blocks_read": 0,
                        "prefix_hit_blocks": 0, "prefix_hit_tokens_copied": 0, "evicted_blocks": 0}

    # ------------------------------------------------------------- accounting
    def n_free(self) -> int:
        """Blocks that an allocation can get (free + evictable cached)."""
        return len(self.free) + len(self.lru)

    def n_used(self) -> int:
        return self.n_blocks - self.n_free()

    def snapshot(self) -> tuple:
        """Everything that must come back after a request is cancelled (for leak tests)."""
        return (tuple(self.ref), len(self.free) + len(self.lru),
                None if self.tier is None else len(self.tier.free))

    def stats(self) -> dict:
        out = {
            "kv_blocks_total": self.n_blocks,
            "kv_blocks_used": self.n_used(),
            "kv_blocks_cached": len(self.lru),
            "kv_blocks_free": len(self.free),
            "kv_block_size": self.block_size,
            "kv_bytes_used": self.n_used() * self.block_bytes,
            **self.traffic,
        }
        if self.tier is not None:
            out["offload_blocks_total"] = self.tier.n_blocks
            out["offload_blocks_used"] = self.tier.n_blocks - len(self.tier.free)
            out["offload_bytes_out"] = self.traffic["offload_blocks_out"] * self.block_bytes
            out["offload_bytes_in"] = (self.traffic["offload_blocks_in"] + self.traffic["offload_blocks_read"]) \
                * self.block_bytes
        return out

    # ---------------------------------------------------------- ref counting
    def allocate(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.lru:
            b, _ = self.lru.popitem(last=False)
            self._forget(b)
            self.traffic["evicted_blocks"] += 1
        else:
            raise OutOfBlocks(f"all {self.n_blocks} KV blocks are in use")
        self.ref[b] = 1
        return b

    def incref(self, b: int) -> None:
        if self.ref[b] == 0:
            self.lru.pop(b, None)
        self.ref[b] += 1

    def decref(self, b: int) -> None:
        self.ref[b] -= 1
        assert self.ref[b] >= 0, f"block {b} released twice"
        if self.ref[b] == 0:
            if self.name[b] is not None:
                self.lru[b] = None
            else:
                self.free.append(b)

    # ----------------------------------------------------------- prefix cache
    def lookup(self, name: int) -> int | None:
        """The cached block with this name, now referenced once more by the caller; or None."""
        if not self.prefix_caching:
            return None
        b = self.cached.get(name)
        if b is not None:
            self.incref(b)
            self.traffic["prefix_hit_blocks"] += 1
        return b

    def register(self, b: int, name: int, parent: int | None = None, tokens=None) -> None:
        """Name a block, full (or the last, shorter one of a released sequence: ``SequenceKV.release``); if an equal
        block is already cached, keep that one (this one stays private). ``parent`` and ``tokens`` (the parent
        block's name and this block's tokens) let a prompt that shares only the first of these tokens take them
        (``partial``). A shorter block's name never equals a full block's (its tokens differ in number), so only
        ``partial`` ever finds it."""
        if self.prefix_caching and self.name[b] is None and name not in self.cached:
            self.name[b] = name
            self.cached[name] = b
            if tokens is not None and len(tokens):
                key = (parent, tokens[0])
                self.children.setdefault(key, {})[name] = tuple(tokens)
                self.child_key[name] = key

    def partial(self, parent: int | None, tokens: list[int]) -> tuple[int, int] | None:
        """The cached block after ``parent`` that shares the longest run of first tokens with ``tokens`` (shorter
        than a block): ``(block, how many)``, the block referenced once more by the caller; or None."""
        if not self.prefix_caching or not tokens:
            return None
        best, best_n = None, 0
        for name, have in reversed(self.children.get((parent, tokens[0]), {}).items()):
            n, most = 1, min(len(tokens), len(have))
            while n < most and have[n] == tokens[n]:
                n += 1
            if n > best_n:
                best, best_n = name, n
                if n == len(tokens):
                    break
        if best is None:
            return None
        b = self.cached[best]
        self.incref(b)
        return b, best_n

    def copy_slots(self, src: int, dst: int, n: int) -> None:
        """The first ``n`` tokens' keys and values of block ``src`` into block ``dst``, every layer."""
        a, z = src * self.block_size, dst * self.block_size
        self.k[:, z:z + n] = self.k[:, a:a + n]
        self.v[:, z:z + n] = self.v[:, a:a + n]

    def _forget(self, b: int) -> None:
        """Drop block ``b``'s name (it is being evicted or the cache cleared)."""
        name = self.name[b]
        del self.cached[name]
        key = self.child_key.pop(name, None)
        if key is not None:
            kids = self.children[key]
            del kids[name]
            if not kids:
                del self.children[key]
        self.name[b] = None

    def clear_cache(self) -> None:
        while self.lru:
            b, _ = self.lru.popitem(last=False)
            self._forget(b)
            self.free.append(b)

    # ------------------------------------------------------------- block I/O
    def slots(self, b: int) -> slice:
        return slice(b * self.block_size, (b + 1) * self.block_size)

    def to_tier(self, b: int) -> int:
        """Copy pool block ``b`` into the offload tier; returns the tier block (the caller releases ``b``)."""
        if self.tier is None:
            raise OutOfBlocks("no offload tier")
        t = self.tier.allocate()
        ts = self.tier_slots(t)
        self.tier.kv[0][:, ts] = self.k[:, self.slots(b)]
        self.tier.kv[1][:, ts] = self.v[:, self.slots(b)]
        self.traffic["offload_blocks_out"] += 1
        return t

    def from_tier(self, t: int) -> int:
        """Copy tier block ``t`` back into a newly allocated pool block and free ``t``."""
        b = self.allocate()
        ts = self.tier_slots(t)
        self.k[:, self.slots(b)] = self.tier.kv[0][:, ts]
        self.v[:, self.slots(b)] = self.tier.kv[1][:, ts]
        self.tier.release(t)
        self.traffic["offload_blocks_in"] += 1
        return b

    def tier_slots(self, t: int) -> slice:
        return slice(t * self.block_size, (t + 1) * self.block_size)

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
            self.tier = None


class SequenceKV:
    """The KV bookkeeping of one sequence: which blocks hold which tokens, prefix-cache names, window freeing."""

    def __init__(self, pool: KVPool, window: int | None = None, sinks: int = 0, hot_tokens: int | None = None):
        self.pool = pool
        self.table = BlockTable()
        self.window, self.sinks = window, sinks
        self.hot_tokens = hot_tokens  # keep at most this many recent tokens in the pool; older blocks go cold
        self.length = 0  # tokens whose KV is stored
        self.cached_tokens = 0  # prompt tokens that came from the prefix cache

    # ---------------------------------------------------------------- admit
    def match_prefix(self, prompt: list[int]) -> int:
        """Take cached blocks for the longest cached prefix of ``prompt`` (at most len − 1 tokens); returns it.

        Whole blocks are shared. Where they end, the first tokens of a cached block that follows the same parent
        and starts as the prompt goes on are copied into a block of this sequence's own (when the pool has one)."""
        pool = self.pool
        bs, parent, n = pool.block_size, None, 0
        for i in range((len(prompt) - 1) // bs):
            name = block_hash(parent, prompt[i * bs:(i + 1) * bs])
            b = pool.lookup(name)
            if b is None:
                break
            self.table.blocks.append(b)
            self.table.hashes.append(name)
            parent, n = name, n + bs
        found = pool.partial(parent, prompt[n:min(n + bs, len(prompt) - 1)])
        if found is not None:
            src, shared = found  # (referenced: the allocation below cannot evict it)
            if pool.n_free():
                own = pool.allocate()
                pool.copy_slots(src, own, shared)
                self.table.blocks.append(own)
                self.table.hashes.append(None)
                n += shared
                pool.traffic["prefix_hit_tokens_copied"] += shared
            pool.decref(src)
        self.length = self.cached_tokens = n
        self.drop_outside_window(n)
        return n

    # ---------------------------------------------------------------- grow
    def blocks_needed(self, n_new: int) -> int:
        bs = self.pool.block_size
        return max(0, -(-(self.length + n_new) // bs) - len(self.table.blocks))

    def room(self) -> int:
        """How many more tokens fit now: the free slots of the last block plus every allocatable block."""
        return len(self.table.blocks) * self.pool.block_size - self.length + self.pool.n_free() * self.pool.block_size

    def reserve(self, n_new: int) -> list[int]:
        """Allocate blocks for ``n_new`` more tokens; returns their slot indices (all-or-nothing)."""
        bs = self.pool.block_size
        need = self.blocks_needed(n_new)
        if need > self.pool.n_free():
            raise OutOfBlocks(f"need {need} blocks, {self.pool.n_free()} free")
        for _ in range(need):
            self.table.blocks.append(self.pool.allocate())
            self.table.hashes.append(None)
        out = []
        for p in range(self.length, self.length + n_new):
            out.append(self.table.blocks[p // bs] * bs + p % bs)
        return out

    def commit(self, tokens: list[int], n_new: int) -> None:
        """``n_new`` tokens were written (``tokens`` is the whole sequence so far): name newly full blocks, drop
        blocks that left the window, move blocks past the hot boundary to the tier."""
        bs, old = self.pool.block_size, self.length
        self.length += n_new
        for i in range(old // bs, self.length // bs):
            if self.table.hashes[i] is None:
                parent = self.table.hashes[i - 1] if i else None
                name = block_hash(parent, tokens[i * bs:(i + 1) * bs])
                self.table.hashes[i] = name
                b = self.table.blocks[i]
                if b is not None:
                    self.pool.register(b, name, parent, tokens[i * bs:(i + 1) * bs])
        self.drop_outside_window(self.length)
        self.cool_down()

    def drop_outside_window(self, length: int) -> None:
        """Free blocks no future query can see: every key ``j`` with ``j <= length - W`` and ``j >= sinks``."""
        if self.window is None:
            return
        bs = self.pool.block_size
        last_invisible = length - self.window  # keys at positions <= this are out of every later window
        for i, b in enumerate(self.table.blocks):
            if (i + 1) * bs - 1 > last_invisible:
                break
            if b is not None and i * bs >= self.sinks:
                self.pool.decref(b)
                self.table.blocks[i] = None
            if i in self.table.cold and i * bs >= self.sinks:
                self.pool.tier.release(self.table.cold.pop(i))

    def cool_down(self) -> None:
        """Move full blocks older than the last ``hot_tokens`` tokens (sinks excepted) to the offload tier."""
        if self.hot_tokens is None or self.pool.tier is None:
            return
        bs = self.pool.block_size
        boundary = self.length - self.hot_tokens
        for i, b in enumerate(self.table.blocks):
            if (i + 1) * bs > boundary:
                break
            if b is None or i * bs < self.sinks:
                continue
            try:
                t = self.pool.to_tier(b)
            except OutOfBlocks:
                return
            self.table.cold[i] = t
            self.table.blocks[i] = None
            self.pool.decref(b)

    # ---------------------------------------------------------- preemption
    def swap_out(self) -> None:
        """Move every pool block of this sequence to the offload tier (preemption without recomputation)."""
        for i, b in enumerate(self.table.blocks):
            if b is None:
                continue
            self.table.cold[i] = self.pool.to_tier(b)
            self.table.blocks[i] = None
            self.pool.decref(b)
        self.swapped = True

    def swap_in(self) -> None:
        """Bring back the tier blocks a preempted sequence needs in the pool (all but the long-term cold ones)."""
        bs = self.pool.block_size
        boundary = self.length - self.hot_tokens if self.hot_tokens is not None else -1
        for i in sorted(self.table.cold):
            if self.hot_tokens is not None and (i + 1) * bs <= boundary and i * bs >= self.sinks:
                continue  # stays cold by the tier boundary
            self.table.blocks[i] = self.pool.from_tier(self.table.cold.pop(i))
        self.swapped = False

    def blocks_to_swap_in(self) -> int:
        bs = self.pool.block_size
        boundary = self.length - self.hot_tokens if self.hot_tokens is not None else -1
        return sum(1 for i in self.table.cold
                   if not (self.hot_tokens is not None and (i + 1) * bs <= boundary and i * bs >= self.sinks))

    # ------------------------------------------------------------- release
    def release(self, tokens: list[int] | None = None) -> None:
        """Give back every block. With ``tokens`` (the sequence's, prompt and generated), the last block, which holds
        fewer than a block's tokens, is named first, so that a later prompt that goes on the same way (the next turn
        of a conversation, or this sequence resumed after preemption) can copy its tokens (``KVPool.partial``)."""
        bs, i = self.pool.block_size, self.length // self.pool.block_size
        if tokens is not None and self.length % bs and i < len(self.table.blocks) and \
                self.table.blocks[i] is not None and self.table.hashes[i] is None:
            parent, tail = self.table.hashes[i - 1] if i else None, tokens[i * bs:self.length]
            self.pool.register(self.table.blocks[i], block_hash(parent, tail), parent, tail)
        for b in self.table.blocks:
            if b is not None:
                self.pool.decref(b)
        if self.pool.tier is not None:
            for t in self.table.cold.values():
                self.pool.tier.release(t)
        self.table = BlockTable()
        self.length = 0

    # ----------------------------------------------------------- attention
    def hot_blocks(self, upto: int) -> tuple[list[int], list[int], bool]:
        """The pool blocks holding keys below ``upto``, their indices in the sequence, and whether some keys below
        ``upto`` are in the offload tier instead."""
        blocks, index, cold = [], [], False
        table = self.table.blocks
        for i in range(min(len(table), -(-upto // self.pool.block_size))):
            b = table[i]
            if b is not None:
                blocks.append(b)
                index.append(i)
            elif i in self.table.cold:
                cold = True
        return blocks, index, cold

    def key_slots(self, upto: int) -> tuple[list[int], list[int], list[int], list[int]]:
        """``(pool slots, their positions, tier slots, their positions)`` of the stored keys below ``upto``."""
        bs = self.pool.block_size
        hot, hot_pos, cold, cold_pos = [], [], [], []
        for i, b in enumerate(self.table.blocks):
            start = i * bs
            if start >= upto:
                break
            n = min(bs, upto - start)
            if b is not None:
                hot.extend(range(b * bs, b * bs + n))
                hot_pos.extend(range(start, start + n))
            elif i in self.table.cold:
                t = self.table.cold[i]
                cold.extend(range(t * bs, t * bs + n))
                cold_pos.extend(range(start, start + n))
        return hot, hot_pos, cold, cold_pos


def key_index(seqs: list[tuple[SequenceKV, int]], block_size: int) -> tuple[np.ndarray, ...] | None:
    """For sequences ``(kv, upto)``, their pool keys below ``upto`` in CSR form: ``(starts [B + 1], slots,
    positions)``, int64 (what ``key_slots`` lists, built a block at a time: a batch's decode step has thousands of
    keys). None when a sequence has keys in the offload tier."""
    blocks, index, upto, counts = [], [], [], []
    for kv, n in seqs:
        b, i, cold = kv.hot_blocks(n)
        if cold:
            return None
        blocks += b
        index += i
        upto += [n] * len(b)
        counts.append(len(b))
    j = np.arange(block_size, dtype=np.int64)
    pos = np.asarray(index, dtype=np.int64)[:, None] * block_size + j
    slots = np.asarray(blocks, dtype=np.int64)[:, None] * block_size + j
    keep = pos < np.asarray(upto, dtype=np.int64)[:, None]  # the last block of each sequence is partly filled
    owner = np.repeat(np.arange(len(seqs)), counts)  # the sequence of each block
    per_seq = np.bincount(owner, weights=keep.sum(1), minlength=len(seqs)).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(per_seq)]).astype(np.int64)
    return starts, slots[keep], pos[keep]
