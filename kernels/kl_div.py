"""KL divergence (torch's pointwise kl_div, reduced in the same kernel) and the per-row distillation KL.

kl_div, x = input log-probabilities, t = target (see csrc/kl_div.cpp for the same formulas):
  log_target = False:  l = xlogy(t, t) - t x;   dx = -g t,       dt = g (xlogy(t != 0, t) + t / t - x)
  log_target = True:   l = exp(t) (t - x);      dx = -g exp(t),  dt = g exp(t) (t - x + 1)
The forward writes l, or one partial sum per program (summed and scaled on the host side of the launch, without
a sync); the backward writes both gradients in one pass from a scalar or per-element upstream gradient.
Traffic: forward reads 2N elements, writes N (or N / BLOCK floats); backward reads 2-3N, writes N per gradient.

distill: per row, a = k s (student), b = k u (teacher), KL(softmax(b) || softmax(a)) = sum_j q_j (b_j - a_j)
- lse(b) + lse(a), with the sums kept online per lane while looping over the row (rescaled when a lane's max
grows, as the cross-entropy kernel's); classes with q_j = 0 contribute 0. The row's loss is wk KL (wk =
kl_weight). With a target (HAS_TARGET), the hard-label cross-entropy is fused into the same pass (a third online
sum, lse(s) at temperature 1): the row adds wc (lse(s) - s_t), wc = ce_weight / n_valid, where n_valid, the
number of targets != ignore_index, is summed by the launcher into a 0-d tensor the kernel loads (no host sync);
an ignored row adds 0 * wc (NaN when every row is ignored: torch's 0/0). The gradient row of the row's loss
with respect to s, wk k (softmax(a) - softmax(b)) + wc (softmax(s) - onehot(t)) (no cross-entropy part on
ignored rows), is float32, written in a second pass when needed: one buffer for both terms (csrc/kl_div.cpp
has the same formulas).
"""
import torch
import triton
import triton.language as tl

from ._utils import row_warps

BLOCK = 1024


@triton.jit
def _kl_fwd_kernel(X, T, OUT, N, SCALE, BLOCK: tl.constexpr, LOG_TARGET: tl.constexpr, REDUCE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG_TARGET:
        loss = tl.exp(t) * (t - x)
    else:
        loss = tl.where(t == 0.0, 0.0, t * tl.log(t)) - t * x
    if REDUCE:
        tl.store(OUT + pid, tl.sum(tl.where(mask, loss, 0.0), axis=0) * SCALE)
    else:
        tl.store(OUT + offs, loss.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _kl_bwd_kernel(G, X, T, DX, DT, N, BLOCK: tl.constexpr, LOG_TARGET: tl.constexpr, SCALAR_G: tl.constexpr,
                   NEED_X: tl.constexpr, NEED_T: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=mask, other=0.0).to(tl.float32)
    if SCALAR_G:
        g = tl.load(G).to(tl.float32)
    else:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG_TARGET:
        ge = g * tl.exp(t)
        dx = -ge
        dt = ge * (t - x + 1.0)
    else:
        dx = -(g * t)
        dt = g * (tl.where(t == 0.0, 0.0, tl.log(t)) + t / t - x)
    if NEED_X:
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if NEED_T:
        tl.store(DT + offs, dt.to(DT.dtype.element_ty), mask=mask)


def kl_div_fwd(x, t, log_target, reduce, scale):
    """Pointwise KL (x.shape, x.dtype) or, with reduce, its sum times scale (0-d, x.dtype). x, t contiguous with
    the same shape and dtype. Reads 2N elements."""
    n = x.numel()
    grid = (triton.cdiv(n, BLOCK),)
    if not reduce:
        out = torch.empty_like(x)
        if n:
            _kl_fwd_kernel[grid](x, t, out, n, 1.0, BLOCK=BLOCK, LOG_TARGET=bool(log_target), REDUCE=False)
        return out
    part = torch.zeros(max(grid[0], 1), device=x.device, dtype=torch.float32)
    if n:
        _kl_fwd_kernel[grid](x, t, part, n, float(scale), BLOCK=BLOCK, LOG_TARGET=bool(log_target), REDUCE=True)
    return part.sum().to(x.dtype)


def kl_div_bwd(grad, x, t, log_target, need_input, need_target):
    """(dx, dt), each (0,) when not needed. grad 0-d (a reduced loss) or contiguous of x's shape, x's dtype."""
    n = x.numel()
    e = x.new_empty((0,))
    dx = torch.empty_like(x) if need_input else e
    dt = torch.empty_like(x) if need_target else e
    if n and (need_input or need_target):
        _kl_bwd_kernel[(triton.cdiv(n, BLOCK),)](
            grad, x, t, dx, dt, n, BLOCK=BLOCK, LOG_TARGET=bool(log_target), SCALAR_G=grad.dim() == 0,
            NEED_X=bool(need_input), NEED_T=bool(need_target))
    return dx, dt


@triton.jit
def _distill_fwd_kernel(S, U, T, TOTAL, LOSS, GRAD, stride_s, stride_u, stride_t, C, k, kl_w, ce_w, ignore_index,
                        HAS_TARGET: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    S += row * stride_s
    U += row * stride_u
    GRAD += row * C
    cols = tl.arange(0, BLOCK_N)
    ma_l = tl.full([BLOCK_N], float("-inf"), tl.float32)
    mb_l = tl.full([BLOCK_N], float("-inf"), tl.float32)
    sa_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    sb_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    d_l = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(b - mb) (b - a), rescaled with sb
    if HAS_TARGET:  # the student's softmax at temperature 1, for the cross-entropy
        mc_l = tl.full([BLOCK_N], float("-inf"), tl.float32)
        sc_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    for off in range(0, C, BLOCK_N):
        c = off + cols
        mask = c < C
        x = tl.where(mask, tl.load(S + c, mask=mask, other=0.0).to(tl.float32), float("-inf"))
        a = x * k
        b = tl.where(mask, tl.load(U + c, mask=mask, other=0.0).to(tl.float32) * k, float("-inf"))
        ma_new = tl.maximum(ma_l, a)
        ma_safe = tl.where(ma_new == float("-inf"), 0.0, ma_new)
        sa_l = sa_l * tl.exp(ma_l - ma_safe) + tl.exp(a - ma_safe)
        ma_l = ma_new
        mb_new = tl.maximum(mb_l, b)
        mb_safe = tl.where(mb_new == float("-inf"), 0.0, mb_new)
        r = tl.exp(mb_l - mb_safe)
        eb = tl.exp(b - mb_safe)
        sb_l = sb_l * r + eb
        d_l = d_l * r + tl.where(eb == 0.0, 0.0, eb * (b - a))
        mb_l = mb_new
        if HAS_TARGET:
            mc_new = tl.maximum(mc_l, x)
            mc_safe = tl.where(mc_new == float("-inf"), 0.0, mc_new)
            sc_l = sc_l * tl.exp(mc_l - mc_safe) + tl.exp(x - mc_safe)
            mc_l = mc_new
    ma = tl.max(ma_l, axis=0)
    mb = tl.max(mb_l, axis=0)
    lse_a = ma + tl.log(tl.sum(sa_l * tl.exp(ma_l - ma), axis=0))
    wb = tl.exp(mb_l - mb)
    sb = tl.sum(sb_l * wb, axis=0)
    lse_b = mb + tl.log(sb)
    dsum = tl.sum(tl.where(wb == 0.0, 0.0, d_l * wb), axis=0)
    loss = kl_w * (dsum / sb - lse_b + lse_a)
    if HAS_TARGET:
        mc = tl.max(mc_l, axis=0)
        lse_c = mc + tl.log(tl.sum(sc_l * tl.exp(mc_l - mc), axis=0))
        # the target after the row pass (as the cross-entropy kernel: not kept live across the loop)
        t = tl.load(T + row * stride_t)
        valid = t != ignore_index
        tl.device_assert(~valid | ((t >= 0) & (t < C)), "target out of bounds")
        t = tl.where(valid, t, 0)
        wc = ce_w / tl.load(TOTAL)  # inf (NaN for ce_w = 0) when every row is ignored: the loss is NaN, as torch
        loss += tl.where(valid, lse_c - tl.load(S + t).to(tl.float32), 0.0) * wc
        wc = tl.where(valid, wc, 0.0)  # no cross-entropy gradient on an ignored row
    tl.store(LOSS + row, loss)
    if NEED_GRAD:
        for off in range(0, C, BLOCK_N):
            c = off + cols
            mask = c < C
            x = tl.load(S + c, mask=mask, other=0.0).to(tl.float32)
            b = tl.load(U + c, mask=mask, other=0.0).to(tl.float32) * k
            g = kl_w * k * (tl.exp(x * k - lse_a) - tl.exp(b - lse_b))
            if HAS_TARGET:
                g += wc * (tl.exp(x - lse_c) - tl.where(c == t, 1.0, 0.0))
            tl.store(GRAD + c, g, mask=mask)


def distill_fwd(s, u, inv_temp, need_grad, target=None, ignore_index=-100, kl_weight=1.0, ce_weight=0.0):
    """Per-row loss (M,) float32, kl_weight * KL(softmax(u k) || softmax(s k)), plus with a target (M,) int64
    ce_weight * (lse(s) - s_t) / n_valid (n_valid: the targets != ignore_index, summed here into a tensor the
    kernel reads: no host sync; an ignored row adds 0 / n_valid), and, when needed, the gradient rows of that loss
    with respect to s (M, C) float32: kl_weight k (softmax(s k) - softmax(u k)) + ce_weight / n_valid
    (softmax(s) - onehot(t)) (none on ignored rows). s, u (M, C) with unit column stride. Reads 2MC elements
    (4MC with the gradient pass, mostly from L2), writes 4MC bytes of gradient."""
    M, C = s.shape
    loss = torch.empty((M,), device=s.device, dtype=torch.float32)
    grad = torch.empty((M, C) if need_grad else (0,), device=s.device, dtype=torch.float32)
    has_target = target is not None
    if has_target:
        total = (target != ignore_index).sum(dtype=torch.float32)
    else:
        target = total = loss  # unused pointers
    block = min(triton.next_power_of_2(max(C, 1)), 4096)
    if M > 0:
        _distill_fwd_kernel[(M,)](s, u, target, total, loss, grad, s.stride(0), u.stride(0),
                                  target.stride(0) if has_target else 0, C, float(inv_temp), float(kl_weight),
                                  float(ce_weight), int(ignore_index), HAS_TARGET=has_target,
                                  NEED_GRAD=bool(need_grad), BLOCK_N=block, num_warps=row_warps(block))
    return loss, grad
