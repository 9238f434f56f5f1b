"""Cross-entropy with class-index targets: a forward kernel that writes each row's loss and the gradient row of
that loss (no softmax kept), and a backward kernel that scales those rows by the upstream gradient.

Per row of C logits x, target t, class weights w (1 without), W = sum_c w_c, smoothing eps, b = eps / C:
  lse = log sum_c exp(x_c);  loss = (1 - eps) w_t (lse - x_t) + b (W lse - sum_c w_c x_c)
  grad_j = p_j ((1 - eps) w_t + b W) - b w_j - [j == t] (1 - eps) w_t,   p_j = exp(x_j - lse)
Ignored rows (t == ignore_index) give loss 0 and a zero gradient row. With MEAN, losses and gradients are divided
by the total weight (sum of w_t over non-ignored rows; an ignored row's loss is 0 * (1/total): NaN in the mean over
zero rows, as torch). Gradient rows are float32 (rounded once, in the backward, to the input dtype).
Options (cross_entropy_z_fwd; Liger-Kernel's lse_square_scale and softcap): SOFTCAP reads every logit as
y = c tanh(x / c) (recomputed where needed, never stored), Z_LOSS adds z lse^2 to each non-ignored row (lse of y; with
MEAN divided by the number of non-ignored rows, no class weight); the gradient row is then
d/dy_j = the above with a -> a + 2 z lse (per the row's divisors), times dy/dx = 1 - (y / c)^2
(as 4 e / (1 + e)^2, e = exp(-2|x| / c): no cancellation).
Traffic: forward reads MC (twice when a row does not fit one block, the second time mostly from L2), writes MC
(gradient) + 4M; backward reads MC + 4M, writes MC.
"""
import torch
import triton
import triton.language as tl

from ._utils import row_block, row_warps


@triton.jit
def _tanh_sech2(x):
    # (tanh x, 1 - tanh^2 x) in float32 within ~1 ulp, without libdevice (the interpreter has none):
    # |x| < 0.55: tanh's odd Taylor series to x^19 (the first omitted term is below 1e-9 of tanh x there);
    # else, with e = exp(-2|x|) <= 1/3: tanh |x| = (1 - e) / (1 + e) and 1 - tanh^2 = 4 e / (1 + e)^2, neither of
    # which cancels (e underflows to 0 for large |x|: tanh 1, derivative 0)
    a = tl.abs(x)
    near = a < 0.55
    xn = tl.where(near, x, 0.0)  # the series only where it is used (no overflow in x^2 elsewhere)
    x2 = xn * xn
    p = -2.3912911424355248e-4
    p = p * x2 + 5.90027440945586e-4
    p = p * x2 - 1.4558343870513183e-3
    p = p * x2 + 3.592128036572481e-3
    p = p * x2 - 8.863235529902197e-3
    p = p * x2 + 2.1869488536155203e-2
    p = p * x2 - 5.396825396825397e-2
    p = p * x2 + 1.3333333333333333e-1
    p = p * x2 - 3.333333333333333e-1
    small = xn + xn * (x2 * p)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    t = tl.where(near, small, big)
    return t, tl.where(near, 1.0 - small * small, 4.0 * e / ((1.0 + e) * (1.0 + e)))


@triton.jit
def _grad_block(x, sech2, w, c, t, lse, a, wt, eps, b, inv, zg, valid, SMOOTH: tl.constexpr, Z_LOSS: tl.constexpr,
                SOFTCAP: tl.constexpr):
    """The gradient at the columns c of a row (module docstring), shared by the register-resident row and the looped
    one: x the (capped) logits, sech2 the cap's derivative there (SOFTCAP), w the class weights (SMOOTH; 1 without),
    zg the z-loss's factor (Z_LOSS); 0 in an ignored row."""
    p = tl.exp(x - lse)
    g = p * a - tl.where(c == t, (1.0 - eps) * wt, 0.0)
    if SMOOTH:
        g -= b * w
    g = g * inv
    if Z_LOSS:
        g += p * zg
    if SOFTCAP:
        g = g * sech2
    return tl.where(valid, g, 0.0)


@triton.jit
def _ce_fwd_kernel(
    X, T, W, TOTAL, LOSS, GRAD, stride_x, stride_t, C, ignore_index, eps, COUNT, z_loss, cap,
    HAS_W: tl.constexpr,        # class weights
    MEAN: tl.constexpr,         # divide by the total weight (reduction='mean')
    SMOOTH: tl.constexpr,       # label smoothing: needs sum_c w_c x_c and sum_c w_c
    NEED_GRAD: tl.constexpr,    # write the gradient rows (skipped under no_grad)
    BLOCK_N: tl.constexpr,
    SINGLE_BLOCK: tl.constexpr,  # the row fits one block: keep it in registers for the gradient pass
    Z_LOSS: tl.constexpr = False,   # add z_loss lse^2 (COUNT: the number of non-ignored rows, its 'mean' divisor)
    SOFTCAP: tl.constexpr = False,  # logits read as cap tanh(x / cap)
):
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    GRAD += row * C
    cols = tl.arange(0, BLOCK_N)
    if SINGLE_BLOCK:
        mask = cols < C
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        if SOFTCAP:
            th, sech2 = _tanh_sech2(x / cap)
            x = cap * th
        x = tl.where(mask, x, float("-inf"))
        m = tl.max(x, axis=0)
        e = tl.exp(x - m)
        lse = m + tl.log(tl.sum(e, axis=0))
        if SMOOTH:
            if HAS_W:
                w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                w = tl.where(mask, 1.0, 0.0)
            q = tl.sum(tl.where(mask, w * x, 0.0), axis=0)
            wsum = tl.sum(w, axis=0)
    else:
        m_l = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s_l = tl.zeros([BLOCK_N], dtype=tl.float32)
        q_l = tl.zeros([BLOCK_N], dtype=tl.float32)
        w_l = tl.zeros([BLOCK_N], dtype=tl.float32)
        for off in range(0, C, BLOCK_N):
            c = off + cols
            mask = c < C
            x = tl.load(X + c, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                th, _ = _tanh_sech2(x / cap)
                x = cap * th
            x = tl.where(mask, x, float("-inf"))
            m_new = tl.maximum(m_l, x)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with only -inf so far keeps sum 0
            s_l = s_l * tl.exp(m_l - m_safe) + tl.exp(x - m_safe)
            m_l = m_new
            if SMOOTH:
                if HAS_W:
                    w = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                else:
                    w = tl.where(mask, 1.0, 0.0)
                q_l += tl.where(mask, w * x, 0.0)
                w_l += w
        m = tl.max(m_l, axis=0)
        lse = m + tl.log(tl.sum(s_l * tl.exp(m_l - m), axis=0))
        if SMOOTH:
            q = tl.sum(q_l, axis=0)
            wsum = tl.sum(w_l, axis=0)
    # The target, x_t and w_t are loaded after the row pass, not before it: kept across the looped pass (beside its
    # four accumulators) they were what ptxas spilled.
    t = tl.load(T + row * stride_t)
    valid = t != ignore_index
    tl.device_assert(~valid | ((t >= 0) & (t < C)), "target out of bounds")
    t = tl.where(valid, t, 0)
    xt = tl.load(X + t).to(tl.float32)
    if SOFTCAP:
        tht, _ = _tanh_sech2(xt / cap)
        xt = cap * tht
    if HAS_W:
        wt = tl.load(W + t).to(tl.float32)
    else:
        wt = 1.0
    if MEAN:
        inv = 1.0 / tl.load(TOTAL)
    else:
        inv = 1.0
    b = eps / C
    loss = (1.0 - eps) * wt * (lse - xt)
    if SMOOTH:
        loss += b * (wsum * lse - q)
        a = (1.0 - eps) * wt + b * wsum
    else:
        a = wt
    if Z_LOSS:
        invz = 1.0
        if MEAN:
            invz = 1.0 / tl.load(COUNT)
        tl.store(LOSS + row, tl.where(valid, loss * inv + z_loss * lse * lse * invz, 0.0 * inv))
        zg = 2.0 * z_loss * lse * invz  # the z-loss's gradient is zg p_j
    else:
        tl.store(LOSS + row, tl.where(valid, loss, 0.0) * inv)
    if NEED_GRAD:
        if SINGLE_BLOCK:
            g = _grad_block(x, sech2 if SOFTCAP else 1.0, w if SMOOTH else 1.0, cols, t, lse, a, wt, eps, b, inv,
                            zg if Z_LOSS else 0.0, valid, SMOOTH, Z_LOSS, SOFTCAP)
            tl.store(GRAD + cols, g, mask=mask)
        else:
            for off in range(0, C, BLOCK_N):
                c = off + cols
                mask = c < C
                x = tl.load(X + c, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    th, sc = _tanh_sech2(x / cap)
                    x = cap * th
                if SMOOTH and HAS_W:
                    wc = tl.load(W + c, mask=mask, other=0.0).to(tl.float32)
                g = _grad_block(x, sc if SOFTCAP else 1.0, wc if SMOOTH and HAS_W else 1.0, c, t, lse, a, wt, eps, b,
                                inv, zg if Z_LOSS else 0.0, valid, SMOOTH, Z_LOSS, SOFTCAP)
                tl.store(GRAD + c, g, mask=mask)


@triton.jit
def _ce_bwd_kernel(G, D, DX, stride_g, stride_d, C, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.load(D + row * stride_d).to(tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for off in range(0, C, BLOCK_N):
        c = off + cols
        mask = c < C
        g = tl.load(G + row * stride_g + c, mask=mask, other=0.0)
        tl.store(DX + row * C + c, (g * d).to(DX.dtype.element_ty), mask=mask)


def cross_entropy_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad):
    """Per-row loss and gradient rows (see the module docstring).  x (M, C) with unit column stride, target (M,)
    int64, weight (C,) or None -> loss (M,) float32, grad (M, C) float32 (or (0,) when not needed),
    total_weight () float32 (sum of w_t over non-ignored rows: the 'mean' divisor).
    Reads MC elements (+C weights), writes 4MC + 4M bytes."""
    return cross_entropy_z_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad, 0.0, 0.0)


def cross_entropy_z_fwd(x, target, weight, ignore_index, label_smoothing, mean, need_grad, z_loss, softcap):
    """cross_entropy_fwd with the options (see the module docstring): z_loss >= 0, softcap >= 0 (0: off). Reads
    and writes as cross_entropy_fwd."""
    if z_loss < 0 or softcap < 0:
        raise ValueError(f"cross_entropy_z_fwd: z_loss and softcap must be >= 0, got {z_loss}, {softcap}")
    M, C = x.shape
    loss = torch.empty((M,), device=x.device, dtype=torch.float32)
    grad = torch.empty((M, C) if need_grad else (0,), device=x.device, dtype=torch.float32)
    valid = target != ignore_index
    count = valid.sum(dtype=torch.float32) if z_loss != 0.0 or weight is None else None
    if weight is not None:  # torch ops, no host sync: out-of-range targets are clamped here and caught in-kernel
        total = torch.where(valid, weight.float()[target.clamp(0, C - 1)], 0.0).sum()
    else:
        total = count
    block, single = row_block(C, x.element_size())
    if M > 0:
        _ce_fwd_kernel[(M,)](
            x, target, weight, total, loss, grad, x.stride(0), target.stride(0), C, ignore_index,
            float(label_smoothing), count, float(z_loss), float(softcap), HAS_W=weight is not None,
            MEAN=bool(mean), SMOOTH=label_smoothing != 0.0, NEED_GRAD=bool(need_grad),
            BLOCK_N=block, SINGLE_BLOCK=single, num_warps=row_warps(block),
            Z_LOSS=z_loss != 0.0, SOFTCAP=softcap != 0.0,
        )
    return loss, grad, total


def cross_entropy_bwd(grad, dloss, dtype):
    """dx[r, :] = grad[r, :] * dloss[r] in dtype.  grad (M, C) float32 with unit column stride, dloss (M,) float32
    (any stride) -> dx (M, C).  Reads 4MC + 4M bytes, writes MC elements."""
    M, C = grad.shape
    dx = torch.empty((M, C), device=grad.device, dtype=dtype)
    block = min(triton.next_power_of_2(max(C, 1)), 4096)
    if M > 0:
        _ce_bwd_kernel[(M,)](grad, dloss, dx, grad.stride(0), dloss.stride(0), C, BLOCK_N=block,
                             num_warps=row_warps(block))
    return dx
