"""The elementwise losses: one table of pointwise formulas (value and derivative together in ``_point``, selected
by the constexpr loss id, the index in tritium.ops.losses.ELEMENTWISE; csrc/losses.cpp has the same formulas),
one forward kernel that writes the weighted pointwise loss or reduces it in the same pass (one float32 partial
sum per program, summed and scaled after the launch without a sync) and, for loss_fwd_grad, also writes the input's
gradient for an upstream gradient of 1, and one backward kernel.

With d = x - y, p the per-column parameter (pos_weight, the quantile; 1 when absent), a / b the scalars:
  0 mse d^2 | 1 l1 |d| | 2 smooth_l1 (a = beta) | 3 huber (a = delta) | 4 bce | 5 bce_with_logits (p = pos_weight)
  6 soft_margin softplus(-y x) | 7 hinge_embedding (a = margin) | 8 margin_ranking (x = x1 - x2, a = margin)
  9 sigmoid_focal (a = alpha, b = gamma) | 10 quantile (p = tau)
then times the weight w (none, one per element, or one per column of the last dim, C wide).
Traffic: the forward reads 2N elements (3N with a full weight) and writes N (or N / BLOCK floats); the backward
reads 2-3N (plus N of a per-element upstream gradient) and writes N.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024
WARPS = 8  # 4 elements per thread: the per-column weight gather and the heavier losses fit without spills


@triton.jit
def _log1p_unit(e):
    """log1p(e) for e in [0, 1]: 2 atanh(s), s = e / (2 + e) in [0, 1/3], by its series to s^13 (below 2^-24 of
    the sum past it); s keeps e's relative precision, so tiny e stay exact (log(1 + e) would round them to 0).
    csrc/losses.cpp's log1p_unit."""
    s = e / (2.0 + e)
    z = s * s
    p = z * (1.0 / 13.0) + 1.0 / 11.0
    p = z * p + 1.0 / 9.0
    p = z * p + 1.0 / 7.0
    p = z * p + 1.0 / 5.0
    p = z * p + 1.0 / 3.0
    p = z * p + 1.0
    return (s + s) * p


@triton.jit
def _softplus(z):
    return tl.maximum(z, 0.0) + _log1p_unit(tl.exp(-tl.abs(z)))


@triton.jit
def _sign(d):
    return tl.where(d > 0.0, 1.0, 0.0) - tl.where(d < 0.0, 1.0, 0.0)


@triton.jit
def _point(LOSS: tl.constexpr, x, y, p, a, b):
    """(l, dl/dx) of loss LOSS at x, y (float32 blocks)."""
    if LOSS == 0:  # mse
        d = x - y
        val = d * d
        der = d + d
    elif LOSS == 1:  # l1
        d = x - y
        val = tl.abs(d)
        der = _sign(d)
    elif LOSS == 2:  # smooth_l1, a = beta (0: l1)
        d = x - y
        ad = tl.abs(d)
        val = tl.where(ad < a, 0.5 * d * d / a, ad - 0.5 * a)
        # torch's order of tests (NaN falls through to d / a); beta = 0 is l1's sign (0 at NaN)
        der = tl.where(d < -a, -1.0, tl.where(d > a, 1.0, tl.where(a == 0.0, 0.0, d / a)))
    elif LOSS == 3:  # huber, a = delta
        d = x - y
        ad = tl.abs(d)
        val = tl.where(ad < a, 0.5 * d * d, a * (ad - 0.5 * a))
        der = tl.where(d < -a, -a, tl.where(d > a, a, d))
    elif LOSS == 4:  # binary_cross_entropy (x a probability)
        val = (y - 1.0) * tl.maximum(tl.log(1.0 - x), -100.0) - y * tl.maximum(tl.log(x), -100.0)
        der = (x - y) / tl.maximum((1.0 - x) * x, 1e-12)
    elif LOSS == 5:  # binary_cross_entropy_with_logits, p = pos_weight
        lw = (p - 1.0) * y + 1.0
        val = (1.0 - y) * x + lw * _softplus(-x)
        der = lw * tl.sigmoid(x) - p * y
    elif LOSS == 6:  # soft_margin
        z = -(y * x)
        val = _softplus(z)
        der = -y * tl.sigmoid(z)
    elif LOSS == 7:  # hinge_embedding, a = margin
        m = a - x
        val = tl.where(y != 1.0, tl.where(m < 0.0, 0.0, m), 0.0) + tl.where(y != -1.0, x, 0.0)
        der = tl.where(y != -1.0, 1.0, 0.0) - tl.where((y != 1.0) & (m >= 0.0), 1.0, 0.0)
    elif LOSS == 8:  # margin_ranking on x = x1 - x2, a = margin
        v = a - y * x
        val = tl.where(v < 0.0, 0.0, v)
        der = tl.where(v >= 0.0, -y, 0.0)
    elif LOSS == 9:  # sigmoid_focal, a = alpha (< 0: no alpha_t), b = gamma
        s = tl.sigmoid(x)
        ce = (1.0 - y) * x + _softplus(-x)
        q = 1.0 - (s * y + (1.0 - s) * (1.0 - y))
        lq = tl.log2(q)
        mod = tl.where(b == 0.0, 1.0, tl.where(b == 1.0, q, tl.where(b == 2.0, q * q, tl.exp2(b * lq))))
        # b q^(b-1); 0 for b = 0 (torch's pow backward at the exponent 0)
        dmod = tl.where(b == 0.0, 0.0, tl.where(b == 1.0, 1.0, tl.where(b == 2.0, q + q, b * tl.exp2((b - 1.0) * lq))))
        at = tl.where(a >= 0.0, a * y + (1.0 - a) * (1.0 - y), 1.0)
        val = at * ce * mod
        der = at * ((s - y) * mod - ce * dmod * s * (1.0 - s) * (y + y - 1.0))
    else:  # quantile, p = tau
        e = y - x
        val = tl.where(e >= 0.0, p * e, (p - 1.0) * e)
        der = tl.where(e >= 0.0, -p, 1.0 - p)
    return val, der


@triton.jit
def _load_point(LOSS: tl.constexpr, X, Y, W, P, offs, mask, C, a, b, W_MODE: tl.constexpr, HAS_P: tl.constexpr):
    """(w l, w dl/dx) at the flat offsets; W_MODE 0: no weight, 1: one per element, 2: one per column."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_P:
        p = tl.load(P + offs % C, mask=mask, other=1.0).to(tl.float32)
    else:
        p = 1.0
    val, der = _point(LOSS, x, y, p, a, b)
    if W_MODE == 1:
        w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        val, der = val * w, der * w
    elif W_MODE == 2:
        w = tl.load(W + offs % C, mask=mask, other=0.0).to(tl.float32)
        val, der = val * w, der * w
    return val, der


@triton.jit
def _loss_fwd_kernel(X, Y, W, P, OUT, DX, N, C, a, b, SCALE, LOSS: tl.constexpr, W_MODE: tl.constexpr,
                     HAS_P: tl.constexpr, REDUCE: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    val, der = _load_point(LOSS, X, Y, W, P, offs, mask, C, a, b, W_MODE, HAS_P)
    if REDUCE:
        tl.store(OUT + pid, tl.sum(tl.where(mask, val, 0.0), axis=0) * SCALE)
    else:
        tl.store(OUT + offs, val.to(OUT.dtype.element_ty), mask=mask)
    if GRAD:  # loss_fwd_grad: dx for an upstream gradient of 1, in the same pass
        tl.store(DX + offs, (der * SCALE).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _loss_bwd_kernel(G, X, Y, W, P, DX, N, C, a, b, SCALE, LOSS: tl.constexpr, W_MODE: tl.constexpr,
                     HAS_P: tl.constexpr, SCALAR_G: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    _, der = _load_point(LOSS, X, Y, W, P, offs, mask, C, a, b, W_MODE, HAS_P)
    if SCALAR_G:
        g = tl.load(G).to(tl.float32) * SCALE
    else:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * SCALE
    tl.store(DX + offs, (der * g).to(DX.dtype.element_ty), mask=mask)


def _modes(x, w, p):
    n = x.numel()
    w_mode = 0 if w is None else (1 if w.numel() == n and w.shape == x.shape else 2)
    return w_mode, p is not None, max(x.shape[-1] if x.dim() else 1, 1)


def loss_fwd(loss, x, y, w, p, a, b, scale, reduce):
    """Pointwise loss `loss` (w l(x, y); x.shape, x.dtype) or, with reduce, its sum times scale (0-d, x.dtype).
    x, y contiguous, same shape and dtype; w None, of x's shape or (C,); p None or (C,), C = x's last dim.
    Reads 2-3N elements, writes N (or a float per program)."""
    return _forward(loss, x, y, w, p, a, b, scale, reduce, None)


def loss_fwd_grad(loss, x, y, w, p, a, b, scale):
    """(loss_fwd(..., reduce=True), loss_bwd(1, ...)) in one pass: reads 2-3N elements, writes N."""
    dx = torch.empty_like(x)
    return _forward(loss, x, y, w, p, a, b, scale, True, dx), dx


def _forward(loss, x, y, w, p, a, b, scale, reduce, dx):
    n = x.numel()
    w_mode, has_p, c = _modes(x, w, p)
    grid = (triton.cdiv(n, BLOCK),)
    args = dict(LOSS=int(loss), W_MODE=w_mode, HAS_P=has_p, GRAD=dx is not None, BLOCK=BLOCK, num_warps=WARPS)
    if not reduce:
        out = torch.empty_like(x)
        if n:
            _loss_fwd_kernel[grid](x, y, w, p, out, dx, n, c, float(a), float(b), 1.0, REDUCE=False, **args)
        return out
    part = torch.zeros(max(grid[0], 1), device=x.device, dtype=torch.float32)
    if n:
        _loss_fwd_kernel[grid](x, y, w, p, part, dx, n, c, float(a), float(b), float(scale), REDUCE=True, **args)
    return part.sum().to(x.dtype)


def loss_bwd(loss, g, x, y, w, p, a, b, scale):
    """dx = g scale w dl/dx (x.shape, x.dtype); g 0-d or contiguous of x's shape. Reads 2-4N elements, writes N."""
    n = x.numel()
    w_mode, has_p, c = _modes(x, w, p)
    dx = torch.empty_like(x)
    if n:
        _loss_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            g, x, y, w, p, dx, n, c, float(a), float(b), float(scale), LOSS=int(loss), W_MODE=w_mode, HAS_P=has_p,
            SCALAR_G=g.dim() == 0, BLOCK=BLOCK, num_warps=WARPS)
    return dx
