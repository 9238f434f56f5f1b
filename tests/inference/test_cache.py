"""PagedKVCache / BlockAllocator: invariants under random operation sequences (hypothesis), copy-on-write,
all-or-nothing CacheFullError, and the cache's contents read back through the kernels."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import tritium  # noqa: F401
from tritium.inference import BlockAllocator, CacheFullError, PagedKVCache, paged_attention_decode


def _contents(cache, sid):
    """The K rows of a sequence, gathered through its block table (layer 0)."""
    blocks = torch.tensor(cache.blocks_of(sid), dtype=torch.long)
    n = cache.seq_len(sid)
    return cache.k_pools[0][blocks].reshape(-1, cache.num_kv_heads, cache.head_dim)[:n]


def _write(cache, slots, values):
    """Write token values (one number per token, broadcast over heads/dims) into every layer."""
    k = values.view(-1, 1, 1).expand(-1, cache.num_kv_heads, cache.head_dim).contiguous()
    for layer in range(len(cache.k_pools)):
        cache.append_kv(layer, k, -k, slots)


_ops = st.lists(st.tuples(st.sampled_from(["allocate", "append", "fork", "free"]), st.integers(0, 7),
                          st.integers(0, 40)), max_size=60)


@settings(max_examples=80, deadline=None)
@given(ops=_ops, block_size=st.sampled_from([1, 3, 16]), num_blocks=st.integers(1, 24))
def test_random_operations_keep_invariants_and_contents(ops, block_size, num_blocks):
    cache = PagedKVCache(num_layers=2, num_blocks=num_blocks, block_size=block_size, num_kv_heads=1, head_dim=2)
    model = {}  # seq id -> list of token values it must read back
    counter = [0.0]

    def fresh(n):
        vals = torch.arange(counter[0] + 1, counter[0] + 1 + n, dtype=torch.float32)
        counter[0] += n
        return vals

    for op, sid, n in ops:
        before = (cache.num_free_blocks, {s: (cache.blocks_of(s), cache.seq_len(s)) for s in cache.sequences()})
        try:
            if op == "allocate":
                if sid in model:
                    continue
                slots = cache.allocate(sid, n)
                vals = fresh(n)
                _write(cache, slots, vals)
                model[sid] = vals.tolist()
            elif op == "append" and model:
                sid = sorted(model)[sid % len(model)]
                slots = cache.append([sid], n % 5)
                vals = fresh(n % 5)
                _write(cache, slots, vals)
                model[sid] += vals.tolist()
            elif op == "fork" and model:
                parent = sorted(model)[sid % len(model)]
                child = max(model) + 1 + n
                cache.fork(parent, child)
                model[child] = list(model[parent])
            elif op == "free" and model:
                sid = sorted(model)[sid % len(model)]
                cache.free(sid)
                del model[sid]
        except CacheFullError:
            after = (cache.num_free_blocks, {s: (cache.blocks_of(s), cache.seq_len(s)) for s in cache.sequences()})
            assert after == before, "a failed operation changed the cache"
        cache.check_invariants()
        for s, vals in model.items():
            got = _contents(cache, s)[:, 0, 0].tolist()
            assert got == vals, f"sequence {s} reads back {got}, expected {vals}"
    for s in list(model):
        cache.free(s)
    cache.check_invariants()
    assert cache.num_free_blocks == num_blocks, "blocks leaked"


def test_fork_copy_on_write():
    cache = PagedKVCache(num_layers=1, num_blocks=8, block_size=4, num_kv_heads=1, head_dim=1)
    _write(cache, cache.allocate("a", 6), torch.arange(6.0))
    cache.fork("a", "b")
    assert cache.blocks_of("a") == cache.blocks_of("b")
    assert cache.allocator.refcount[cache.blocks_of("a")[0]] == 2
    _write(cache, cache.append("b"), torch.tensor([100.0]))   # b's last block is shared and partly full: copied
    assert cache.blocks_of("a")[0] == cache.blocks_of("b")[0]  # the full first block stays shared
    assert cache.blocks_of("a")[1] != cache.blocks_of("b")[1]
    _write(cache, cache.append("a"), torch.tensor([200.0]))   # a's last block is now its own: no copy
    assert _contents(cache, "a").flatten().tolist() == [0, 1, 2, 3, 4, 5, 200]
    assert _contents(cache, "b").flatten().tolist() == [0, 1, 2, 3, 4, 5, 100]
    cache.check_invariants()
    cache.free("a")
    cache.free("b")
    assert cache.num_free_blocks == 8


def test_cache_full_is_all_or_nothing():
    cache = PagedKVCache(num_layers=1, num_blocks=3, block_size=2, num_kv_heads=1, head_dim=1)
    cache.allocate("a", 4)
    cache.allocate("b", 1)
    assert cache.num_free_blocks == 0
    assert not cache.can_append(["a"]) and cache.can_append(["b"])
    with pytest.raises(CacheFullError, match="KV cache full"):
        cache.append(["b", "a"])  # b would fit, a would not: neither changes
    assert cache.seq_len("a") == 4 and cache.seq_len("b") == 1
    with pytest.raises(CacheFullError):
        cache.allocate("c", 1)
    assert "c" not in cache
    cache.check_invariants()


def test_allocator_errors():
    a = BlockAllocator(2)
    b0, _b1 = a.allocate(), a.allocate()
    with pytest.raises(CacheFullError):
        a.allocate()
    a.decref(b0)
    with pytest.raises(ValueError, match="already free"):
        a.decref(b0)
    with pytest.raises(ValueError, match="free"):
        a.incref(b0)
    with pytest.raises(ValueError, match="block_size"):
        PagedKVCache(1, 4, block_size=257)


@pytest.mark.parametrize("block_size", [1, 16, 256])
def test_decode_through_the_cache_equals_dense(block_size):
    """Prompts of mixed lengths written with append_kv, a forked sequence, then one decode step: equals dense
    attention over each sequence's tokens."""
    torch.manual_seed(0)
    H, Hkv, D = 4, 2, 16
    cache = PagedKVCache(num_layers=1, num_blocks=64 * 16 // block_size + 4, block_size=block_size,
                         num_kv_heads=Hkv, head_dim=D)
    tokens = {}
    for sid, n in enumerate([1, 33, 300]):
        k, v = torch.randn(n, Hkv, D), torch.randn(n, Hkv, D)
        cache.append_kv(0, k, v, cache.allocate(sid, n))
        tokens[sid] = (k, v)
    cache.fork(2, 3)
    tokens[3] = tokens[2]
    for sid in range(4):  # one new token each (3's shared last block is copied first)
        k, v = torch.randn(1, Hkv, D), torch.randn(1, Hkv, D)
        cache.append_kv(0, k, v, cache.append(sid))
        tokens[sid] = (torch.cat([tokens[sid][0], k]), torch.cat([tokens[sid][1], v]))
    ids = list(range(4))
    q = torch.randn(4, H, D)
    out = paged_attention_decode(q, cache.k_pools[0], cache.v_pools[0], cache.block_tables(ids), cache.seq_lens(ids),
                                 D ** -0.5)
    for sid in ids:
        k, v = tokens[sid]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[sid][:, None], k.transpose(0, 1), v.transpose(0, 1), enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[sid], ref, rtol=1e-5, atol=1e-5)


def test_block_tables_and_append_slots():
    """A step's tables: each sequence's blocks, zero padded to the longest (or a given width); a width narrower
    than a table is an error. append's slots: every sequence's new slots, in the order of the ids."""
    cache = PagedKVCache(num_layers=1, num_blocks=8, block_size=2, num_kv_heads=1, head_dim=2)
    cache.allocate("a", 5)   # blocks 0, 1, 2
    cache.allocate("b", 1)   # block 3
    t = cache.block_tables(["a", "b"])
    assert t.dtype == torch.int32 and t.tolist() == [[0, 1, 2], [3, 0, 0]]
    assert cache.block_tables(["b"], width=4).tolist() == [[3, 0, 0, 0]]
    assert cache.block_tables([]).shape == (0, 1)
    with pytest.raises(ValueError, match="width 2"):
        cache.block_tables(["a"], width=2)
    slots = cache.append(["b", "a"])   # b's second slot in block 3; a's sixth in block 2
    assert slots.dtype == torch.int64 and slots.tolist() == [7, 5]
    assert cache.append([]).tolist() == []
