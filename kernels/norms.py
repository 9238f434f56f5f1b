"""RMSNorm and LayerNorm: one forward and one backward kernel, specialised by constexpr flags.

Forward  (per row of N):  h = x (+ residual);  mean = CENTERED ? sum(h)/N : 0;
                          rstd = 1/sqrt(sum((h-mean)^2)/N + eps);  y = (h-mean)*rstd (*w) (+b)
Backward (per row):       xhat = (x-mean)*rstd; g = dy*w; dx = rstd*(g - [CENTERED] mean(g) - xhat*mean(g*xhat))
                          (+ grad_residual);  dw = sum_rows dy*xhat;  db = sum_rows dy
Traffic: forward reads MN (+MN residual) + N, writes MN (+MN h) + M stats; backward reads 2MN (+MN) + N,
writes MN + P*N partials (P programs).
"""
import torch
import triton
import triton.language as tl

from ._utils import num_programs, row_block, row_warps


@triton.jit
def _norm_fwd_kernel(
    X, R, Y, H, W, B, MEAN, RSTD,
    stride_x, stride_r, N, eps,
    CENTERED: tl.constexpr,      # LayerNorm subtracts the mean; RMSNorm does not
    HAS_RESIDUAL: tl.constexpr,  # fused_add_rms_norm: normalise h = x + residual and also write h
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row fits one block: keep it in registers instead of re-reading it
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * N
    if HAS_RESIDUAL:
        R += row * stride_r
        H += row * N
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = cols < N
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h = x + tl.load(R + cols, mask=mask, other=0.0).to(tl.float32)
            h = h.to(H.dtype.element_ty)
            tl.store(H + cols, h, mask=mask)
            x = h.to(tl.float32)
        if CENTERED:
            mean = tl.sum(x, axis=0) / N
            xc = tl.where(mask, x - mean, 0.0)
        else:
            mean = 0.0
            xc = x
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd
        if HAS_W:
            y = y * tl.load(W + cols, mask=mask).to(tl.float32)
        if HAS_B:
            y = y + tl.load(B + cols, mask=mask).to(tl.float32)
        tl.store(Y + cols, y.to(Y.dtype.element_ty), mask=mask)
    else:
        # pass 1: (h and) the mean; pass 2: the variance about it; pass 3: normalise. Later passes read
        # from L2 (or h, just written by this program).
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            x = tl.load(X + c, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h = (x + tl.load(R + c, mask=mask, other=0.0).to(tl.float32)).to(H.dtype.element_ty)
                tl.store(H + c, h, mask=mask)
                x = h.to(tl.float32)
            acc += x
        if CENTERED:
            mean = tl.sum(acc, axis=0) / N
        else:
            mean = 0.0
        if HAS_RESIDUAL:
            X = H  # normalise h, which this program wrote
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            x = tl.load(X + c, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for off in range(0, N, BLOCK_N):
            c = off + cols
            mask = c < N
            y = (tl.load(X + c, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
            if HAS_W:
                y = y * tl.load(W + c, mask=mask).to(tl.float32)
            if HAS_B:
                y = y + tl.load(B + c, mask=mask).to(tl.float32)
            tl.store(Y + c, y.to(Y.dtype.element_ty), mask=mask)
    if CENTERED:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, GR, DX, DW_PART, DB_PART,
    stride_dy, stride_x, stride_gr, M, N, rows_per_program,
    CENTERED: tl.constexpr,
    HAS_GRAD_RESIDUAL: tl.constexpr,  # fused_add_rms_norm: the gradient reaching h directly is added to dx
    HAS_W: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # dW/dB partials stay in registers across this program's rows
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(row_start + rows_per_program, M) - row_start
    cols = tl.arange(0, BLOCK_N)
    part = pid.to(tl.int64) * N
    if SINGLE_BLOCK:
        mask = cols < N
        if HAS_W:
            w = tl.load(W + cols, mask=mask).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(0, n_rows):
            r64 = row_start + i
            dy = tl.load(DY + r64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + r64 * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + r64)
            if CENTERED:
                mean = tl.load(MEAN + r64)
            else:
                mean = 0.0
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w if HAS_W else dy
            c2 = tl.sum(g * xhat, axis=0) / N
            if CENTERED:
                c1 = tl.sum(g, axis=0) / N
            else:
                c1 = 0.0
            dx = (g - c1 - xhat * c2) * rstd
            if CENTERED:
                # one element: y = b whatever x, so dx = 0 exactly; the formula would keep dy * w's rounding
                # error (times rstd = 1/sqrt(eps)) wherever the compiler fuses g's product into g - c1
                dx = tl.where(N == 1, 0.0, dx)
            if HAS_GRAD_RESIDUAL:
                dx += tl.load(GR + r64 * stride_gr + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + r64 * N + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if NEED_DW:
                dw += dy * xhat
            if NEED_DB:
                db += dy
        if NEED_DW:
            tl.store(DW_PART + part + cols, dw, mask=mask)
        if NEED_DB:
            tl.store(DB_PART + part + cols, db, mask=mask)
    else:
        for i in range(0, n_rows):
            r64 = row_start + i
            rstd = tl.load(RSTD + r64)
            if CENTERED:
                mean = tl.load(MEAN + r64)
            else:
                mean = 0.0
            s_g = tl.zeros([BLOCK_N], dtype=tl.float32)
            s_gx = tl.zeros([BLOCK_N], dtype=tl.float32)
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                dy = tl.load(DY + r64 * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + r64 * stride_x + c, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.where(mask, (x - mean) * rstd, 0.0)
                g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32) if HAS_W else dy
                s_g += g
                s_gx += g * xhat
                # dW/dB partials live in this program's own row of the partial buffers
                if NEED_DW:
                    prev = tl.load(DW_PART + part + c, mask=mask, other=0.0)
                    tl.store(DW_PART + part + c, prev + dy * xhat, mask=mask)
                if NEED_DB:
                    prev = tl.load(DB_PART + part + c, mask=mask, other=0.0)
                    tl.store(DB_PART + part + c, prev + dy, mask=mask)
            c2 = tl.sum(s_gx, axis=0) / N
            if CENTERED:
                c1 = tl.sum(s_g, axis=0) / N
            else:
                c1 = 0.0
            for off in range(0, N, BLOCK_N):
                c = off + cols
                mask = c < N
                dy = tl.load(DY + r64 * stride_dy + c, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(X + r64 * stride_x + c, mask=mask, other=0.0).to(tl.float32)
                xhat = (x - mean) * rstd
                g = dy * tl.load(W + c, mask=mask, other=0.0).to(tl.float32) if HAS_W else dy
                dx = (g - c1 - xhat * c2) * rstd
                if HAS_GRAD_RESIDUAL:
                    dx += tl.load(GR + r64 * stride_gr + c, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + r64 * N + c, dx.to(DX.dtype.element_ty), mask=mask)


def _fwd(x, residual, weight, bias, eps, centered):
    M, N = x.shape
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    h = torch.empty((M, N), device=x.device, dtype=x.dtype) if residual is not None else None
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    mean = torch.empty((M,), device=x.device, dtype=torch.float32) if centered else None
    block, single = row_block(N, x.element_size())
    if M > 0:
        _norm_fwd_kernel[(M,)](
            x, residual, y, h, weight, bias, mean, rstd,
            x.stride(0), residual.stride(0) if residual is not None else 0, N, eps,
            CENTERED=centered, HAS_RESIDUAL=residual is not None,
            HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_N=block, SINGLE_BLOCK=single, num_warps=row_warps(block),
        )
    return y, h, mean, rstd


def _bwd(dy, x, weight, mean, rstd, grad_residual, need_dw, need_db):
    M, N = x.shape
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    need_dw = need_dw and weight is not None
    block, single = row_block(N, x.element_size())
    P = num_programs(x.device, M)
    dw_part = torch.zeros((P, N), device=x.device, dtype=torch.float32) if need_dw else None
    db_part = torch.zeros((P, N), device=x.device, dtype=torch.float32) if need_db else None
    if M > 0:
        _norm_bwd_kernel[(P,)](
            dy, x, weight, mean, rstd, grad_residual, dx, dw_part, db_part,
            dy.stride(0), x.stride(0), grad_residual.stride(0) if grad_residual is not None else 0,
            M, N, triton.cdiv(M, P),
            CENTERED=mean is not None, HAS_GRAD_RESIDUAL=grad_residual is not None, HAS_W=weight is not None,
            NEED_DW=need_dw, NEED_DB=need_db, BLOCK_N=block, SINGLE_BLOCK=single, num_warps=row_warps(block),
        )
    empty = x.new_empty((0,))
    dw = dw_part.sum(0).to(x.dtype) if need_dw else empty
    db = db_part.sum(0).to(x.dtype) if need_db else empty
    return dx, dw, db


def rms_norm_fwd(x, weight, eps):
    """y = x * rsqrt(mean(x^2) + eps) * w.  x (M, N) with unit column stride, weight (N,) or None ->
    y (M, N), rstd (M,) float32.  Moves 2MN elements + N + 4M bytes."""
    y, _, _, rstd = _fwd(x, None, weight, None, eps, centered=False)
    return y, rstd


def fused_add_rms_norm_fwd(x, residual, weight, eps):
    """h = x + residual; y = rms_norm(h) * w.  x, residual (M, N) -> y (M, N), h (M, N), rstd (M,).
    Moves 4MN elements + N + 4M bytes (the unfused pair moves 6MN)."""
    y, h, _, rstd = _fwd(x, residual, weight, None, eps, centered=False)
    return y, h, rstd


def layer_norm_fwd(x, weight, bias, eps):
    """y = (x - mean) * rstd * w + b.  x (M, N), weight/bias (N,) or None -> y (M, N), mean (M,), rstd (M,)
    float32.  Moves 2MN elements + 2N + 8M bytes."""
    y, _, mean, rstd = _fwd(x, None, weight, bias, eps, centered=True)
    return y, mean, rstd


def rms_norm_bwd(dy, x, weight, rstd, grad_residual, need_dw):
    """dx = rstd * (dy*w - xhat * mean(dy*w*xhat)) (+ grad_residual), dw = sum_rows dy * xhat.
    dy, x (M, N) -> dx (M, N), dw (N,) (empty if not needed).  Moves 3MN (+MN) elements + P*N partials."""
    dx, dw, _ = _bwd(dy, x, weight, None, rstd, grad_residual, need_dw, False)
    return dx, dw


def layer_norm_bwd(dy, x, weight, mean, rstd, need_dw, need_db):
    """dx = rstd * (g - mean(g) - xhat * mean(g*xhat)), g = dy*w; dw = sum dy*xhat; db = sum dy.
    dy, x (M, N) -> dx (M, N), dw (N,), db (N,) (empty if not needed).  Moves 3MN elements + 2P*N partials."""
    return _bwd(dy, x, weight, mean, rstd, None, need_dw, need_db)
