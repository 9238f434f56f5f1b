"""Activations, gated units, DyT and PReLU: one elementwise kernel per direction with an ``ACT`` selector, the
gated kernels, then the DyT and PReLU kernels; launchers last.

Elementwise (x (M, N) rows with a unit column stride, any row stride):
    forward   y = f(x; a, b, c)               reads MN, writes MN
    backward  dx = dy * f'(x; a, b, c)        reads 2MN, writes MN
Gated (gate, up (M, H); or one (M, 2H) tensor holding both halves):
    forward   y = f(gate) * up                reads 2MH, writes MH
    backward  dgate = dy up f'(gate), dup = dy f(gate)   reads 3MH, writes 2MH (one pass)
DyT: y = w tanh(alpha x) + b; backward dx = alpha g, dalpha = sum g x, dw = sum_rows dy t, db = sum_rows dy
    with t = tanh(alpha x), g = dy w (1 - t^2).
PReLU: y = x > 0 ? x : w[c] x; backward dx = x > 0 ? dy : w dy, dw[c] = sum_{x <= 0} x dy.

All math runs in float32 (the inputs' 16-bit values are widened on load), with torch's formulas so special
points match torch. tanh, log1p and expm1 are written with exp/log (libdevice is not available under the
interpreter the tests run in); log1p and expm1 use the Goldberg/Kahan correction so they stay accurate
near 0.
"""
import functools

import torch
import triton
import triton.language as tl

from ._utils import num_programs

# The ACT selector of the elementwise kernels: an activation's id is its position in this tuple, which lists
# tritium.ops.activations.ACTIVATIONS and csrc/activations.cpp's TRITIUM_ACTIVATIONS in the same order
# (batch_norm_act passes the id across all three; tests/ops/test_activations.py compares the orders).
ACT_ORDER = ("relu", "leaky_relu", "elu", "sigmoid", "tanh", "softplus", "gelu", "gelu_tanh", "silu", "mish",
             "logsigmoid", "hardswish", "swish")
ACT_IDS = {name: i for i, name in enumerate(ACT_ORDER)}
# Gated ops -> the id of their gate function.
GATE_IDS = {"glu": ACT_IDS["sigmoid"], "swiglu": ACT_IDS["silu"], "geglu": ACT_IDS["gelu"],
            "geglu_tanh": ACT_IDS["gelu_tanh"]}

BLOCK = 1024        # elements per program of the elementwise kernels
# GELU's constants are literals in the jit code (a compiled kernel may only read constexpr globals, and the
# interpreter cannot do arithmetic with those): 1/sqrt(2) = 0.7071067811865476, 1/sqrt(2 pi) =
# 0.3989422804014327, sqrt(2/pi) = 0.7978845608028654, kappa = 0.044715.


# ---------------------------------------------------------------------------------------------------------
# math helpers (float32)
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _log1p(u):
    # log(1 + u) * u / ((1 + u) - 1): exact rounding of 1 + u compensated (Goldberg); inf stays inf
    w = 1.0 + u
    r = tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))
    return tl.where(w == float("inf"), w, r)


@triton.jit
def _expm1(x):
    # (e - 1) * x / log(e) with e = exp(x) (Kahan): accurate near 0; exp overflow gives inf, -inf gives -1
    e = tl.exp(x)
    r = tl.where(e == 1.0, x, (e - 1.0) * (x / tl.log(e)))
    r = tl.where(e - 1.0 == -1.0, -1.0, r)
    return tl.where(e == float("inf"), e, r)


@triton.jit
def _gelu_both(x, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        x2 = x * x
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x2 * x))
        left = 0.5 * x
        right = 1.0 + t
        f = left * right
        df = 0.5 * right + left * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x2)
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        f = x * cdf
        df = cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327
    return f, df


@triton.jit
def _act_fwd(x, a, b, c, ACT: tl.constexpr):
    """f(x); ACT as in ACT_IDS."""
    if ACT == 0:  # relu: NaN stays NaN
        y = tl.where(x <= 0, 0.0, x)
    elif ACT == 1:  # leaky_relu(a = slope)
        y = tl.where(x > 0, x, x * a)
    elif ACT == 2:  # elu(a = alpha*scale, b = scale, c = input_scale)
        y = tl.where(x >= 0, x * b, _expm1(x * c) * a)
    elif ACT == 3:
        y = _sigmoid(x)
    elif ACT == 4:
        y = _tanh(x)
    elif ACT == 5:  # softplus(a = beta, b = threshold)
        z = x * a
        y = tl.where(z > b, x, _log1p(tl.exp(z)) / a)
    elif ACT == 6:
        y, _ = _gelu_both(x, False)
    elif ACT == 7:
        y, _ = _gelu_both(x, True)
    elif ACT == 8:
        y = x * _sigmoid(x)
    elif ACT == 9:  # mish: softplus(x) = max(x, 0) + log1p(exp(-|x|)) (no overflow)
        y = x * _tanh(tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))
    elif ACT == 10:  # logsigmoid
        y = tl.minimum(x, 0.0) - _log1p(tl.exp(-tl.abs(x)))
    elif ACT == 11:  # hardswish
        y = x * tl.minimum(tl.maximum(x + 3.0, 0.0), 6.0) / 6.0
    else:  # swish(a = beta)
        y = x * _sigmoid(x * a)
    return y


@triton.jit
def _act_bwd(dy, x, a, b, c, ACT: tl.constexpr):
    """dy * f'(x), with torch's choices at the special points."""
    if ACT == 0:  # gradient 0 at x = 0; dy at NaN (torch: threshold_backward on the result)
        dx = tl.where(x <= 0, 0.0, dy)
    elif ACT == 1:
        dx = tl.where(x > 0, dy, dy * a)
    elif ACT == 2:
        dx = tl.where(x > 0, dy * b, dy * c * a * tl.exp(x * c))  # NaN -> NaN, as torch
    elif ACT == 3:
        s = _sigmoid(x)
        dx = dy * s * (1.0 - s)
    elif ACT == 4:
        t = _tanh(x)
        dx = dy * (1.0 - t * t)
    elif ACT == 5:
        z = x * a
        e = tl.exp(z)
        dx = tl.where(z > b, dy, dy * e / (e + 1.0))
    elif ACT == 6:
        _, d = _gelu_both(x, False)
        dx = dy * d
    elif ACT == 7:
        _, d = _gelu_both(x, True)
        dx = dy * d
    elif ACT == 8:
        s = _sigmoid(x)
        dx = dy * s * (1.0 + x * (1.0 - s))
    elif ACT == 9:
        s = _sigmoid(x)
        t = _tanh(tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))
        dx = dy * (t + x * s * (1.0 - t * t))
    elif ACT == 10:
        # sigmoid(-x) from z = exp(-|x|): 1 - z/(1+z) for x < 0, z/(1+z) otherwise. One quotient and one select
        # (rather than two selects feeding the quotient) keeps fewer values live across the division's slow path.
        z = tl.exp(-tl.abs(x))
        q = z / (1.0 + z)
        dx = dy * tl.where(x < 0, 1.0 - q, q)
    elif ACT == 11:
        dx = tl.where(x <= -3.0, 0.0, tl.where(x >= 3.0, dy, dy * (x / 3.0 + 0.5)))  # torch: 0 at -3, dy at 3, NaN
    else:
        s = _sigmoid(x * a)
        dx = dy * (s + a * x * s * (1.0 - s))
    return dx


@triton.jit
def _gate_both(x, ACT: tl.constexpr):
    """(f(x), f'(x)) of a gate function (sigmoid, silu, gelu, gelu_tanh)."""
    if ACT == 3:
        f = _sigmoid(x)
        df = f * (1.0 - f)
    elif ACT == 8:
        s = _sigmoid(x)
        f = x * s
        df = s * (1.0 + x * (1.0 - s))
    elif ACT == 6:
        f, df = _gelu_both(x, False)
    else:
        f, df = _gelu_both(x, True)
    return f, df


# ---------------------------------------------------------------------------------------------------------
# kernels. Programs are laid out on one grid axis: program p handles block p % blocks_per_row of row
# p // blocks_per_row (grid axis 0 allows 2^31 programs, axes 1/2 only 65535). Offsets are 64-bit.
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _row_block(N, blocks_per_row, BLOCK_N: tl.constexpr):
    """The row, columns and column mask of this program's block: the grid is rows x blocks_per_row (_grid)."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // blocks_per_row
    cols = (pid % blocks_per_row) * BLOCK_N + tl.arange(0, BLOCK_N)
    return row, cols, cols < N


@triton.jit
def _act_fwd_kernel(X, Y, stride_x, stride_y, N, blocks_per_row, a, b, c,
                    ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = _act_fwd(x, a, b, c, ACT)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)  # Y may be X (in place)


@triton.jit
def _act_bwd_kernel(DY, X, DX, stride_dy, stride_x, N, blocks_per_row, a, b, c,
                    ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    dx = _act_bwd(dy, x, a, b, c, ACT)
    tl.store(DX + row * N + cols, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _gated_fwd_kernel(G, U, Y, stride_g, stride_u, H, blocks_per_row,
                      ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(H, blocks_per_row, BLOCK_N)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    f, _ = _gate_both(g, ACT)
    tl.store(Y + row * H + cols, (f * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(DY, G, U, DG, DU, stride_dy, stride_g, stride_u, stride_dg, stride_du, H, blocks_per_row,
                      ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(H, blocks_per_row, BLOCK_N)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    f, df = _gate_both(g, ACT)
    tl.store(DG + row * stride_dg + cols, (dy * u * df).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * stride_du + cols, (dy * f).to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _dyt_fwd_kernel(X, ALPHA, W, B, Y, stride_x, N, blocks_per_row, BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    alpha = tl.load(ALPHA).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (w * _tanh(alpha * x) + b).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _dyt_bwd_kernel(DY, X, ALPHA, W, DX, DA_PART, DW_PART, DB_PART, stride_dy, stride_x, M, N, rows_per_program,
                    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (P, column blocks): program (p, j) walks rows [p * rows_per_program, ...) of column block j, keeping
    # its dw/db/dalpha partial sums in registers; the launcher adds the P partials.
    p = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    alpha = tl.load(ALPHA).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    da = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = p.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        t = _tanh(alpha * x)
        g = dy * w * (1.0 - t * t)
        tl.store(DX + r * N + cols, (alpha * g).to(DX.dtype.element_ty), mask=mask)
        da += g * x
        if NEED_DW:
            dw += dy * t
        if NEED_DB:
            db += dy
    part = p.to(tl.int64) * N
    tl.store(DA_PART + p.to(tl.int64) * tl.num_programs(1) + j, tl.sum(da, axis=0))
    if NEED_DW:
        tl.store(DW_PART + part + cols, dw, mask=mask)
    if NEED_DB:
        tl.store(DB_PART + part + cols, db, mask=mask)


@triton.jit
def _swish_beta_fwd_kernel(X, BETA, Y, stride_x, N, blocks_per_row, BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    beta = tl.load(BETA).to(tl.float32)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, (x * _sigmoid(beta * x)).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swish_beta_bwd_kernel(DY, X, BETA, DX, DB_PART, stride_dy, stride_x, M, N, rows_per_program,
                           BLOCK_N: tl.constexpr):
    # grid (P, column blocks), as _dyt_bwd_kernel: each program keeps its dbeta partial sum in registers
    p = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    beta = tl.load(BETA).to(tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = p.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        s = _sigmoid(beta * x)
        tl.store(DX + r * N + cols, (dy * s * (1.0 + beta * x * (1.0 - s))).to(DX.dtype.element_ty), mask=mask)
        db += dy * x * x * s * (1.0 - s)
    tl.store(DB_PART + p.to(tl.int64) * tl.num_programs(1) + j, tl.sum(db, axis=0))


@triton.jit
def _prelu_fwd_kernel(X, W, Y, stride_x, N, C, blocks_per_row,
                      PER_ROW: tl.constexpr,  # channel = row % C (channels before contiguous inner dims), else column
                      BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        w = tl.load(W + row % C).to(tl.float32)
    else:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * N + cols, tl.where(x > 0, x, w * x).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _prelu_bwd_kernel(DY, X, W, DX, PART, stride_dy, stride_x, M, N, C, rows_per_program,
                      PER_ROW: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_N: tl.constexpr):
    # grid (P, column blocks) as in DyT. PER_ROW: each row's sum goes to PART[row, j] (the launcher folds rows
    # onto channels); else the column partials go to PART[p, cols].
    p = tl.program_id(0)
    j = tl.program_id(1)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    if not PER_ROW:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = p.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r in range(row_start, row_end):
        dy = tl.load(DY + r * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + r * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if PER_ROW:
            w = tl.load(W + r % C).to(tl.float32)
        pos = x > 0
        tl.store(DX + r * N + cols, tl.where(pos, dy, w * dy).to(DX.dtype.element_ty), mask=mask)
        if NEED_DW:
            contrib = tl.where(pos, 0.0, x * dy)
            if PER_ROW:
                tl.store(PART + r * tl.num_programs(1) + j, tl.sum(contrib, axis=0))
            else:
                acc += contrib
    if NEED_DW and not PER_ROW:
        tl.store(PART + p.to(tl.int64) * N + cols, acc, mask=mask)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _bn_z(X, R, S, T, row, cols, mask, stride_x, stride_r, C, PER_ROW: tl.constexpr, HAS_RES: tl.constexpr):
    """x, scale and z = x scale[c] + shift[c] (+ residual) of one row block; c = row % C (PER_ROW) or the column."""
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:
        s = tl.load(S + row % C)
        t = tl.load(T + row % C)
    else:
        s = tl.load(S + cols, mask=mask, other=0.0)
        t = tl.load(T + cols, mask=mask, other=0.0)
    z = x * s + t
    if HAS_RES:
        z += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    return x, s, z


@triton.jit
def _bn_act_fwd_kernel(X, R, S, T, Y, stride_x, stride_r, N, C, blocks_per_row, a, b, c,
                       PER_ROW: tl.constexpr,  # channel = row % C, else the column
                       HAS_RES: tl.constexpr, ACT: tl.constexpr,  # ACT -1: identity, else ACT_IDS
                       BLOCK_N: tl.constexpr):
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    x, s, z = _bn_z(X, R, S, T, row, cols, mask, stride_x, stride_r, C, PER_ROW, HAS_RES)
    if ACT >= 0:
        z = _act_fwd(z, a, b, c, ACT)
    tl.store(Y + row * N + cols, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_kernel(DY, X, R, S, T, DX, DZ, stride_dy, stride_x, stride_r, N, C, blocks_per_row, a, b, c,
                       PER_ROW: tl.constexpr, HAS_RES: tl.constexpr, STORE_DZ: tl.constexpr, ACT: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    # dz = dy f'(z) (z recomputed), dx = dz scale[c]; dz stored when the residual or the affine sums need it
    row, cols, mask = _row_block(N, blocks_per_row, BLOCK_N)
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    x, s, z = _bn_z(X, R, S, T, row, cols, mask, stride_x, stride_r, C, PER_ROW, HAS_RES)
    if ACT >= 0:
        dz = _act_bwd(dy, z, a, b, c, ACT)
    else:
        dz = dy
    tl.store(DX + row * N + cols, (dz * s).to(DX.dtype.element_ty), mask=mask)
    if STORE_DZ:
        tl.store(DZ + row * N + cols, dz, mask=mask)


def batch_norm_act_fwd(x, scale, shift, residual, per_row, act, a, b, c):
    """y = f(x scale[c] + shift[c] (+ residual)), c = row % C (per_row) or the column.  x (M, N), scale / shift
    (C,) float32 -> y (M, N).  Moves 2MN elements (3MN with a residual) + 2C."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M * N:
        grid, bpr = _grid(M, N)
        _bn_act_fwd_kernel[grid](x, residual, scale, shift, y, x.stride(0),
                                 residual.stride(0) if residual is not None else 0, N, scale.numel(), bpr, a, b, c,
                                 PER_ROW=per_row, HAS_RES=residual is not None, ACT=act, BLOCK_N=BLOCK, num_warps=4)
    return y


def batch_norm_act_bwd(dy, x, scale, shift, residual, per_row, act, a, b, c, need_affine):
    """dx = dz scale[c] with dz = dy f'(z); the residual's gradient dz; dscale[c] = sum dz x, dshift[c] = sum dz
    (float32, empty unless need_affine: reduced by torch from the stored dz).  Moves 3MN (+ MN for dz)."""
    M, N = x.shape
    C = scale.numel()
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    store_dz = residual is not None or need_affine
    dz = torch.empty((M, N) if store_dz else (0,), device=x.device, dtype=torch.float32)
    if M * N:
        grid, bpr = _grid(M, N)
        _bn_act_bwd_kernel[grid](dy, x, residual, scale, shift, dx, dz, dy.stride(0), x.stride(0),
                                 residual.stride(0) if residual is not None else 0, N, C, bpr, a, b, c,
                                 PER_ROW=per_row, HAS_RES=residual is not None, STORE_DZ=store_dz, ACT=act,
                                 BLOCK_N=BLOCK, num_warps=4)
    empty = scale.new_empty((0,))
    dscale = dshift = empty
    if need_affine:
        if per_row:
            dscale = (dz * x.float()).view(-1, C, N).sum((0, 2))
            dshift = dz.view(-1, C, N).sum((0, 2))
        else:
            dscale = (dz * x.float()).sum(0)
            dshift = dz.sum(0)
    dres = dz.to(x.dtype) if residual is not None else x.new_empty((0,))
    return dx, dres, dscale, dshift


def _grid(M, N):
    bpr = triton.cdiv(N, BLOCK)
    return (M * bpr,), bpr


def act_fwd(x, a, b, c, act):
    """y = f(x; a, b, c).  x (M, N), unit column stride -> y (M, N).  Moves 2MN elements."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M * N:
        grid, bpr = _grid(M, N)
        _act_fwd_kernel[grid](x, y, x.stride(0), N, N, bpr, a, b, c, ACT=ACT_IDS[act], BLOCK_N=BLOCK, num_warps=4)
    return y


def act_fwd_(x, a, b, c, act):
    """x = f(x; a, b, c) in place.  x (M, N), unit column stride.  Moves 2MN elements."""
    M, N = x.shape
    if M * N:
        grid, bpr = _grid(M, N)
        _act_fwd_kernel[grid](x, x, x.stride(0), x.stride(0), N, bpr, a, b, c, ACT=ACT_IDS[act], BLOCK_N=BLOCK,
                              num_warps=4)


def act_bwd(dy, x, a, b, c, act):
    """dx = dy * f'(x; a, b, c).  dy, x (M, N) -> dx (M, N).  Moves 3MN elements."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M * N:
        grid, bpr = _grid(M, N)
        _act_bwd_kernel[grid](dy, x, dx, dy.stride(0), x.stride(0), N, bpr, a, b, c, ACT=ACT_IDS[act],
                              BLOCK_N=BLOCK, num_warps=4)
    return dx


def _gate_views(x, up, layout):
    """(gate, up) as (M, H) views: layout 0 separate tensors, 1 x = [gate | up], 2 x = [up | gate]."""
    if layout == 0:
        return x, up
    h = x.shape[1] // 2
    first, second = x[:, :h], x[:, h:]
    return (first, second) if layout == 1 else (second, first)


def gated_fwd(x, up, layout, gate):
    """y = f(gate) * up.  gate, up (M, H) (or x (M, 2H) holding both) -> y (M, H).  Moves 3MH elements."""
    g, u = _gate_views(x, up, layout)
    M, H = g.shape
    y = torch.empty((M, H), device=x.device, dtype=x.dtype)
    if M * H:
        grid, bpr = _grid(M, H)
        _gated_fwd_kernel[grid](g, u, y, g.stride(0), u.stride(0), H, bpr, ACT=GATE_IDS[gate], BLOCK_N=BLOCK,
                                num_warps=4)
    return y


def gated_bwd(dy, x, up, layout, gate):
    """dgate = dy * up * f'(gate), dup = dy * f(gate) in one pass.  dy (M, H) -> (dgate, dup) (M, H) each, or
    for the fused layouts (dx (M, 2H), empty).  Moves 5MH elements."""
    g, u = _gate_views(x, up, layout)
    M, H = g.shape
    dx = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dup = torch.empty((M, H), device=x.device, dtype=x.dtype) if layout == 0 else x.new_empty((0,))
    dg, du = (dx, dup) if layout == 0 else _gate_views(dx, None, layout)
    if M * H:
        grid, bpr = _grid(M, H)
        _gated_bwd_kernel[grid](dy, g, u, dg, du, dy.stride(0), g.stride(0), u.stride(0), dg.stride(0),
                                du.stride(0), H, bpr, ACT=GATE_IDS[gate], BLOCK_N=BLOCK, num_warps=4)
    return dx, dup


def swish_beta_fwd(x, beta):
    """y = x * sigmoid(beta * x).  x (M, N), beta (1,) -> y (M, N).  Moves 2MN."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M * N:
        grid, bpr = _grid(M, N)
        _swish_beta_fwd_kernel[grid](x, beta, y, x.stride(0), N, bpr, BLOCK_N=BLOCK, num_warps=4)
    return y


def swish_beta_bwd(dy, x, beta, need_dbeta):
    """dx = dy s (1 + beta x (1 - s)), dbeta = sum dy x^2 s (1 - s) (s = sigmoid(beta x)).
    dy, x (M, N) -> dx (M, N), dbeta (1,) (empty if not needed).  Moves 3MN."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    P = num_programs(x.device, M)
    nb = triton.cdiv(N, BLOCK)
    db_part = torch.zeros((P, nb), device=x.device, dtype=torch.float32)
    if M * N:
        _swish_beta_bwd_kernel[(P, nb)](dy, x, beta, dx, db_part, dy.stride(0), x.stride(0), M, N,
                                        triton.cdiv(M, P), BLOCK_N=BLOCK, num_warps=4)
    return dx, (db_part.sum().reshape(1).to(x.dtype) if need_dbeta else x.new_empty((0,)))


def dyt_fwd(x, alpha, weight, bias):
    """y = w * tanh(alpha * x) + b.  x (M, N), alpha (1,), weight/bias (N,) -> y (M, N).  Moves 2MN + 2N."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M * N:
        grid, bpr = _grid(M, N)
        _dyt_fwd_kernel[grid](x, alpha, weight, bias, y, x.stride(0), N, bpr, BLOCK_N=BLOCK, num_warps=4)
    return y


def dyt_bwd(dy, x, alpha, weight, need_dalpha, need_dw, need_db):
    """dx = alpha g, dalpha = sum g x, dw = sum_rows dy t, db = sum_rows dy (g = dy w (1 - t^2)).
    dy, x (M, N) -> dx (M, N), dalpha (1,), dw (N,), db (N,) (empty if not needed).  Moves 3MN + P(2N + 1)."""
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    P = num_programs(x.device, M)
    nb = triton.cdiv(N, BLOCK)
    f32 = dict(device=x.device, dtype=torch.float32)
    da_part = torch.zeros((P, nb), **f32)
    dw_part = torch.zeros((P, N), **f32) if need_dw else None
    db_part = torch.zeros((P, N), **f32) if need_db else None
    if M * N:
        _dyt_bwd_kernel[(P, nb)](dy, x, alpha, weight, dx, da_part, dw_part, db_part, dy.stride(0), x.stride(0),
                                 M, N, triton.cdiv(M, P), NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=BLOCK,
                                 num_warps=4)
    empty = x.new_empty((0,))
    da = da_part.sum().reshape(1).to(x.dtype) if need_dalpha else empty
    dw = dw_part.sum(0).to(x.dtype) if need_dw else empty
    db = db_part.sum(0).to(x.dtype) if need_db else empty
    return dx, da, dw, db


def prelu_fwd(x, weight, per_row):
    """y = x > 0 ? x : w[c] x, c = row % C (per_row) or the column.  x (M, N), weight (C,) -> y (M, N).
    Moves 2MN elements + C."""
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M * N:
        grid, bpr = _grid(M, N)
        _prelu_fwd_kernel[grid](x, weight, y, x.stride(0), N, weight.numel(), bpr, PER_ROW=per_row,
                                BLOCK_N=BLOCK, num_warps=4)
    return y


def prelu_bwd(dy, x, weight, per_row, need_dw):
    """dx = x > 0 ? dy : w dy; dw[c] = sum over channel c of (x > 0 ? 0 : x dy).  dy, x (M, N) -> dx (M, N),
    dw (C,) (empty if not needed).  Moves 3MN elements + partials."""
    M, N = x.shape
    C = weight.numel()
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    nb = triton.cdiv(N, BLOCK)
    P = M if per_row else num_programs(x.device, M)
    part = torch.zeros((M, nb) if per_row else (P, N), device=x.device, dtype=torch.float32) if need_dw else None
    if M * N:
        _prelu_bwd_kernel[(P, nb)](dy, x, weight, dx, part, dy.stride(0), x.stride(0), M, N, C, triton.cdiv(M, P),
                                   PER_ROW=per_row, NEED_DW=need_dw, BLOCK_N=BLOCK, num_warps=4)
    if not need_dw:
        return dx, x.new_empty((0,))
    dw = part.sum(1).view(-1, C).sum(0) if per_row else part.sum(0)
    return dx, dw.to(x.dtype)


# The per-op launchers the tritium::<name>_* ops call (one set per table row, generated).
for _name in ACT_IDS:
    globals()[f"{_name}_fwd"] = functools.partial(act_fwd, act=_name)
    globals()[f"{_name}_fwd_"] = functools.partial(act_fwd_, act=_name)
    globals()[f"{_name}_bwd"] = functools.partial(act_bwd, act=_name)
for _name in GATE_IDS:
    globals()[f"{_name}_fwd"] = functools.partial(gated_fwd, gate=_name)
    globals()[f"{_name}_bwd"] = functools.partial(gated_bwd, gate=_name)
del _name
