"""2-D max pooling over non-overlapping windows: x (P, H, W) contiguous (P = batch x channels planes), windows of
KH x KW at stride (KH, KW), no padding: y[p, i, j] = the window's maximum and idx[p, i, j] (uint8) its offset
r KW + c in the window (the first maximum; a NaN wins, the last one as in torch). Backward: dx = dy at each window's
idx, zero elsewhere (trailing rows and columns in no window: zero). One program per block of outputs.
Traffic: forward reads P Ho Wo KH KW elements of x and writes P Ho Wo of y plus as many bytes of idx; backward
reads dy and idx and writes dx (P H W)."""
import torch
import triton
import triton.language as tl


@triton.jit
def _max_pool2d_fwd_kernel(X, Y, IDX, n, Ho, Wo, H, W, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    j = offs % Wo
    pi = offs // Wo                       # plane * Ho + i
    base = (pi // Ho) * H * W + (pi % Ho) * KH * W + j * KW
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    best = tl.zeros([BLOCK], tl.int32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            v = tl.load(X + base + a * W + b, mask=mask, other=0.0).to(tl.float32)
            take = (v > m) | (v != v)
            m = tl.where(take, v, m)
            best = tl.where(take, a * KW + b, best)
    tl.store(Y + offs, m.to(Y.dtype.element_ty), mask=mask)
    tl.store(IDX + offs, best.to(tl.uint8), mask=mask)


@triton.jit
def _max_pool2d_bwd_kernel(DY, IDX, DX, n, Ho, Wo, H, W, KH: tl.constexpr, KW: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    j = offs % Wo
    pi = offs // Wo
    base = (pi // Ho) * H * W + (pi % Ho) * KH * W + j * KW
    d = tl.load(DY + offs, mask=mask, other=0.0)
    best = tl.load(IDX + offs, mask=mask, other=0).to(tl.int32)
    for a in tl.static_range(KH):
        for b in tl.static_range(KW):
            tl.store(DX + base + a * W + b, tl.where(best == a * KW + b, d, tl.zeros_like(d)), mask=mask)


def _grid(n, BLOCK):
    return (triton.cdiv(n, BLOCK),)


def max_pool2d_fwd(x, kh, kw):
    """y, idx (P, H // kh, W // kw) for x (P, H, W) contiguous: the windows' maxima and their offsets (uint8)."""
    P, H, W = x.shape
    Ho, Wo = H // kh, W // kw
    y = torch.empty((P, Ho, Wo), device=x.device, dtype=x.dtype)
    idx = torch.empty((P, Ho, Wo), device=x.device, dtype=torch.uint8)
    n = y.numel()
    if n:
        BLOCK = 512
        _max_pool2d_fwd_kernel[_grid(n, BLOCK)](x, y, idx, n, Ho, Wo, H, W, KH=kh, KW=kw, BLOCK=BLOCK, num_warps=4)
    return y, idx


def max_pool2d_bwd(dy, idx, kh, kw, H, W):
    """dx (P, H, W) for dy, idx (P, H // kh, W // kw) contiguous: dy at each window's idx, zero elsewhere."""
    P, Ho, Wo = dy.shape
    covered = Ho * kh == H and Wo * kw == W  # every element in a window: the kernel writes all of dx
    dx = (torch.empty if covered else torch.zeros)((P, H, W), device=dy.device, dtype=dy.dtype)
    n = dy.numel()
    if n:
        BLOCK = 512
        _max_pool2d_bwd_kernel[_grid(n, BLOCK)](dy, idx, dx, n, Ho, Wo, H, W, KH=kh, KW=kw, BLOCK=BLOCK, num_warps=4)
    return dx
