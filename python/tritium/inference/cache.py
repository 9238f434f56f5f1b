"""Paged KV cache manager: a block allocator with reference counts and per-sequence block tables.

Every layer has one K and one V pool of shape (num_blocks, block_size, num_kv_heads, head_dim); a sequence's
tokens live in the blocks its table lists (token i at block table[i // block_size], offset i % block_size, i.e.
slot table[i // bs] * bs + i % bs). Sequences can share blocks (``fork``: a parallel sample or beam reuses its
parent's prompt); a block's reference count is the number of tables holding it, and a block returns to the
free list when that count reaches zero. Appending to a sequence whose last, partly filled block is shared first
copies that block (copy-on-write), so writers never touch another sequence's tokens.

Prefix caching (``prefix_caching=True``): every full block is keyed by a hash of all the tokens up to its end (a
chain: the hash of the previous block's key and this block's tokens), published once its K/V are written
(``publish``). A new sequence whose tokens start with published blocks takes them (``allocate_cached``: their
reference counts go up; nothing is recomputed) and gets fresh blocks for the rest only. A published block whose
count falls to zero is not forgotten: it waits in a least-recently-used list and counts as free; allocation takes
never-cached blocks first, then evicts the least recently freed cached block (dropping its key). A cached block is
always full and never written again (a sequence appends into blocks after it), so sharing it needs no copy.

Every operation either completes or raises ``CacheFullError`` having changed nothing (so the engine can preempt
a sequence and retry). The manager is plain Python bookkeeping; only the tensors it hands out (slot mappings,
block tables, sequence lengths) go to the kernels.
"""
from __future__ import annotations

import collections
import hashlib
from array import array
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor


class CacheFullError(RuntimeError):
    """Not enough free blocks for the request; nothing was changed."""


class BlockAllocator:
    """A free list of block ids and a reference count per block.

    Blocks that hold a cached prefix (``cached``, kept by PagedKVCache) go, when their count falls to zero, to a
    least-recently-used list instead of the free list: they count as free, and ``allocate`` takes one (oldest
    first, calling ``on_evict(block)`` so its key is dropped) only when the free list is empty."""

    def __init__(self, num_blocks: int, on_evict: Optional[Callable[[int], None]] = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self._lru: "collections.OrderedDict[int, None]" = collections.OrderedDict()  # freed cached blocks
        self.cached: set = set()
        self.on_evict = on_evict
        self.refcount: List[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free) + len(self._lru)

    @property
    def num_evictable(self) -> int:
        """Free blocks that still hold a cached prefix."""
        return len(self._lru)

    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._lru:
            b, _ = self._lru.popitem(last=False)   # the least recently freed cached block
            self.cached.discard(b)
            if self.on_evict is not None:
                self.on_evict(b)
        else:
            raise CacheFullError(f"KV cache full: all {self.num_blocks} blocks are in use")
        self.refcount[b] = 1
        return b

    def take(self, block: int) -> None:
        """One more holder of a cached block, which may be free (then it leaves the LRU list)."""
        if self.refcount[block] == 0:
            del self._lru[block]
            self.refcount[block] = 1
        else:
            self.refcount[block] += 1

    def incref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is free; cannot share it")
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is already free")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self.cached:
                self._lru[block] = None
            else:
                self._free.append(block)

    def free_blocks(self) -> List[int]:
        """Every free block: never-cached ones, then the cached ones in eviction order."""
        return list(self._free) + list(self._lru)


@dataclass
class _Seq:
    blocks: List[int] = field(default_factory=list)
    length: int = 0
    hashes: List[bytes] = field(default_factory=list)   # prefix key of each of its first full blocks (publish)


def _block_key(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The key of a full block: a hash of its parent's key (that of all the tokens before it) and its tokens."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class PagedKVCache:
    """K/V pools for every layer plus the block bookkeeping of the sequences using them.

    >>> cache = PagedKVCache(num_layers=2, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=64)
    >>> slots = cache.allocate("a", 10)        # room for a 10-token prompt; slots (10,) int64 for append_kv
    >>> cache.append_kv(0, k, v, slots)        # per layer: write the prompt's K/V
    >>> cache.fork("a", "b")                   # "b" shares "a"'s blocks
    >>> slots = cache.append(["a", "b"])       # one more token each; the shared last block is copied first
    >>> tables, lens = cache.block_tables(["a", "b"]), cache.seq_lens(["a", "b"])
    >>> out = cache.attention(0, q, tables, lens, scale)
    >>> cache.free("a"); cache.free("b")       # every block back on the free list

    With prefix_caching=True, ``publish(seq, tokens)`` after a step keys the sequence's full blocks by their
    token prefix, and ``allocate_cached(seq, tokens)`` starts a sequence on the longest published prefix of its
    tokens (stats: tokens looked up and tokens found).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int = 16, num_kv_heads: int = 1,
                 head_dim: int = 64, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 prefix_caching: bool = False):
        if not 1 <= block_size <= 256:
            raise ValueError(f"block_size must be in [1, 256], got {block_size}")
        if num_layers < 0 or num_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"num_layers >= 0, num_kv_heads >= 1 and head_dim >= 1 required, got {num_layers}, "
                             f"{num_kv_heads}, {head_dim}")
        self.block_size = block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.device = torch.device(device)
        self.allocator = BlockAllocator(num_blocks, on_evict=self._evict)
        self.prefix_caching = prefix_caching
        self._by_key: Dict[bytes, int] = {}     # prefix key -> the cached block holding it
        self._key_of: Dict[int, bytes] = {}     # cached block -> its prefix key
        self.prefix_stats = dict(queried_tokens=0, hit_tokens=0, evictions=0)
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        if self.device.type == "cpu":
            # every pool a view of one buffer on transparent huge pages: a decode step reads blocks scattered over
            # all the pools, and with 4 KiB pages each block costs TLB misses of its own
            from tritium.utils import huge_page_buffer

            per = num_blocks * block_size * num_kv_heads * head_dim
            flat = huge_page_buffer(2 * num_layers * per * dtype.itemsize).view(dtype).zero_()
            pools = [flat[i * per:(i + 1) * per].view(shape) for i in range(2 * num_layers)]
        else:
            pools = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.k_pools: List[Tensor] = pools[:num_layers]
        self.v_pools: List[Tensor] = pools[num_layers:]
        self._seqs: Dict[Hashable, _Seq] = {}

    # ---- queries ----
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def sequences(self) -> List[Hashable]:
        return list(self._seqs)

    def seq_len(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def blocks_of(self, seq_id: Hashable) -> List[int]:
        return list(self._get(seq_id).blocks)

    def blocks_needed(self, seq_id: Optional[Hashable], num_tokens: int) -> int:
        """Free blocks that appending num_tokens to seq_id (None: a new sequence) would take, copy-on-write
        included."""
        if seq_id is None:
            return -(-num_tokens // self.block_size)
        s = self._get(seq_id)
        used = s.length % self.block_size
        shared_tail = used > 0 and num_tokens > 0 and self.allocator.refcount[s.blocks[-1]] > 1
        room = (self.block_size - used) if used else 0
        return -(-max(num_tokens - room, 0) // self.block_size) + int(shared_tail)

    def match_prefix(self, tokens: Sequence[int]) -> Tuple[List[int], List[bytes]]:
        """The cached blocks (and their keys) holding the longest published prefix of tokens, in whole blocks and
        leaving at least one token out (the step that adds the sequence needs the last token's logits)."""
        blocks: List[int] = []
        keys: List[bytes] = []
        if not self.prefix_caching:
            return blocks, keys
        bs, parent = self.block_size, b""
        for j in range((len(tokens) - 1) // bs):
            key = _block_key(parent, tokens[j * bs:(j + 1) * bs])
            b = self._by_key.get(key)
            if b is None:
                break
            blocks.append(b)
            keys.append(key)
            parent = key
        return blocks, keys

    def block_keys(self, tokens: Sequence[int]) -> List[bytes]:
        """The prefix keys of tokens' full blocks that match_prefix looks up (all but a last token left out),
        cached or not; empty without prefix_caching."""
        keys: List[bytes] = []
        if not self.prefix_caching:
            return keys
        bs, parent = self.block_size, b""
        for j in range((len(tokens) - 1) // bs):
            parent = _block_key(parent, tokens[j * bs:(j + 1) * bs])
            keys.append(parent)
        return keys

    def blocks_needed_cached(self, tokens: Sequence[int], extra: int = 0) -> int:
        """Free blocks that allocate_cached(seq, tokens) followed by extra more tokens would take: fresh blocks for
        what the cache does not hold, and the matched cached blocks that are free now (they stop being free)."""
        blocks, _ = self.match_prefix(tokens)
        idle = sum(1 for b in blocks if self.allocator.refcount[b] == 0)
        return self.blocks_needed(None, len(tokens) + extra) - len(blocks) + idle

    def can_append(self, seq_ids: Sequence[Hashable], num_tokens: int = 1) -> bool:
        return sum(self.blocks_needed(s, num_tokens) for s in seq_ids) <= self.num_free_blocks

    # ---- mutations (all-or-nothing) ----
    def allocate(self, seq_id: Hashable, num_tokens: int = 0) -> Tensor:
        """Start a sequence with room for num_tokens; returns their slots (int64 (num_tokens,))."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = self.blocks_needed(None, num_tokens)
        if need > self.num_free_blocks:
            raise CacheFullError(f"KV cache full: sequence {seq_id!r} needs {need} blocks, {self.num_free_blocks} "
                                 f"free of {self.num_blocks}")
        self._seqs[seq_id] = _Seq()
        return self._grow(seq_id, num_tokens)

    def allocate_cached(self, seq_id: Hashable, tokens: Sequence[int]) -> Tuple[int, Tensor]:
        """Start a sequence for tokens on the longest cached prefix of them (prefix_caching; otherwise none):
        (n, slots) where the first n tokens' K/V are already in the cache and slots (int64 (len(tokens) - n,))
        are where the rest go."""
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        blocks, keys = self.match_prefix(tokens)
        need = self.blocks_needed_cached(tokens)
        if need > self.num_free_blocks:
            raise CacheFullError(f"KV cache full: sequence {seq_id!r} needs {need} blocks, {self.num_free_blocks} "
                                 f"free of {self.num_blocks}")
        for b in blocks:   # taken before any fresh block is allocated, so none of them is evicted for it
            self.allocator.take(b)
        n = len(blocks) * self.block_size
        self._seqs[seq_id] = _Seq(list(blocks), n, list(keys))
        if self.prefix_caching:
            self.prefix_stats["queried_tokens"] += len(tokens)
            self.prefix_stats["hit_tokens"] += n
        return n, self._grow(seq_id, len(tokens) - n)

    def publish(self, seq_id: Hashable, tokens: Sequence[int]) -> None:
        """Key the sequence's full blocks by their prefix (tokens: the sequence's tokens, at least its length of
        them), once their K/V are written: later sequences starting with the same tokens share them. A block
        whose prefix another block already holds stays unkeyed (freed normally). No-op without prefix_caching."""
        if not self.prefix_caching:
            return
        s = self._get(seq_id)
        bs = self.block_size
        for j in range(len(s.hashes), min(s.length, len(tokens)) // bs):
            key = _block_key(s.hashes[-1] if s.hashes else b"", tokens[j * bs:(j + 1) * bs])
            s.hashes.append(key)
            b = s.blocks[j]
            if key not in self._by_key and b not in self._key_of:
                self._by_key[key] = b
                self._key_of[b] = key
                self.allocator.cached.add(b)

    def append(self, seq_ids: Hashable | Sequence[Hashable], num_tokens: int = 1) -> Tensor:
        """Reserve num_tokens more slots at the end of each sequence (copying a shared last block first);
        returns the slots, sequence by sequence (int64 (len(seq_ids) * num_tokens,))."""
        ids = [seq_ids] if not isinstance(seq_ids, (list, tuple)) else list(seq_ids)
        if len(set(ids)) != len(ids):
            raise ValueError("append: a sequence is listed twice")
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        need = sum(self.blocks_needed(s, num_tokens) for s in ids)
        if need > self.num_free_blocks:
            raise CacheFullError(f"KV cache full: appending {num_tokens} token(s) to {len(ids)} sequence(s) needs "
                                 f"{need} blocks, {self.num_free_blocks} free of {self.num_blocks}")
        slots: List[int] = []
        for s in ids:   # one tensor for all of them (a decode step appends to every running sequence)
            slots += self._grow_slots(s, num_tokens)
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """child starts as a copy of parent, sharing all of its blocks (no block is copied until a write)."""
        if child in self._seqs:
            raise ValueError(f"sequence {child!r} already exists")
        p = self._get(parent)
        for b in p.blocks:
            self.allocator.incref(b)
        self._seqs[child] = _Seq(list(p.blocks), p.length, list(p.hashes))

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence; blocks no other sequence holds go back to the free list."""
        s = self._seqs.pop(seq_id, None)
        if s is None:
            raise KeyError(f"unknown sequence {seq_id!r}")
        for b in s.blocks:
            self.allocator.decref(b)

    # ---- tensors for the kernels ----
    def block_tables(self, seq_ids: Sequence[Hashable], width: Optional[int] = None) -> Tensor:
        """int32 (len(seq_ids), width) block tables (width: the longest table; padding entries are 0, never
        read since they lie past the sequence's length)."""
        tables = [self._get(s).blocks for s in seq_ids]
        w = max([len(t) for t in tables] + [1]) if width is None else width
        if any(len(t) > w for t in tables):
            raise ValueError(f"block_tables: width {w} is less than the longest table ({max(map(len, tables))})")
        # padded in Python and made one tensor: per-row tensor copies cost more than a decode step's kernels
        rows = [t + [0] * (w - len(t)) for t in tables]
        return torch.tensor(rows, dtype=torch.int32, device=self.device).view(len(tables), w)

    def slots(self, seq_id: Hashable, num_tokens: Optional[int] = None) -> Tensor:
        """int64 (num_tokens,) slots of the sequence's first num_tokens tokens (None: all of them), in order: where
        a prefill that continues the sequence reads its earlier tokens' K/V (StepInput.prefill_slots)."""
        s = self._get(seq_id)
        n = s.length if num_tokens is None else num_tokens
        if not 0 <= n <= s.length:
            raise ValueError(f"num_tokens must be in [0, {s.length}] for sequence {seq_id!r}, got {n}")
        bs = self.block_size
        blocks = torch.tensor(s.blocks[:-(-n // bs)], dtype=torch.int64)
        out = (blocks[:, None] * bs + torch.arange(bs)).view(-1)[:n]
        return out.to(self.device)

    def seq_lens(self, seq_ids: Sequence[Hashable]) -> Tensor:
        return torch.tensor([self._get(s).length for s in seq_ids], dtype=torch.int32, device=self.device)

    def append_kv(self, layer: int, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
        from ..ops.paged import append_kv

        append_kv(k, v, self.k_pools[layer], self.v_pools[layer], slot_mapping)

    def attention(self, layer: int, q: Tensor, block_tables: Tensor, seq_lens: Tensor, scale: float,
                  softcap: Optional[float] = None, window: Optional[int] = None) -> Tensor:
        from ..ops.paged import paged_attention_decode

        return paged_attention_decode(q, self.k_pools[layer], self.v_pools[layer], block_tables, seq_lens, scale,
                                      softcap, window)

    def check_invariants(self) -> None:
        """Every block is free xor held; a held block's refcount is the number of tables holding it; nothing is
        leaked or owned twice within a table; each table covers exactly its sequence's length."""
        counts = [0] * self.num_blocks
        for sid, s in self._seqs.items():
            assert len(set(s.blocks)) == len(s.blocks), f"{sid!r} holds a block twice"
            assert len(s.blocks) == -(-s.length // self.block_size), f"{sid!r}: table does not match length"
            for b in s.blocks:
                counts[b] += 1
        free = self.allocator.free_blocks()
        free_set = set(free)
        assert len(free_set) == len(free), "a block is on the free list twice"
        for b in range(self.num_blocks):
            assert counts[b] == self.allocator.refcount[b], f"block {b}: refcount {self.allocator.refcount[b]} " \
                                                            f"!= {counts[b]} holders"
            assert (b in free_set) == (counts[b] == 0), f"block {b}: leaked or both free and held"
        # prefix cache: the two maps mirror each other and the allocator's set; a freed block that holds a key is
        # on the LRU list, and no block on the LRU list has lost its key
        assert all(self._by_key.get(k) == b for b, k in self._key_of.items()), "prefix maps disagree"
        assert len(self._by_key) == len(self._key_of), "prefix maps disagree"
        assert self.allocator.cached == set(self._key_of), "allocator's cached set != keyed blocks"
        assert set(self.allocator._lru) == {b for b in self._key_of if counts[b] == 0}, "LRU list != idle keyed blocks"
        for sid, s in self._seqs.items():
            assert len(s.hashes) <= len(s.blocks) and len(s.hashes) * self.block_size <= s.length, \
                f"{sid!r} has a key for a block that is not full"

    # ---- internals ----
    def _evict(self, block: int) -> None:
        """The allocator hands out a freed cached block: its key no longer names it."""
        del self._by_key[self._key_of.pop(block)]
        self.prefix_stats["evictions"] += 1

    def _get(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _grow(self, seq_id: Hashable, n: int) -> Tensor:
        """Append n slots to seq_id; the caller has checked that enough blocks are free."""
        return torch.tensor(self._grow_slots(seq_id, n), dtype=torch.int64, device=self.device)

    def _grow_slots(self, seq_id: Hashable, n: int) -> List[int]:
        """_grow's slots as a list."""
        s = self._seqs[seq_id]
        bs = self.block_size
        used = s.length % bs
        if used and n > 0 and self.allocator.refcount[s.blocks[-1]] > 1:
            old = s.blocks[-1]
            new = self.allocator.allocate()
            for pool in self.k_pools + self.v_pools:  # copy-on-write of the filled part of the shared block
                pool[new, :used] = pool[old, :used]
            self.allocator.decref(old)
            s.blocks[-1] = new
        slots = []
        for i in range(s.length, s.length + n):
            if i // bs == len(s.blocks):
                s.blocks.append(self.allocator.allocate())
            slots.append(s.blocks[i // bs] * bs + i % bs)
        s.length += n
        return slots

    def __repr__(self) -> str:
        pool = self.k_pools[0] if self.k_pools else None
        return (f"PagedKVCache(layers={len(self.k_pools)}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={pool.dtype if pool is not None else None}, free={self.num_free_blocks}, "
                f"sequences={len(self._seqs)}, cached={len(self._key_of)})")
