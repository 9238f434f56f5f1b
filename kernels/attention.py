"""Flash attention (FlashAttention-2): one forward kernel, and a backward of three (delta, dK/dV, dQ) that
recomputes P from the saved log-sum-exp.

Visibility of key j to query i: (not HAS_LEFT or j >= i + offset - left) and (not HAS_RIGHT or
j <= i + offset + right) and j < S; scores s = q.k * scale, optionally softcap * tanh(s / softcap), plus an
optional additive mask (HAS_MASK, any strides: broadcast masks are stride-0 views).
Forward:  m = max_j s, l = sum_j exp(s - m), o = sum_j exp(s - m) v / l, lse = m + log l (-inf, o = 0 when
          no key is visible).  Reads Q once and K, V once per query block; writes O and lse.
Backward: delta_i = sum_d dO*O - dlse;  P = exp(s - lse);  dV = P^T dO;  dS = P (dO V^T - delta) [* (1-t^2)];
          dK = scale dS^T Q;  dQ = scale dS K.  GQA: dK, dV per query head in float32, summed over the group.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _scores(q, k, rows, cols, MASK, stride_mm, stride_mn, L, S, scale, softcap, offset, left, right,
            HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
            PRECISION: tl.constexpr):
    """(scores with -inf where not visible, d softcap / d s or None) for a (rows x cols) tile."""
    s = tl.dot(q, k, input_precision=PRECISION) * scale
    dt = s  # placeholder when SOFTCAP is off (not used)
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): exact limits at +-inf, no libdevice dependency
        t = 1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0)
        s = softcap * t
        dt = 1.0 - t * t
    visible = (cols[None, :] < S) & (rows[:, None] < L)
    if HAS_RIGHT:
        visible = visible & (cols[None, :] <= rows[:, None] + offset + right)
    if HAS_LEFT:
        visible = visible & (cols[None, :] >= rows[:, None] + offset - left)
    if HAS_MASK:
        m = tl.load(MASK + rows[:, None].to(tl.int64) * stride_mm + cols[None, :].to(tl.int64) * stride_mn,
                    mask=visible, other=0.0)
        s = s + m.to(tl.float32)
    s = tl.where(visible, s, float("-inf"))
    return s, dt


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, S, offset, left, right,
               HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """[lo, hi) of the keys any row of the query block [start_m, start_m + BLOCK_M) may see (lo block-aligned)."""
    lo = 0
    hi = S
    if HAS_LEFT:
        lo = tl.maximum(start_m + offset - left, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    if HAS_RIGHT:
        hi = tl.minimum(start_m + BLOCK_M - 1 + offset + right + 1, S)
    return lo, hi


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, MASK, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ob, stride_oh, stride_om,
    H, group, L, S, D, DV, scale, softcap, offset, left, right,
    HAS_MASK: tl.constexpr,   # an additive (or converted boolean) mask is read per tile
    HAS_LEFT: tl.constexpr,   # sliding window on the left: skips key blocks before the window
    HAS_RIGHT: tl.constexpr,  # causal / right window: skips key blocks after the diagonal
    SOFTCAP: tl.constexpr,    # Gemma-2 logit soft-capping
    PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no tf32 rounding), "tf32" (unused) otherwise
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=(rows[:, None] < L) & (offs_d[None, :] < D), other=0.0)
    Kb = K + b * stride_kb + hk * stride_kh
    Vb = V + b * stride_vb + hk * stride_vh
    Mb = MASK
    if HAS_MASK:  # MASK is None otherwise
        Mb = MASK + b * stride_mb + h * stride_mh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, BLOCK_N, S, offset, left, right, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = tl.load(Kb + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                    mask=(cols[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        s, _ = _scores(q, k, rows, cols, Mb, stride_mm, stride_mn, L, S, scale, softcap, offset, left, right,
                       HAS_MASK, HAS_LEFT, HAS_RIGHT, SOFTCAP, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet: p = 0, not NaN
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(Vb + cols[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],
                    mask=(cols[:, None] < S) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    row_ok = rows < L
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None].to(tl.int64) * stride_om + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + bh.to(tl.int64) * L + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_om, stride_dob, stride_doh, stride_dom,
                           H, L, DV,
                           HAS_DLSE: tl.constexpr,  # return_lse's gradient: d lse / d s = P shifts delta
                           BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_DV)
    msk = (rows[:, None] < L) & (offs[None, :] < DV)
    r64 = rows[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + r64 * stride_om + offs[None, :], mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + r64 * stride_dom + offs[None, :], mask=msk,
                 other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * L + rows, delta, mask=rows < L)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DK, DV_,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom,
    H, group, L, S, D, DV, scale, softcap, offset, left, right,
    HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    start_n = pid_n * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    c64 = cols[:, None].to(tl.int64)
    kt = tl.load(K + b * stride_kb + hk * stride_kh + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                 mask=(cols[None, :] < S) & (offs_d[:, None] < D), other=0.0)           # (D, N)
    vt = tl.load(V + b * stride_vb + hk * stride_vh + cols[None, :].to(tl.int64) * stride_vn + offs_dv[:, None],
                 mask=(cols[None, :] < S) & (offs_dv[:, None] < DV), other=0.0)         # (DV, N)
    Qb = Q + b * stride_qb + h * stride_qh
    DOb = DO + b * stride_dob + h * stride_doh
    Mb = MASK
    if HAS_MASK:  # MASK is None otherwise
        Mb = MASK + b * stride_mb + h * stride_mh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # the query rows that may see any key of this block
    lo = 0
    hi = L
    if HAS_RIGHT:  # j <= i + offset + right  <=>  i >= j - offset - right
        lo = tl.maximum(start_n - offset - right, 0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if HAS_LEFT:   # j >= i + offset - left  <=>  i <= j - offset + left
        hi = tl.minimum(start_n + BLOCK_N - 1 - offset + left + 1, L)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        r64 = rows[:, None].to(tl.int64)
        row_ok = rows < L
        q = tl.load(Qb + r64 * stride_qm + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DOb + r64 * stride_dom + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < DV),
                     other=0.0)
        lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("-inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
        s, dt = _scores(q, kt, rows, cols, Mb, stride_mm, stride_mn, L, S, scale, softcap, offset, left, right,
                        HAS_MASK, HAS_LEFT, HAS_RIGHT, SOFTCAP, PRECISION)
        lse_safe = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw nothing: P = 0
        p = tl.exp(s - lse_safe[:, None])
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dt
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * scale
    base = bh.to(tl.int64) * S
    tl.store(DK + (base + c64) * D + offs_d[None, :], dk, mask=(cols[:, None] < S) & (offs_d[None, :] < D))
    tl.store(DV_ + (base + c64) * DV + offs_dv[None, :], dv, mask=(cols[:, None] < S) & (offs_dv[None, :] < DV))


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, MASK, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_dob, stride_doh, stride_dom,
    H, group, L, S, D, DV, scale, softcap, offset, left, right,
    HAS_MASK: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // group).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    r64 = rows[:, None].to(tl.int64)
    row_ok = rows < L
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * stride_qb + h * stride_qh + r64 * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + r64 * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + bh.to(tl.int64) * L + rows, mask=row_ok, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh.to(tl.int64) * L + rows, mask=row_ok, other=0.0)
    Kb = K + b * stride_kb + hk * stride_kh
    Vb = V + b * stride_vb + hk * stride_vh
    Mb = MASK
    if HAS_MASK:  # MASK is None otherwise
        Mb = MASK + b * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, hi = _key_range(start_m, BLOCK_M, BLOCK_N, S, offset, left, right, HAS_LEFT, HAS_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kt = tl.load(Kb + cols[None, :].to(tl.int64) * stride_kn + offs_d[:, None],
                     mask=(cols[None, :] < S) & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(Vb + cols[None, :].to(tl.int64) * stride_vn + offs_dv[:, None],
                     mask=(cols[None, :] < S) & (offs_dv[:, None] < DV), other=0.0)
        s, dt = _scores(q, kt, rows, cols, Mb, stride_mm, stride_mn, L, S, scale, softcap, offset, left, right,
                        HAS_MASK, HAS_LEFT, HAS_RIGHT, SOFTCAP, PRECISION)
        p = tl.exp(s - lse[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dt
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    dq = dq * scale
    tl.store(DQ + (bh.to(tl.int64) * L + r64) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ---- launchers ----
# (BLOCK_M, BLOCK_N, num_warps, num_stages) of each kernel, by how it multiplies and by the padded head dim
# (BLOCK_D up to 64, 128 or 256). Every entry compiles for sm_80 and sm_90 with no register spill and within the
# per-block shared memory (tests/kernels/test_attention.py::test_gpu_compile checks each, as launched).
# - "ieee" (float32 inputs, no tf32 rounding) multiplies on the FMA units, where each thread holds whole
#   head-dim rows of both dot operands in registers: small tiles over 8 warps, and in the backward no software
#   pipelining (num_stages 1), whose prefetched tiles would stay live beside the operands.
# - "mma" (16-bit inputs) multiplies on tensor cores. An additive mask is loaded element by element in the score
#   tile's layout (its row stride need not be aligned), one 64-bit address per element: at head dims up to 64 the
#   forward's 128 x 64 score tile leaves no registers for them, so with a mask it takes 64 x 32 tiles.
_CONFIGS = {
    ("fwd", "ieee", 64): (32, 64, 8, 3), ("fwd", "ieee", 128): (32, 32, 8, 2), ("fwd", "ieee", 256): (32, 16, 8, 3),
    ("fwd", "mma", 64): (128, 64, 4, 3), ("fwd", "mma", 128): (128, 32, 8, 3), ("fwd", "mma", 256): (64, 32, 8, 3),
    ("fwd_mask", "mma", 64): (64, 32, 4, 3),
    ("dkdv", "ieee", 64): (16, 16, 8, 1), ("dkdv", "ieee", 128): (16, 32, 8, 1), ("dkdv", "ieee", 256): (16, 16, 8, 1),
    ("dq", "ieee", 64): (32, 32, 8, 1), ("dq", "ieee", 128): (32, 32, 8, 1), ("dq", "ieee", 256): (16, 16, 8, 1),
    ("dkdv", "mma", 64): (64, 32, 4, 3), ("dkdv", "mma", 128): (32, 32, 4, 2), ("dkdv", "mma", 256): (32, 32, 8, 1),
    ("dq", "mma", 64): (64, 32, 4, 3), ("dq", "mma", 128): (32, 32, 4, 2), ("dq", "mma", 256): (32, 32, 8, 1),
}


def _config(kernel: str, q, d: int, has_mask: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of kernel ("fwd", "dkdv" or "dq") for q's dtype at head dim d."""
    precision = "ieee" if q.dtype == torch.float32 else "mma"
    bucket = 64 if d <= 64 else 128 if d <= 128 else 256
    if has_mask and (kernel + "_mask", precision, bucket) in _CONFIGS:
        kernel += "_mask"
    return _CONFIGS[kernel, precision, bucket]


def _mask_strides(mask):
    return tuple(mask.stride()) if mask is not None else (0, 0, 0, 0)


def _flags(q, mask, left, right, softcap):
    return dict(HAS_MASK=mask is not None, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, SOFTCAP=softcap > 0.0,
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def _dims(q, v):
    return max(16, triton.next_power_of_2(q.shape[3])), max(16, triton.next_power_of_2(v.shape[3]))


def flash_attn_fwd(q, k, v, mask, scale, offset, left, right, softcap):
    """o = softmax(cap(q k^T * scale) + mask | visible) v; lse = logsumexp of the same scores per row.
    q (B, H, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv) with unit last stride, mask None or (B, H, L, S) any
    strides -> o (B, H, L, Dv) in (B, L, H, Dv) memory (torch's layout: o.transpose(1, 2) holds a token's heads
    side by side, a free reshape), lse (B, H, L) float32.  Moves (B H L D + B H L Dv) + (L / BLOCK_M) B H S
    (D + Dv) elements (+ the visible mask tiles)."""
    B, H, L, D = q.shape
    S, DV = k.shape[2], v.shape[3]
    o = torch.empty((B, L, H, DV), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    BM, BN, warps, stages = _config("fwd", q, max(D, DV), mask is not None)
    BD, BDV = _dims(q, v)
    grid = (triton.cdiv(L, BM), B * H)
    _attn_fwd_kernel[grid](
        q, k, v, mask, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_mask_strides(mask),
        *o.stride()[:3],
        H, H // k.shape[1], L, S, D, DV, scale, softcap, offset, left, right,
        **_flags(q, mask, left, right, softcap), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, BLOCK_DV=BDV,
        num_warps=warps, num_stages=stages)
    return o, lse


def flash_attn_bwd(dout, q, k, v, out, lse, dlse, mask, scale, offset, left, right, softcap):
    """dq, dk, dv of flash_attn_fwd, recomputing P = exp(s - lse) tile by tile; dlse (B, H, L) or None.
    dk, dv are accumulated per query head in float32 (B, H, S, D) and summed over each GQA group.
    Moves about 2 (B H L (D + Dv)) + 2 (L / BLOCK_M) B H S (D + Dv) elements."""
    B, H, L, D = q.shape
    Hk, S, DV = k.shape[1], k.shape[2], v.shape[3]
    BD, BDV = _dims(q, v)
    delta = torch.empty((B, H, L), device=q.device, dtype=torch.float32)
    dm = max(16, min(64, 4096 // BDV))   # rows per program: two (rows, BLOCK_DV) float32 tiles in registers
    _attn_bwd_delta_kernel[(triton.cdiv(L, dm), B * H)](
        out, dout, dlse, delta, *out.stride()[:3], *dout.stride()[:3], H, L, DV,
        HAS_DLSE=dlse is not None, BLOCK_M=dm, BLOCK_DV=BDV)
    dq = torch.empty((B, H, L, D), device=q.device, dtype=q.dtype)
    dk = torch.empty((B, H, S, D), device=q.device, dtype=torch.float32)
    dv = torch.empty((B, H, S, DV), device=q.device, dtype=torch.float32)
    common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *_mask_strides(mask), *dout.stride()[:3],
              H, H // Hk, L, S, D, DV, scale, softcap, offset, left, right)
    flags = dict(**_flags(q, mask, left, right, softcap), BLOCK_D=BD, BLOCK_DV=BDV)
    BM, BN, warps, stages = _config("dkdv", q, max(D, DV))
    _attn_bwd_dkdv_kernel[(triton.cdiv(S, BN), B * H)](q, k, v, mask, dout, lse, delta, dk, dv, *common, **flags,
                                                        BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    BM, BN, warps, stages = _config("dq", q, max(D, DV))
    _attn_bwd_dq_kernel[(triton.cdiv(L, BM), B * H)](q, k, v, mask, dout, lse, delta, dq, *common, **flags,
                                                    BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)
    group = H // Hk
    if group > 1:
        dk = dk.view(B, Hk, group, S, D).sum(2)
        dv = dv.view(B, Hk, group, S, DV).sum(2)
    return dq, dk.to(k.dtype), dv.to(v.dtype)
