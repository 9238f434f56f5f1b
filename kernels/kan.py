"""KAN spline term (efficient-kan's KANLinear spline branch): the B-spline bases of each input feature evaluated in
registers and multiplied into the spline weights in one kernel, forward and backward.

  y[b, o] = sum_i sum_c B_c(x[b, i]; t_i) W[i, c, o]

x (B, I); knots t (I, NK) per feature; weight_t (I, NB, O), NB = NK - 1 - k (order-k bases). The Cox-de Boor
recursion runs on a (BLOCK_B, NBP) tile of one feature's bases (NBP >= NK, a power of two >= 16); the step from
order d - 1 to d needs each basis's right neighbour, a one-column shift done as a product with a 0/1 matrix
(exact in IEEE float32: one nonzero term per sum). The tile then enters a tl.dot with the feature's (NB, O) weight
block: the (B, I, NB) basis tensor never reaches memory. Traffic: forward reads x and W once per row block and
writes y; the backward recomputes the bases (dx: one program per row block and feature, the (NB, O) weights
against dy; dW: one program per feature and column block, summing bases^T dy over the batch).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _shift_left(v, NBP: tl.constexpr):
    """v[:, c + 1] at column c (zero past the end), as v @ S with S[r, c] = (r == c + 1)."""
    r = tl.arange(0, NBP)
    s = (r[:, None] == r[None, :] + 1).to(tl.float32)
    return tl.dot(v, s, input_precision="ieee")


@triton.jit
def _knots(T, idx, NK):
    """Knots t_idx as a (1, NBP) row; past the last knot, distinct made-up values far beyond it (their columns are
    masked out, and distinct values keep the masked lanes free of 0 / 0)."""
    return tl.load(T + idx, mask=idx < NK, other=0.0).to(tl.float32)[None, :] + \
        tl.where(idx < NK, 0.0, 1e6 * (idx + 1).to(tl.float32))[None, :]


@triton.jit
def _bases(x, T, NK, K: tl.constexpr, NBP: tl.constexpr, DERIV: tl.constexpr):
    """The order-K bases (BLOCK_B, NBP) of x (BLOCK_B,) float32 on the knots T[0, NK) (column c: B_c, zero for
    c >= NK - 1 - K), and with DERIV their derivatives (else a zero tile)."""
    c = tl.arange(0, NBP)
    t0 = _knots(T, c, NK)
    t1 = _knots(T, c + 1, NK)
    xb = x[:, None]
    b = ((xb >= t0) & (xb < t1) & (c[None, :] < NK - 1)).to(tl.float32)
    db = tl.zeros_like(b)
    for d in tl.static_range(1, K + 1):
        td = _knots(T, c + d, NK)
        td1 = _knots(T, c + d + 1, NK)
        nb = _shift_left(b, NBP)
        if DERIV:
            if d == K:  # B'_{c,K} = K (B_{c,K-1} / (t_{c+K} - t_c) - B_{c+1,K-1} / (t_{c+K+1} - t_{c+1}))
                lo = tl.where(b == 0.0, 0.0, b / (td - t0))
                hi = tl.where(nb == 0.0, 0.0, nb / (td1 - t1))
                db = tl.where(c[None, :] < NK - 1 - K, K * (lo - hi), 0.0)
        v = (xb - t0) / (td - t0) * b + (td1 - xb) / (td1 - t1) * nb
        b = tl.where(c[None, :] < NK - 1 - d, v, 0.0)
    return b, db


@triton.jit
def _kan_fwd_kernel(X, T, W, Y, Bn, I, NK, NB, O, stride_xb, stride_xi,
                    K: tl.constexpr, NBP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):
    pb = tl.program_id(0)
    po = tl.program_id(1)
    rows = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = po * BLOCK_O + tl.arange(0, BLOCK_O)
    c = tl.arange(0, NBP)
    rmask = rows < Bn
    wmask = (c[:, None] < NB) & (cols[None, :] < O)
    acc = tl.zeros((BLOCK_B, BLOCK_O), dtype=tl.float32)
    for i in range(I):
        x = tl.load(X + rows.to(tl.int64) * stride_xb + i * stride_xi, mask=rmask, other=0.0).to(tl.float32)
        b, _ = _bases(x, T + i * NK, NK, K, NBP, False)
        w = tl.load(W + (i * NB + c[:, None]).to(tl.int64) * O + cols[None, :], mask=wmask, other=0.0)
        acc += tl.dot(b, w.to(tl.float32), input_precision="ieee")
    omask = rmask[:, None] & (cols[None, :] < O)
    tl.store(Y + rows[:, None].to(tl.int64) * O + cols[None, :], acc.to(Y.dtype.element_ty), mask=omask)


@triton.jit
def _kan_dx_kernel(DY, X, T, W, DX, Bn, I, NK, NB, O, stride_xb, stride_xi,
                   K: tl.constexpr, NBP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):
    pb = tl.program_id(0)
    i = tl.program_id(1)
    rows = pb * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < Bn
    c = tl.arange(0, NBP)
    g = tl.zeros((BLOCK_B, NBP), dtype=tl.float32)  # g[b, c] = <dy[b, :], W[i, c, :]>
    for o0 in range(0, O, BLOCK_O):
        cols = o0 + tl.arange(0, BLOCK_O)
        dy = tl.load(DY + rows[:, None].to(tl.int64) * O + cols[None, :],
                     mask=rmask[:, None] & (cols[None, :] < O), other=0.0).to(tl.float32)
        w = tl.load(W + (i * NB + c[None, :]).to(tl.int64) * O + cols[:, None],
                    mask=(c[None, :] < NB) & (cols[:, None] < O), other=0.0).to(tl.float32)  # (BLOCK_O, NBP)
        g += tl.dot(dy, w, input_precision="ieee")
    x = tl.load(X + rows.to(tl.int64) * stride_xb + i * stride_xi, mask=rmask, other=0.0).to(tl.float32)
    _, db = _bases(x, T + i * NK, NK, K, NBP, True)
    dx = tl.sum(db * g, axis=1)
    tl.store(DX + rows.to(tl.int64) * I + i, dx.to(DX.dtype.element_ty), mask=rmask)


@triton.jit
def _kan_dw_kernel(DY, X, T, DW, Bn, I, NK, NB, O, stride_xb, stride_xi, stride_wi, stride_wc, stride_wo,
                   K: tl.constexpr, NBP: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_O: tl.constexpr):
    i = tl.program_id(0)
    po = tl.program_id(1)
    cols = po * BLOCK_O + tl.arange(0, BLOCK_O)
    c = tl.arange(0, NBP)
    acc = tl.zeros((NBP, BLOCK_O), dtype=tl.float32)
    for b0 in range(0, Bn, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        rmask = rows < Bn
        x = tl.load(X + rows.to(tl.int64) * stride_xb + i * stride_xi, mask=rmask, other=0.0).to(tl.float32)
        b, _ = _bases(x, T + i * NK, NK, K, NBP, False)
        b = tl.where(rmask[:, None], b, 0.0)  # padded rows: x = 0 may lie inside the grid
        dy = tl.load(DY + rows[:, None].to(tl.int64) * O + cols[None, :],
                     mask=rmask[:, None] & (cols[None, :] < O), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(b), dy, input_precision="ieee")
    tl.store(DW + i.to(tl.int64) * stride_wi + c[:, None].to(tl.int64) * stride_wc
             + cols[None, :].to(tl.int64) * stride_wo, acc.to(DW.dtype.element_ty),
             mask=(c[:, None] < NB) & (cols[None, :] < O))


def _nbp(nk):
    return max(16, triton.next_power_of_2(nk))


def _block_o(O):
    return min(64, max(16, triton.next_power_of_2(O)))


def kan_spline_fwd(x, grid, weight_t, order):
    """y (B, O) = sum_{i,c} B_c(x[:, i]; grid[i]) weight_t[i, c, :] for x (B, I), grid (I, NK) knots, weight_t
    (I, NK - 1 - order, O) (made contiguous: a copy of the small weight where tritium.kan_spline passes the weight's
    permuted view). Reads x, the knots and W per row block; writes y."""
    weight_t = weight_t.contiguous()
    Bn, I = x.shape
    NK = grid.shape[1]
    NB, O = weight_t.shape[1], weight_t.shape[2]
    y = torch.empty((Bn, O), device=x.device, dtype=x.dtype)
    if Bn == 0 or O == 0:
        return y
    BLOCK_B, BLOCK_O = 32, _block_o(O)
    _kan_fwd_kernel[(triton.cdiv(Bn, BLOCK_B), triton.cdiv(O, BLOCK_O))](
        x, grid.contiguous(), weight_t, y, Bn, I, NK, NB, O, x.stride(0), x.stride(1), K=order, NBP=_nbp(NK),
        BLOCK_B=BLOCK_B, BLOCK_O=BLOCK_O, num_warps=4)
    return y


def kan_spline_bwd(dy, x, grid, weight_t, order, need_dx, need_dw):
    """(dx (B, I) or empty, dW (I, NB, O) or empty) for the forward above and dy (B, O) contiguous; dW in
    weight_t's layout where that is dense, else contiguous (empty_like's rule, as the C++ kernel's)."""
    Bn, I = x.shape
    NK = grid.shape[1]
    NB, O = weight_t.shape[1], weight_t.shape[2]
    grid = grid.contiguous()
    dy = dy.contiguous()
    BLOCK_O = _block_o(O)
    dx = torch.empty((Bn, I) if need_dx else (0,), device=x.device, dtype=x.dtype)
    dw = torch.empty_like(weight_t) if need_dw else torch.empty((0,), device=x.device, dtype=x.dtype)
    if need_dx and Bn > 0 and I > 0:
        BLOCK_B = 32
        weight_t = weight_t.contiguous()
        _kan_dx_kernel[(triton.cdiv(Bn, BLOCK_B), I)](
            dy, x, grid, weight_t, dx, Bn, I, NK, NB, O, x.stride(0), x.stride(1), K=order, NBP=_nbp(NK),
            BLOCK_B=BLOCK_B, BLOCK_O=BLOCK_O, num_warps=4)
    if need_dw and I > 0 and O > 0:
        BLOCK_B, BLOCK_O = 32, min(BLOCK_O, 32)  # the (NBP, BLOCK_O) accumulator and two basis tiles: 64 spills
        _kan_dw_kernel[(I, triton.cdiv(O, BLOCK_O))](
            dy, x, grid, dw, Bn, I, NK, NB, O, x.stride(0), x.stride(1), *dw.stride(), K=order, NBP=_nbp(NK),
            BLOCK_B=BLOCK_B, BLOCK_O=BLOCK_O, num_warps=4)
    return dx, dw
