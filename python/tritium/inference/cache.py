"""Paged KV cache manager: a block allocator with reference counts and per-sequence block tables.

Every layer has one K and one V pool of shape (num_blocks, block_size, num_kv_heads, head_dim); a sequence's
tokens live in the blocks its table lists (token i at block table[i // block_size], offset i % block_size, i.e.
slot table[i // bs] * bs + i % bs). Sequences can share blocks (``fork``: a parallel sample or beam reuses its
parent's prompt); a block's reference count is the number of tables holding it, and a block returns to the
free list when that count reaches zero. Appending to a sequence whose last, partly filled block is shared first
copies that block (copy-on-write), so writers never touch another sequence's tokens.

Every operation either completes or raises ``CacheFullError`` having changed nothing (so the engine can preempt
a sequence and retry). The manager is plain Python bookkeeping; only the tensors it hands out (slot mappings,
block tables, sequence lengths) go to the kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, List, Optional, Sequence

import torch
from torch import Tensor


class CacheFullError(RuntimeError):
    """Not enough free blocks for the request; nothing was changed."""


class BlockAllocator:
    """A free list of block ids and a reference count per block."""

    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: List[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0, 1, 2, ...
        self.refcount: List[int] = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"KV cache full: all {self.num_blocks} blocks are in use")
        b = self._free.pop()
        self.refcount[b] = 1
        return b

    def incref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is free; cannot share it")
        self.refcount[block] += 1

    def decref(self, block: int) -> None:
        if self.refcount[block] <= 0:
            raise ValueError(f"block {block} is already free")
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            self._free.append(block)

    def free_blocks(self) -> List[int]:
        return list(self._free)


@dataclass
class _Seq:
    blocks: List[int] = field(default_factory=list)
    length: int = 0


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
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int = 16, num_kv_heads: int = 1,
                 head_dim: int = 64, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        if not 1 <= block_size <= 256:
            raise ValueError(f"block_size must be in [1, 256], got {block_size}")
        if num_layers < 0 or num_kv_heads < 1 or head_dim < 1:
            raise ValueError(f"num_layers >= 0, num_kv_heads >= 1 and head_dim >= 1 required, got {num_layers}, "
                             f"{num_kv_heads}, {head_dim}")
        self.block_size = block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.device = torch.device(device)
        self.allocator = BlockAllocator(num_blocks)
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
        slots = [self._grow(s, num_tokens) for s in ids]
        return torch.cat(slots) if slots else torch.empty(0, dtype=torch.int64, device=self.device)

    def fork(self, parent: Hashable, child: Hashable) -> None:
        """child starts as a copy of parent, sharing all of its blocks (no block is copied until a write)."""
        if child in self._seqs:
            raise ValueError(f"sequence {child!r} already exists")
        p = self._get(parent)
        for b in p.blocks:
            self.allocator.incref(b)
        self._seqs[child] = _Seq(list(p.blocks), p.length)

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
        out = torch.zeros((len(tables), w), dtype=torch.int32)
        for i, t in enumerate(tables):
            if t:
                out[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
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

    # ---- internals ----
    def _get(self, seq_id: Hashable) -> _Seq:
        try:
            return self._seqs[seq_id]
        except KeyError:
            raise KeyError(f"unknown sequence {seq_id!r}") from None

    def _grow(self, seq_id: Hashable, n: int) -> Tensor:
        """Append n slots to seq_id; the caller has checked that enough blocks are free."""
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
        return torch.tensor(slots, dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        pool = self.k_pools[0] if self.k_pools else None
        return (f"PagedKVCache(layers={len(self.k_pools)}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"dtype={pool.dtype if pool is not None else None}, free={self.num_free_blocks}, "
                f"sequences={len(self._seqs)})")
