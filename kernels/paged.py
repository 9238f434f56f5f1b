"""Paged KV cache: append_kv and split-K paged decode attention (flash-decoding).

append_kv:   k_pool[slot // bs, slot % bs] = k[t] (and v) for slot = slot_mapping[t] >= 0.
             Traffic: reads and writes 2 * tokens * kv_heads * head_dim elements.
decode:      per (sequence b, KV head h, split s) program: for the G = q_heads / kv_heads query heads of h,
             m = max_j s_j, l = sum_j exp(s_j - m), o = sum_j exp(s_j - m) v_j / l over the split's tokens, with
             s_j = softcap(q . k_j * scale); then a merge program per (b, q head) combines the splits through their
             logsumexp m + log l.  Traffic: reads each cached token's K and V row once (2 * sum(len) * kv_heads *
             head_dim elements), writes B * q_heads * (splits + 1) * head_dim partials and outputs.
Block tables are int32; the page offset block * stride is computed in int64.
"""
import torch
import triton
import triton.language as tl

from ._utils import num_programs


@triton.jit
def _tanh(x):
    # tanh without cancellation near 0: its Taylor series for |x| < 0.25 (next term < 3e-9 relative), else
    # 1 - 2 / (exp(2x) + 1) (exp overflow gives the right limits +-1)
    x2 = x * x
    small = x * (1.0 + x2 * (-1.0 / 3 + x2 * (2.0 / 15 + x2 * (-17.0 / 315 + x2 * (62.0 / 2835)))))
    return tl.where(tl.abs(x) < 0.25, small, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _append_kv_kernel(
    K, V, KP, VP, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kpb, stride_kpt, stride_kph, stride_vpb, stride_vpt, stride_vph,
    H, D, block_size,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + t)
    blk = slot // block_size  # slot is int64: the pool offset below is 64-bit
    off = slot % block_size
    hs = tl.arange(0, BLOCK_H)
    ds = tl.arange(0, BLOCK_D)
    for h0 in range(0, H, BLOCK_H):
        h = h0 + hs
        # slot < 0 marks a padding token (the scalar condition is broadcast to the tile explicitly)
        mask = ((h < H)[:, None] & (ds < D)[None, :]) & (tl.zeros([BLOCK_H, BLOCK_D], tl.int64) + slot >= 0)
        k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + ds[None, :], mask=mask)
        v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + ds[None, :], mask=mask)
        tl.store(KP + blk * stride_kpb + off * stride_kpt + h[:, None] * stride_kph + ds[None, :], k, mask=mask)
        tl.store(VP + blk * stride_vpb + off * stride_vpt + h[:, None] * stride_vph + ds[None, :], v, mask=mask)


@triton.jit
def _paged_decode_kernel(
    Q, K, V, TABLES, LENS, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_tb, stride_tn, n_splits,
    scale, softcap, window, block_size, split_len,
    G: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr,       # the GQA group (padded to >= 16 rows for the tensor-core dots of 16-bit caches)
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,   # Gemma-2 style s = c * tanh(s / c); off: no tanh in the inner loop
    HAS_WINDOW: tl.constexpr,    # sliding window: only the last `window` tokens
    # 16-bit caches are widened to float32 and multiplied in TF32, which holds bf16/fp16 values exactly (and p
    # with more bits than a bf16 product would); float32 caches multiply in IEEE float32
    IEEE_F32: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    s = tl.program_id(2)
    L = tl.load(LENS + b)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(L - window, 0)
    lo = start + s * split_len
    hi = tl.minimum(lo + split_len, L)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    gmask = gs < G
    dmask = ds < D
    q = tl.load(Q + b * stride_qb + (h * G + gs)[:, None] * stride_qh + ds[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for p0 in range(lo, hi, BLOCK_N):
        pos = p0 + tl.arange(0, BLOCK_N)
        pmask = pos < hi
        blk = tl.load(TABLES + b * stride_tb + (pos // block_size) * stride_tn, mask=pmask, other=0).to(tl.int64)
        off = (pos % block_size).to(tl.int64)
        kvmask = pmask[:, None] & dmask[None, :]
        k = tl.load(K + blk[:, None] * stride_kb + off[:, None] * stride_kt + h * stride_kh + ds[None, :],
                    mask=kvmask, other=0.0).to(tl.float32)
        v = tl.load(V + blk[:, None] * stride_vb + off[:, None] * stride_vt + h * stride_vh + ds[None, :],
                    mask=kvmask, other=0.0).to(tl.float32)
        if IEEE_F32:
            sc = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            sc = tl.dot(q, tl.trans(k), input_precision="tf32") * scale
        if HAS_SOFTCAP:
            sc = softcap * _tanh(sc / softcap)
        sc = tl.where(pmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if IEEE_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="tf32")
        m = m_new
    # an empty split (past the end of a short sequence) leaves lse = -inf and o = 0; the merge weights it 0
    lse = m + tl.log(l)
    o = acc / tl.where(l > 0, l, 1.0)[:, None]
    row = (b * G * tl.num_programs(1) + h * G + gs) * n_splits + s  # (b, q head, split)
    tl.store(LSE_PART + row, lse, mask=gmask)
    tl.store(O_PART + row[:, None] * BLOCK_D + ds[None, :], o, mask=gmask[:, None])


@triton.jit
def _paged_merge_kernel(
    O_PART, LSE_PART, OUT, n_splits, D,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # b * q_heads + head
    ss = tl.arange(0, BLOCK_S)
    ds = tl.arange(0, BLOCK_D)
    smask = ss < n_splits
    lse = tl.load(LSE_PART + r * n_splits + ss, mask=smask, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp(lse - mx), 0.0)
    o = tl.load(O_PART + (r * n_splits + ss)[:, None] * BLOCK_D + ds[None, :], mask=smask[:, None], other=0.0)
    tot = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)  # an empty sequence gives zeros
    tl.store(OUT + r * D + ds, out.to(OUT.dtype.element_ty), mask=ds < D)


def append_kv(k, v, k_pool, v_pool, slot_mapping):
    """k_pool[slot // bs, slot % bs] = k[t], same for v, for slot = slot_mapping[t] >= 0 (in place).
    k, v (tokens, kv_heads, head_dim) with unit head_dim stride; pools (num_blocks, bs, kv_heads, head_dim);
    slot_mapping int64 (tokens,).  Moves 4 * tokens * kv_heads * head_dim elements."""
    T, H, D = k.shape
    if T == 0:
        return
    block_d = triton.next_power_of_2(D)
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // block_d))
    _append_kv_kernel[(T,)](
        k, v, k_pool, v_pool, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        H, D, k_pool.shape[1], BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )


def paged_attention_decode(q, k_pool, v_pool, block_tables, seq_lens, scale, softcap, window):
    """o[b, h] = softmax_j(softcap(q[b, h] . k_j * scale)) v_j over the tokens j of sequence b (the last
    `window` of them if window is set), k_j/v_j read from the pages block_tables[b] (GQA: KV head h // G).
    q (B, q_heads, D); pools (num_blocks, bs, kv_heads, D); block_tables int32 (B, max_blocks); seq_lens int32
    (B,) -> (B, q_heads, D) in q's dtype.  Moves 2 * sum(seq_lens) * kv_heads * D pool elements (+ partials)."""
    B, Hq, D = q.shape
    Hkv, bs = k_pool.shape[2], k_pool.shape[1]
    G = Hq // Hkv
    out = torch.empty((B, Hq, D), device=q.device, dtype=q.dtype)
    if B == 0:
        return out
    # float32 caches multiply in IEEE float32, i.e. on the FMA units rather than tensor cores: each thread then holds
    # whole K-rows of both operands, so those tiles are kept small (16 tokens per step, the group not padded to the
    # 16 rows a tensor-core dot needs) to stay within the registers.
    ieee = q.dtype == torch.float32
    block_n = 16 if ieee else 32
    max_ctx = block_tables.shape[1] * bs
    if window is not None:
        max_ctx = min(max_ctx, window)
    # splits so that B * kv_heads * splits programs fill the machine (no host sync: the table width bounds
    # every length); each split a multiple of BLOCK_N tokens
    want = triton.cdiv(num_programs(q.device, 1 << 30), B * Hkv)
    splits = max(1, min(want, triton.cdiv(max(max_ctx, 1), block_n)))
    split_len = triton.cdiv(triton.cdiv(max(max_ctx, 1), splits), block_n) * block_n
    splits = triton.cdiv(max(max_ctx, 1), split_len)
    block_d = triton.next_power_of_2(D)
    o_part = torch.empty((B * Hq * splits, block_d), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((B * Hq * splits,), device=q.device, dtype=torch.float32)
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, block_tables, seq_lens, o_part, lse_part,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), block_tables.stride(0), block_tables.stride(1),
        splits, scale, softcap if softcap is not None else 1.0, window if window is not None else 0, bs, split_len,
        G=G, D=D, BLOCK_G=triton.next_power_of_2(G) if ieee else max(16, triton.next_power_of_2(G)),
        BLOCK_D=block_d, BLOCK_N=block_n,
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=window is not None, IEEE_F32=ieee,
        num_warps=4,
    )
    _paged_merge_kernel[(B * Hq,)](o_part, lse_part, out, splits, D,
                                   BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4)
    return out
