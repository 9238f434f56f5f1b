"""RMSNorm and LayerNorm (one forward and one backward kernel, specialised by constexpr flags), and GroupNorm.

Forward  (per row of N):  h = x (+ residual);  mean = CENTERED ? sum(h)/N : 0;
                          rstd = 1/sqrt(sum((h-mean)^2)/N + eps);  y = (h-mean)*rstd (*w) (+b)
Backward (per row):       xhat = (x-mean)*rstd; g = dy*w; dx = rstd*(g - [CENTERED] mean(g) - xhat*mean(g*xhat))
                          (+ grad_residual);  dw = sum_rows dy*xhat;  db = sum_rows dy
Traffic: forward reads MN (+MN residual) + N, writes MN (+MN h) + M stats; backward reads 2MN (+MN) + N,
writes MN + P*N partials (P programs).

GroupNorm (+ SiLU), per (sample, group) block of D channels x S positions: mean and rstd over the block;
z = (x-mean)*rstd*w[c] + b[c], y = z or silu(z). Backward: dz = dy (* silu'(z)), g = dz*w[c], dx as above over the
block; dw[c] = sum dz*xhat, db[c] = sum dz over samples and positions. Traffic: forward reads and writes the input's
size; backward reads 2x, writes 1x, plus (N, C) float32 partials.
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


@triton.jit
def _group_norm_fwd_kernel(
    X, Y, W, B, MEAN, RSTD,
    stride_x, G, D, S, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    SILU: tl.constexpr,  # GroupNorm + SiLU (the U-Net block): y = silu(z) in the same pass
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # one program per (sample, group) block of D channels x S positions; tiles of BLOCK_D channels x BLOCK_S
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * D * S
    ch0 = (row % G) * D
    ds = tl.arange(0, BLOCK_D)[:, None]
    ss = tl.arange(0, BLOCK_S)[None, :]
    # pass 1: the mean; pass 2: the variance about it (no cancellation); pass 3: normalise. Later passes read
    # the block from L2.
    acc = tl.zeros([BLOCK_D, BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + ds
        for s0 in range(0, S, BLOCK_S):
            s = s0 + ss
            mask = (d < D) & (s < S)
            acc += tl.load(X + d.to(tl.int64) * S + s, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / (D * S)
    acc = tl.zeros([BLOCK_D, BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + ds
        for s0 in range(0, S, BLOCK_S):
            s = s0 + ss
            mask = (d < D) & (s < S)
            x = tl.load(X + d.to(tl.int64) * S + s, mask=mask, other=0.0).to(tl.float32)
            xc = tl.where(mask, x - mean, 0.0)
            acc += xc * xc
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / (D * S) + eps)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + ds
        dmask = d < D
        scale = rstd * tl.load(W + ch0 + d, mask=dmask, other=0.0).to(tl.float32) if HAS_W else rstd
        shift = tl.load(B + ch0 + d, mask=dmask, other=0.0).to(tl.float32) if HAS_B else 0.0
        for s0 in range(0, S, BLOCK_S):
            s = s0 + ss
            mask = dmask & (s < S)
            off = d.to(tl.int64) * S + s
            z = (tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean) * scale + shift
            if SILU:
                z = z / (1.0 + tl.exp(-z))
            tl.store(Y + off, z.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _group_norm_bwd_kernel(
    DY, X, W, B, MEAN, RSTD, DX, DW_PART, DB_PART,
    stride_dy, stride_x, G, D, S,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
    NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # one program per (sample, group) block. Pass 1: per-channel sums of dz and dz * (x - mean), which give the
    # block's sum(g) and sum(g * xhat) and are also this sample's terms of dw and db (written to its row of the
    # (N, C) partial buffers); pass 2: dx. With SILU, dz = dy * silu'(z) is recomputed in pass 2.
    row = tl.program_id(0).to(tl.int64)
    DY += row * stride_dy
    X += row * stride_x
    DX += row * D * S
    g = row % G
    ch0 = g * D
    part = (row // G) * G * D + ch0
    mean = tl.load(MEAN + row)
    rstd = tl.load(RSTD + row)
    ds = tl.arange(0, BLOCK_D)[:, None]
    ss = tl.arange(0, BLOCK_S)[None, :]
    s_g = tl.zeros([BLOCK_D], dtype=tl.float32)
    s_gx = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + ds
        dmask = d < D
        w = tl.load(W + ch0 + d, mask=dmask, other=0.0).to(tl.float32) if HAS_W else 1.0
        shift = tl.load(B + ch0 + d, mask=dmask, other=0.0).to(tl.float32) if HAS_B else 0.0
        a = tl.zeros([BLOCK_D], dtype=tl.float32)
        b = tl.zeros([BLOCK_D], dtype=tl.float32)
        for s0 in range(0, S, BLOCK_S):
            s = s0 + ss
            mask = dmask & (s < S)
            off = d.to(tl.int64) * S + s
            xc = tl.where(mask, tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean, 0.0)
            dz = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                z = xc * rstd * w + shift
                sg = 1.0 / (1.0 + tl.exp(-z))
                dz = dz * sg * (1.0 + z * (1.0 - sg))
            a += tl.sum(dz, axis=1)
            b += tl.sum(dz * xc, axis=1)
        w1 = tl.sum(w, axis=1) if HAS_W else 1.0  # (BLOCK_D, 1) -> (BLOCK_D,)
        s_g += w1 * a
        s_gx += w1 * b
        dmask1 = d0 + tl.arange(0, BLOCK_D) < D
        if NEED_DW:
            tl.store(DW_PART + part + d0 + tl.arange(0, BLOCK_D), b * rstd, mask=dmask1)
        if NEED_DB:
            tl.store(DB_PART + part + d0 + tl.arange(0, BLOCK_D), a, mask=dmask1)
    c1 = tl.sum(s_g, axis=0) / (D * S)
    c2 = tl.sum(s_gx, axis=0) * rstd / (D * S)
    q = -rstd * rstd * c2
    o = -rstd * c1
    for d0 in range(0, D, BLOCK_D):
        d = d0 + ds
        dmask = d < D
        w = tl.load(W + ch0 + d, mask=dmask, other=0.0).to(tl.float32) if HAS_W else 1.0
        shift = tl.load(B + ch0 + d, mask=dmask, other=0.0).to(tl.float32) if HAS_B else 0.0
        for s0 in range(0, S, BLOCK_S):
            s = s0 + ss
            mask = dmask & (s < S)
            off = d.to(tl.int64) * S + s
            xc = tl.load(X + off, mask=mask, other=0.0).to(tl.float32) - mean
            dz = tl.load(DY + off, mask=mask, other=0.0).to(tl.float32)
            if SILU:
                z = xc * rstd * w + shift
                sg = 1.0 / (1.0 + tl.exp(-z))
                dz = dz * sg * (1.0 + z * (1.0 - sg))
            dx = dz * (rstd * w) + (xc * q + o)
            # one element: y = b whatever x, so dx = 0 exactly (as the layer norm's one-element rows)
            dx = tl.where(D * S == 1, 0.0, dx)
            tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=mask)


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


# group_norm tiles: BLOCK_D channels x BLOCK_S positions, at most GN_TILE elements (the whole (D, S) block when
# it is smaller)
GN_TILE = 2048


def _gn_blocks(d: int, s: int) -> tuple[int, int]:
    block_s = min(triton.next_power_of_2(max(s, 1)), GN_TILE)
    block_d = min(triton.next_power_of_2(max(d, 1)), GN_TILE // block_s)
    return block_d, block_s


def group_norm_fwd(x, weight, bias, num_groups, eps, silu):
    """Per (sample, group) block: z = (x - mean) * rstd * w[c] + b[c], y = z or silu(z).  x (N * G, D, S) with
    contiguous (D, S) blocks, weight / bias (G * D,) or None -> y (N * G, D, S), mean (N * G,), rstd (N * G,)
    float32.  Moves 2 N G D S elements + 2 G D + 8 N G bytes."""
    R, D, S = x.shape
    y = torch.empty((R, D, S), device=x.device, dtype=x.dtype)
    mean = torch.empty((R,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((R,), device=x.device, dtype=torch.float32)
    block_d, block_s = _gn_blocks(D, S)
    if R > 0:
        _group_norm_fwd_kernel[(R,)](
            x, y, weight, bias, mean, rstd, x.stride(0), num_groups, D, S, eps,
            HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
            BLOCK_D=block_d, BLOCK_S=block_s, num_warps=row_warps(block_d * block_s),
        )
    return y, mean, rstd


def group_norm_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu, need_dw, need_db):
    """dz = dy (* silu'(z)); dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) per block, g = dz * w[c];
    dw = sum_{n,s} dz * xhat; db = sum_{n,s} dz.  dy, x (N * G, D, S) -> dx (N * G, D, S), dw, db (G * D,)
    (empty if not needed).  Moves 3 N G D S elements + 2 N G D float32 partials."""
    R, D, S = x.shape
    N, C = R // num_groups, num_groups * D
    need_dw = need_dw and weight is not None
    dx = torch.empty((R, D, S), device=x.device, dtype=x.dtype)
    dw_part = torch.empty((N, C), device=x.device, dtype=torch.float32) if need_dw else None
    db_part = torch.empty((N, C), device=x.device, dtype=torch.float32) if need_db else None
    block_d, block_s = _gn_blocks(D, S)
    if R > 0:
        _group_norm_bwd_kernel[(R,)](
            dy, x, weight, bias, mean, rstd, dx, dw_part, db_part, dy.stride(0), x.stride(0), num_groups, D, S,
            HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu, NEED_DW=need_dw, NEED_DB=need_db,
            BLOCK_D=block_d, BLOCK_S=block_s, num_warps=row_warps(block_d * block_s),
        )
    empty = x.new_empty((0,))
    dw = dw_part.sum(0).to(x.dtype) if need_dw else empty
    db = db_part.sum(0).to(x.dtype) if need_db else empty
    return dx, dw, db
