"""Benchmarks of paged decode attention and append_kv.

paged_attention_decode: tritium on a paged cache (16-token blocks in shuffled order) against (a) what a user
writes without a paged kernel: gather the pages into a contiguous cache, then SDPA, and (b) SDPA on a cache
that is already contiguous (the cost of paging itself). Shape (batch, seq_len, q_heads, kv_heads, head_dim);
bytes: K and V read once, 2 * batch * seq_len * kv_heads * head_dim elements.
"""
import torch
import torch.nn.functional as F

from tritium.bench.case import OpCase, esize
from tritium.inference import append_kv, paged_attention_decode

BLOCK_SIZE = 16


def _make(shape, dtype, device):
    B, L, Hq, Hkv, D = shape
    nb = -(-L // BLOCK_SIZE)
    k = torch.randn(B, Hkv, L, D, dtype=dtype, device=device)  # the contiguous cache
    v = torch.randn(B, Hkv, L, D, dtype=dtype, device=device)
    tables = torch.randperm(B * nb, device=device).to(torch.int32).view(B, nb)
    k_pool = torch.zeros(B * nb, BLOCK_SIZE, Hkv, D, dtype=dtype, device=device)
    v_pool = torch.zeros_like(k_pool)
    for b in range(B):  # same tokens in pages
        pad = nb * BLOCK_SIZE - L
        kb = F.pad(k[b].transpose(0, 1), (0, 0, 0, 0, 0, pad)).reshape(nb, BLOCK_SIZE, Hkv, D)
        vb = F.pad(v[b].transpose(0, 1), (0, 0, 0, 0, 0, pad)).reshape(nb, BLOCK_SIZE, Hkv, D)
        k_pool[tables[b].long()] = kb
        v_pool[tables[b].long()] = vb
    q = torch.randn(B, Hq, D, dtype=dtype, device=device)
    lens = torch.full((B,), L, dtype=torch.int32, device=device)
    return q, k_pool, v_pool, tables, lens, D ** -0.5, k, v


def _tritium(q, k_pool, v_pool, tables, lens, scale, k, v):
    return paged_attention_decode(q, k_pool, v_pool, tables, lens, scale)


def _gather_sdpa(q, k_pool, v_pool, tables, lens, scale, k, v):
    B, Hq, D = q.shape
    L = k.shape[2]
    idx = tables.long()
    kc = k_pool[idx].flatten(1, 2)[:, :L].transpose(1, 2)  # (B, Hkv, L, D) gathered from the pages
    vc = v_pool[idx].flatten(1, 2)[:, :L].transpose(1, 2)
    return F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, scale=scale, enable_gqa=True).squeeze(2)


def _contiguous_sdpa(q, k_pool, v_pool, tables, lens, scale, k, v):
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True).squeeze(2)


def _bytes(shape, dtype):
    B, L, Hq, Hkv, D = shape
    return (2 * B * L * Hkv * D + 2 * B * Hq * D) * esize(dtype)


def _make_append(shape, dtype, device):
    T, Hkv, D = shape
    nb = -(-T // BLOCK_SIZE) * 2
    k = torch.randn(T, Hkv, D, dtype=dtype, device=device)
    v = torch.randn(T, Hkv, D, dtype=dtype, device=device)
    k_pool = torch.zeros(nb, BLOCK_SIZE, Hkv, D, dtype=dtype, device=device)
    v_pool = torch.zeros_like(k_pool)
    slots = torch.randperm(nb * BLOCK_SIZE, device=device)[:T]
    return k, v, k_pool, v_pool, slots


def _append_eager(k, v, k_pool, v_pool, slots):
    k_pool.view(-1, *k_pool.shape[2:])[slots] = k
    v_pool.view(-1, *v_pool.shape[2:])[slots] = v


DECODE_SHAPES = ((8, 2048, 32, 8, 64), (1, 8192, 32, 8, 64))
CASES = [
    OpCase("paged_attention_decode", _make, _tritium, _gather_sdpa, _bytes, shapes=DECODE_SHAPES,
           note="eager: gather pages into a contiguous cache, then SDPA (enable_gqa)"),
    OpCase("paged_attention_decode_vs_contiguous", _make, _tritium, _contiguous_sdpa, _bytes, shapes=DECODE_SHAPES,
           note="eager: SDPA on an already-contiguous cache (the cost of paging)"),
    OpCase("append_kv", _make_append, append_kv, _append_eager,
           lambda s, d: 4 * s[0] * s[1] * s[2] * esize(d), shapes=((8, 8, 64), (2048, 8, 64)),
           note="eager: index_put into the flattened pools"),
]
