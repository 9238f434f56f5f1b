"""Softmax / log-softmax (and softmin, temperature) over dim 1 of a (outer, N, inner) tensor: one forward and one
backward kernel, specialised by constexpr flags.

Forward  (per row of N, z = scale * x):  y = exp(z - max z) / sum exp(z - max z)   or   (z - max z) - log(sum ...)
Backward (per row):  softmax: dx = scale * y * (dy - sum(dy * y));  log: dx = scale * (dy - exp(y) * sum(dy))
A program owns one row (o, i): element j sits at o * stride_o + j * INNER + i (INNER = 1 for the last dim).
Rows that do not fit one block are processed in a loop with an online max/sum (one read for the statistics,
one for the output). Traffic: forward reads MN, writes MN; backward reads 2MN, writes MN.
"""
import torch
import triton
import triton.language as tl

from ._utils import row_block, row_warps


@triton.jit
def _softmax_fwd_kernel(
    X, Y, stride_xo, N, INNER, scale,
    LOG: tl.constexpr,           # log_softmax instead of softmax
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row fits one block: keep it in registers instead of re-reading it
):
    row = tl.program_id(0).to(tl.int64)
    o = row // INNER
    i = row % INNER
    X += o * stride_xo + i
    Y += o * N * INNER + i
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = cols < N
        z = tl.where(mask, tl.load(X + cols * INNER, mask=mask, other=0.0).to(tl.float32) * scale, float("-inf"))
        m = tl.max(z, axis=0)
        e = tl.exp(z - m)  # an all -inf row gives NaN, as torch's does
        s = tl.sum(e, axis=0)
        if LOG:
            y = (z - m) - tl.log(s)
        else:
            y = e / s
        tl.store(Y + cols * INNER, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: per-lane online max and sum; a lane that has seen only -inf keeps sum 0 (not NaN), so rows that
        # start with a masked (-inf) stretch are exact
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            z = tl.where(mask, tl.load(X + c * INNER, mask=mask, other=0.0).to(tl.float32) * scale, float("-inf"))
            m_new = tl.maximum(m, z)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
            m = m_new
        m_row = tl.max(m, axis=0)
        s_row = tl.sum(s * tl.exp(m - m_row), axis=0)  # NaN for an all -inf row, as torch
        log_s = tl.log(s_row)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            z = tl.load(X + c * INNER, mask=mask, other=0.0).to(tl.float32) * scale
            if LOG:
                y = (z - m_row) - log_s
            else:
                y = tl.exp(z - m_row) / s_row
            tl.store(Y + c * INNER, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    DY, Y, DX, stride_dyo, stride_yo, N, INNER, scale,
    LOG: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row fits one block: dy and y stay in registers between the two passes
):
    row = tl.program_id(0).to(tl.int64)
    o = row // INNER
    i = row % INNER
    DY += o * stride_dyo + i
    Y += o * stride_yo + i
    DX += o * N * INNER + i
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = cols < N
        dy = tl.load(DY + cols * INNER, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + cols * INNER, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            c = tl.sum(dy, axis=0)
            dx = (dy - tl.exp(y) * c) * scale
        else:
            c = tl.sum(dy * y, axis=0)
            dx = y * (dy - c) * scale
        tl.store(DX + cols * INNER, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            cc = off + cols
            mask = cc < N
            dy = tl.load(DY + cc * INNER, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                acc += dy * tl.load(Y + cc * INNER, mask=mask, other=0.0).to(tl.float32)
        c = tl.sum(acc, axis=0)
        for off in range(0, N, BLOCK_N):
            cc = off + cols
            mask = cc < N
            dy = tl.load(DY + cc * INNER, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + cc * INNER, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = (dy - tl.exp(y) * c) * scale
            else:
                dx = y * (dy - c) * scale
            tl.store(DX + cc * INNER, dx.to(DX.dtype.element_ty), mask=mask)


def softmax_fwd(x, scale, log):
    """y = (log_)softmax(scale * x) over dim 1.  x (outer, N, inner) with unit stride along N when inner == 1,
    else contiguous (N, inner) blocks -> y (outer, N, inner) contiguous.  Reads MN, writes MN elements (rows wider
    than one block read MN twice, the second time mostly from L2)."""
    outer, N, inner = x.shape
    y = torch.empty((outer, N, inner), device=x.device, dtype=x.dtype)
    block, single = row_block(N, x.element_size())
    if y.numel() > 0:
        _softmax_fwd_kernel[(outer * inner,)](
            x, y, x.stride(0), N, inner, float(scale),
            LOG=bool(log), BLOCK_N=block, SINGLE_BLOCK=single, num_warps=row_warps(block),
        )
    return y


def softmax_bwd(dy, y, scale, log):
    """softmax: dx = scale * y * (dy - sum(dy * y)); log: dx = scale * (dy - exp(y) * sum(dy)).  dy, y (outer, N,
    inner) in the layout of softmax_fwd's input -> dx (outer, N, inner) contiguous.  Reads 2MN, writes MN."""
    outer, N, inner = y.shape
    dx = torch.empty((outer, N, inner), device=y.device, dtype=y.dtype)
    block, single = row_block(N, y.element_size())
    if dx.numel() > 0:
        _softmax_bwd_kernel[(outer * inner,)](
            dy, y, dx, dy.stride(0), y.stride(0), N, inner, float(scale),
            LOG=bool(log), BLOCK_N=block, SINGLE_BLOCK=single, num_warps=row_warps(block),
        )
    return dx
