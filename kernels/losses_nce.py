"""info_nce (NT-Xent / CLIP-style) in row blocks, flash-attention style: the (N, N) similarities S = q k^T / T
(and the negatives' (N, M) block S_n = q n^T / T) exist only as (BLOCK_M, BLOCK_N) tiles in registers, computed
by tl.dot over the feature dim in steps of BLOCK_K (float32 sums; float32 inputs in IEEE float32, no tf32).

Forward (_nce_lse_kernel, one program per BLOCK_M rows of A): an online log-sum-exp over the column blocks of B (and
of C), lse_i = log sum_j exp(A_i . B_j / T), and the diagonal A_i . B_i / T from the tile that holds it. The row
direction is A = q, B = k, C = n; the column direction (symmetric) the same kernel with A = k, B = q.
  loss_i = lse_row_i - S_ii, symmetric: (lse_row_i + lse_col_i) / 2 - S_ii.
Backward (_nce_grad_kernel, one program per BLOCK_M rows of A and BLOCK_D of the features): the tiles are recomputed
and, with w = dloss (halved when symmetric),
  dS_ij = w_i (exp(S_ij - lse_row_i) - [i == j]) + w_j (exp(S_ij - lse_col_j) - [i == j])   (second term: symmetric)
  dq = dS k / T + dS_n n / T,  dk = dS^T q / T,  dn = dS_n^T q / T,  dS_n,im = w_i exp(S_n,im - lse_row_i)
each as the grad kernel's rows of A against the columns of B: dq (A = q, B = k, C = n), dk (A = k, B = q: the
transposed tile's row term is the column term), dn (A = n, B = q, the column term only, no diagonal). With 16-bit
operands the tile's float32 gradient enters the product as two 16-bit tiles, its rounding and the remainder
(_product): about float32's precision on the 16-bit tensor cores, for one more product per tile (rounded once to
16 bits, dS alone would add its rounding to every gradient).
Traffic: each kernel reads A once and B (and C) once per row block; the backward recomputes each tile once per
BLOCK_D of the features (D / BLOCK_D + 1 products of the tile's size).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sim(A, B, rows, cols, NA, NB, D, sa, sb, inv_t, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
         BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile A[rows] B[cols]^T * inv_t in float32 (rows / cols past NA / NB read as 0)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ks = tl.arange(0, BLOCK_K)
    pa = A + rows.to(tl.int64)[:, None] * sa
    pb = B + cols.to(tl.int64)[None, :] * sb
    ma = rows[:, None] < NA
    mb = cols[None, :] < NB
    for k0 in range(0, D, BLOCK_K):
        k = k0 + ks
        a = tl.load(pa + k[None, :], mask=ma & (k[None, :] < D), other=0.0)
        b = tl.load(pb + k[:, None], mask=mb & (k[:, None] < D), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc * inv_t


@triton.jit
def _product(acc, ds, b, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + ds b for a float32 tile ds: with SPLIT (16-bit b) as ds's 16-bit rounding times b plus the rounding of
    the remainder times b."""
    hi = ds.to(b.dtype)
    acc = tl.dot(hi, b, acc, input_precision=PRECISION)
    if SPLIT:
        acc = tl.dot((ds - hi.to(tl.float32)).to(b.dtype), b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _online_lse(m, l, s):
    """The running max m and exp-sum l of each row after the tile s (its padding columns -inf)."""
    m_new = tl.maximum(m, tl.max(s, axis=1))
    l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
    return m_new, l


@triton.jit
def _nce_lse_kernel(A, B, C, LSE, DIAG, NA, NB, NC, D, sa, sb, sc, inv_t, HAS_C: tl.constexpr,
                    WRITE_DIAG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    dg = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, NB, BLOCK_N):
        cols = j0 + offs
        s = _sim(A, B, rows, cols, NA, NB, D, sa, sb, inv_t, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        if WRITE_DIAG:
            dg += tl.sum(tl.where(rows[:, None] == cols[None, :], s, 0.0), axis=1)
        m, l = _online_lse(m, l, tl.where(cols[None, :] < NB, s, float("-inf")))
    if HAS_C:
        for j0 in range(0, NC, BLOCK_N):
            cols = j0 + offs
            s = _sim(A, C, rows, cols, NA, NC, D, sa, sc, inv_t, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            m, l = _online_lse(m, l, tl.where(cols[None, :] < NC, s, float("-inf")))
    mask = rows < NA
    tl.store(LSE + rows, m + tl.log(l), mask=mask)
    if WRITE_DIAG:
        tl.store(DIAG + rows, dg, mask=mask)


@triton.jit
def _nce_grad_kernel(A, B, C, LA, WA, LB, WB, OUT, NA, NB, NC, D, sa, sb, sc, inv_t, A_TERM: tl.constexpr,
                     B_TERM: tl.constexpr, DIAG: tl.constexpr, HAS_C: tl.constexpr, SPLIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                     PRECISION: tl.constexpr):
    """OUT[rows, dcols] = sum_j dS_ij B[j, dcols] / T (+ the C columns' A-term), dS per the module docstring:
    A_TERM the rows' own term (LA, WA per row of A), B_TERM the columns' (LB, WB per row of B), DIAG the -1 at
    i == j."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dcols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs = tl.arange(0, BLOCK_N)
    rmask = rows < NA
    dmask = dcols[None, :] < D
    if A_TERM:
        la = tl.load(LA + rows, mask=rmask, other=0.0)
        wa = tl.load(WA + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for j0 in range(0, NB, BLOCK_N):
        cols = j0 + offs
        cmask = cols < NB
        s = _sim(A, B, rows, cols, NA, NB, D, sa, sb, inv_t, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
        ds = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if A_TERM:
            ds += tl.exp(s - la[:, None]) * wa[:, None]
            if DIAG:
                ds -= tl.where(rows[:, None] == cols[None, :], wa[:, None], 0.0)
        if B_TERM:
            lb = tl.load(LB + cols, mask=cmask, other=0.0)
            wb = tl.load(WB + cols, mask=cmask, other=0.0)
            ds += tl.exp(s - lb[None, :]) * wb[None, :]
            if DIAG:
                ds -= tl.where(rows[:, None] == cols[None, :], wb[None, :], 0.0)
        ds = tl.where(rmask[:, None] & cmask[None, :], ds, 0.0)  # padding rows too: their terms can overflow
        b = tl.load(B + cols.to(tl.int64)[:, None] * sb + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
        acc = _product(acc, ds, b, SPLIT, PRECISION)
    if HAS_C:  # the negatives' columns: the rows' own term only (A_TERM)
        for j0 in range(0, NC, BLOCK_N):
            cols = j0 + offs
            cmask = cols < NC
            s = _sim(A, C, rows, cols, NA, NC, D, sa, sc, inv_t, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
            ds = tl.where(rmask[:, None] & cmask[None, :], tl.exp(s - la[:, None]) * wa[:, None], 0.0)
            c = tl.load(C + cols.to(tl.int64)[:, None] * sc + dcols[None, :], mask=cmask[:, None] & dmask, other=0.0)
            acc = _product(acc, ds, c, SPLIT, PRECISION)
    tl.store(OUT + rows.to(tl.int64)[:, None] * D + dcols[None, :], (acc * inv_t).to(OUT.dtype.element_ty),
             mask=rmask[:, None] & dmask)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) of the forward, by element size; the backward's (BLOCK_N, BLOCK_K, warps).
# float32 operands take twice the shared memory a step (the backward: half the BLOCK_N and BLOCK_K); their IEEE dots
# run on the FMA units with the operands in registers: the forward takes the backward's (32 x 32) tiles there (ptxas
# spilled (64 x 64) tiles at 4 and 8 warps).
_FWD = {2: (64, 64, 64, 4), 4: (32, 32, 32, 8)}
_BWD = {2: (64, 64, 8), 4: (32, 32, 8)}
# The backward's (BLOCK_M, BLOCK_D) float32 accumulator holds at most ACC_ELEMS (64 registers a thread at 8 warps):
# up to MAX_BLOCK_D features in one block (each further block recomputes the tiles), fewer rows when it is wide.
ACC_ELEMS, MAX_BLOCK_D = 16384, 512


def _unit(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _precision(x):
    return "ieee" if x.dtype == torch.float32 else "tf32"  # tf32: unused for 16-bit operands


def _lse(a, b, c, inv_t, diag):
    """(lse (NA,), diagonal (NA,) or None) of the rows of a against the columns of b (and c), float32."""
    na, d = a.shape
    bm, bn, bk, warps = _FWD[a.element_size()]
    lse = torch.empty((na,), device=a.device, dtype=torch.float32)
    dg = torch.empty((na,), device=a.device, dtype=torch.float32) if diag else None
    nc = c.shape[0] if c is not None else 0
    if na == 0:
        return lse, dg
    _nce_lse_kernel[(triton.cdiv(na, bm),)](
        a, b, c, lse, dg, na, b.shape[0], nc, d, a.stride(0), b.stride(0), c.stride(0) if c is not None else 0,
        float(inv_t), HAS_C=c is not None, WRITE_DIAG=diag, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        PRECISION=_precision(a), num_warps=warps)
    return lse, dg


def info_nce_fwd(q, k, neg, inv_t, symmetric, block):
    """(per-row loss (N,), row log-sum-exp (N,), column log-sum-exp ((N,) when symmetric, else (0,))), float32.
    q, k (N, D), neg (M, D) or None, one dtype. `block` (the CPU path's rows per block) is not used: the tiles are
    the kernel's. Reads q, k and n once per row block of each direction; writes 12N bytes."""
    q, k, neg = _unit(q), _unit(k), _unit(neg)
    lse_row, diag = _lse(q, k, neg, inv_t, True)
    loss = lse_row - diag
    if symmetric:
        lse_col, _ = _lse(k, q, None, inv_t, False)
        loss = (loss + (lse_col - diag)) * 0.5
    else:
        lse_col = lse_row.new_empty((0,))
    return loss, lse_row, lse_col


def _grad(a, b, c, la, wa, lb, wb, inv_t, diag):
    na, d = a.shape
    out = torch.empty((na, d), device=a.device, dtype=a.dtype)
    bn, bk, warps = _BWD[a.element_size()]
    bd = max(16, min(triton.next_power_of_2(d), MAX_BLOCK_D))  # tl.dot takes blocks of 16 and up
    bm = max(16, min(64, ACC_ELEMS // bd))
    if na:
        _nce_grad_kernel[(triton.cdiv(na, bm), triton.cdiv(d, bd))](
            a, b, c, la, wa, lb, wb, out, na, b.shape[0], c.shape[0] if c is not None else 0, d, a.stride(0),
            b.stride(0), c.stride(0) if c is not None else 0, float(inv_t), A_TERM=la is not None,
            B_TERM=lb is not None, DIAG=diag, HAS_C=c is not None, SPLIT=a.element_size() == 2, BLOCK_M=bm,
            BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, PRECISION=_precision(a), num_warps=warps)
    return out


def info_nce_bwd(dloss, q, k, neg, lse_row, lse_col, inv_t, symmetric, block):
    """(dq, dk, dn) of sum_i dloss_i loss_i in the inputs' dtype (dn (0,) without negatives), recomputing the
    similarity tiles (module docstring). dloss (N,) float32; lse_row, lse_col: info_nce_fwd's. `block` is not used.
    Reads q, k and n once per row block and feature block of each of the three products; writes them once."""
    q, k, neg = _unit(q), _unit(k), _unit(neg)
    w = (dloss.float() * (0.5 if symmetric else 1.0)).contiguous()
    col = (lse_col, w) if symmetric else (None, None)
    dq = _grad(q, k, neg, lse_row, w, *col, inv_t, True)
    dk = _grad(k, q, None, *col, lse_row, w, inv_t, True)
    dn = _grad(neg, q, None, None, None, lse_row, w, inv_t, False) if neg is not None else q.new_empty((0,))
    return dq, dk, dn
