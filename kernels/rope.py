"""Rotary position embedding of q and k in one kernel (forward; the backward is the same kernel rotating by
-theta).

Per token n at p = positions[n], each head, each pair i < R/2 (R = 2 * cos.shape[1] <= head dim):
  half layout:        (x[i], x[i + R/2])  -> (x[i] c - x[i + R/2] s, x[i + R/2] c + x[i] s)
  interleaved layout: (x[2i], x[2i + 1])  -> (x[2i] c - x[2i + 1] s, x[2i + 1] c + x[2i] s)
dims past R are copied. Traffic: read and write N (Hq + Hk) D elements, read N R floats of tables.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _rope_rotate(X, Y, stride_xn, stride_xh, n, H, D, c, s, offs_h, offs_i,
                 HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    hmask = offs_h[:, None] < H
    pmask = hmask & (offs_i[None, :] < HALF)
    xrow = X + n * stride_xn + offs_h[:, None].to(tl.int64) * stride_xh
    yrow = Y + (n * H + offs_h[:, None].to(tl.int64)) * D
    if INTERLEAVED:  # pairs (2i, 2i+1)
        ia = 2 * offs_i[None, :]
        ib = ia + 1
    else:            # pairs (i, i + HALF)
        ia = offs_i[None, :]
        ib = ia + HALF
    a = tl.load(xrow + ia, mask=pmask, other=0.0).to(tl.float32)
    b = tl.load(xrow + ib, mask=pmask, other=0.0).to(tl.float32)
    tl.store(yrow + ia, (a * c - b * s).to(Y.dtype.element_ty), mask=pmask)
    tl.store(yrow + ib, (b * c + a * s).to(Y.dtype.element_ty), mask=pmask)
    # pass-through dims [2 HALF, D) (partial rotary)
    offs_d = 2 * HALF + tl.arange(0, BLOCK_D)
    dmask = hmask & (offs_d[None, :] < D)
    tl.store(yrow + offs_d[None, :], tl.load(xrow + offs_d[None, :], mask=dmask), mask=dmask)


@triton.jit
def _rope_kernel(
    Q, K, QO, KO, COS, SIN, POS,
    stride_qn, stride_qh, stride_kn, stride_kh, HQ, HK, D, sign,
    HALF: tl.constexpr,         # rotary_dim // 2
    INTERLEAVED: tl.constexpr,  # GPT-J pair layout instead of Llama's halves
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_I: tl.constexpr,
    BLOCK_D: tl.constexpr,      # pass-through block (dims past the rotary dim); 1 when there are none
):
    n = tl.program_id(0).to(tl.int64)
    p = tl.load(POS + n).to(tl.int64)
    offs_i = tl.arange(0, BLOCK_I)
    imask = offs_i < HALF
    c = tl.load(COS + p * HALF + offs_i, mask=imask, other=0.0)[None, :]
    s = (tl.load(SIN + p * HALF + offs_i, mask=imask, other=0.0) * sign)[None, :]
    _rope_rotate(Q, QO, stride_qn, stride_qh, n, HQ, D, c, s,
                 tl.arange(0, BLOCK_HQ), offs_i, HALF, INTERLEAVED, BLOCK_HQ, BLOCK_D)
    _rope_rotate(K, KO, stride_kn, stride_kh, n, HK, D, c, s,
                 tl.arange(0, BLOCK_HK), offs_i, HALF, INTERLEAVED, BLOCK_HK, BLOCK_D)


def rope_fwd(q, k, cos, sin, positions, interleaved, inverse):
    """Rotate q (N, Hq, D) and k (N, Hk, D) (unit last stride) by the angles of positions (N,) int64 in the
    float32 tables cos, sin (P, R/2); inverse rotates by -theta (the backward). -> contiguous (N, Hq, D),
    (N, Hk, D).  Moves 2 N (Hq + Hk) D elements + N R floats."""
    N, HQ, D = q.shape
    HK = k.shape[1]
    half = cos.shape[1]
    qo = torch.empty((N, HQ, D), device=q.device, dtype=q.dtype)
    ko = torch.empty((N, HK, D), device=k.device, dtype=k.dtype)
    if N > 0:
        rest = D - 2 * half
        _rope_kernel[(N,)](
            q, k, qo, ko, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1), HQ, HK, D,
            -1.0 if inverse else 1.0, HALF=half, INTERLEAVED=interleaved,
            BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HK=triton.next_power_of_2(HK),
            BLOCK_I=triton.next_power_of_2(half), BLOCK_D=triton.next_power_of_2(rest) if rest > 0 else 1,
            num_warps=4)
    return qo, ko
