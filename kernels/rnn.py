"""LSTM, GRU and Elman RNN cells: the elementwise part of one time step, forward and backward, each one kernel.

The caller keeps the matmuls (the input projection for all steps up front, h @ W_hh^T per step); these
kernels do everything between them in one pass over a (batch, hidden) tile. Gate orders are torch's:
LSTM (i, f, g, o), GRU (r, z, n).

LSTM fwd:  i,f,o = sigmoid(G_ifo); g = tanh(G_g); c' = f*c + i*g; h' = o*tanh(c')
LSTM bwd:  dc~ = dc' + dh*o*(1 - tanh(c')^2); dG = [dc~*g*i(1-i), dc~*c*f(1-f), dc~*i(1-g^2), dh*tanh(c')*o(1-o)];
           dc = dc~*f
GRU fwd:   r,z = sigmoid(X_rz + Q_rz); n = tanh(X_n + r*Q_n); h' = n + z*(h - n)      (Q = h @ W_hh^T + b_hh)
GRU bwd:   dn~ = dh*(1-z)(1-n^2); dz~ = dh*(h-n)*z(1-z); dr~ = dn~*Q_n*r(1-r);
           dX = [dr~, dz~, dn~]; dQ = [dr~, dz~, dn~*r]; dh_direct = dh*z
RNN fwd:   h' = act(P), P = X + h @ W_hh^T, act tanh or relu (in place: the scan writes P into h' first)
RNN bwd:   dP = dh * act'(h'), act' = 1 - h'^2 (tanh) or h' > 0 (relu)
Traffic per step (elements, B x H tile): LSTM fwd reads 5BH, writes 6BH (h, c', the 4 activated gates saved
for backward); LSTM bwd reads 8BH, writes 5BH; GRU fwd reads 7BH, writes 5BH; GRU bwd reads 6BH, writes 7BH;
RNN fwd reads and writes BH; RNN bwd reads 2BH, writes BH.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exact at both tails (exp overflow gives 1, underflow gives -1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _lstm_fwd_kernel(G, C, Hout, CN, A, stride_g, stride_c, H, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    G += row * stride_g
    i = _sigmoid(tl.load(G + cols, mask=mask, other=0.0).to(tl.float32))
    f = _sigmoid(tl.load(G + H + cols, mask=mask, other=0.0).to(tl.float32))
    g = _tanh(tl.load(G + 2 * H + cols, mask=mask, other=0.0).to(tl.float32))
    o = _sigmoid(tl.load(G + 3 * H + cols, mask=mask, other=0.0).to(tl.float32))
    c = tl.load(C + row * stride_c + cols, mask=mask, other=0.0).to(tl.float32)
    cn = f * c + i * g
    h = o * _tanh(cn)
    A += row * 4 * H
    dt = A.dtype.element_ty
    tl.store(A + cols, i.to(dt), mask=mask)
    tl.store(A + H + cols, f.to(dt), mask=mask)
    tl.store(A + 2 * H + cols, g.to(dt), mask=mask)
    tl.store(A + 3 * H + cols, o.to(dt), mask=mask)
    tl.store(CN + row * H + cols, cn.to(dt), mask=mask)
    tl.store(Hout + row * H + cols, h.to(dt), mask=mask)


@triton.jit
def _lstm_bwd_kernel(DH, DC, A, CN, C, DG, DCP, stride_dh, stride_dc, stride_a, stride_cn, stride_c, H,
                     BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    A += row * stride_a
    i = tl.load(A + cols, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(A + H + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(A + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(A + 3 * H + cols, mask=mask, other=0.0).to(tl.float32)
    tc = _tanh(tl.load(CN + row * stride_cn + cols, mask=mask, other=0.0).to(tl.float32))
    dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    dcc = tl.load(DC + row * stride_dc + cols, mask=mask, other=0.0).to(tl.float32) + dh * o * (1.0 - tc * tc)
    c = tl.load(C + row * stride_c + cols, mask=mask, other=0.0).to(tl.float32)
    DG += row * 4 * H
    dt = DG.dtype.element_ty
    tl.store(DG + cols, (dcc * g * i * (1.0 - i)).to(dt), mask=mask)
    tl.store(DG + H + cols, (dcc * c * f * (1.0 - f)).to(dt), mask=mask)
    tl.store(DG + 2 * H + cols, (dcc * i * (1.0 - g * g)).to(dt), mask=mask)
    tl.store(DG + 3 * H + cols, (dh * tc * o * (1.0 - o)).to(dt), mask=mask)
    tl.store(DCP + row * H + cols, (dcc * f).to(dt), mask=mask)


@triton.jit
def _gru_fwd_kernel(X, Q, Hp, Hout, S, stride_x, stride_q, stride_h, H, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    X += row * stride_x
    Q += row * stride_q
    r = _sigmoid(tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(Q + cols, mask=mask, other=0.0).to(tl.float32))
    z = _sigmoid(tl.load(X + H + cols, mask=mask, other=0.0).to(tl.float32)
                 + tl.load(Q + H + cols, mask=mask, other=0.0).to(tl.float32))
    qn = tl.load(Q + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    n = _tanh(tl.load(X + 2 * H + cols, mask=mask, other=0.0).to(tl.float32) + r * qn)
    h = tl.load(Hp + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    S += row * 4 * H
    dt = S.dtype.element_ty
    tl.store(S + cols, r.to(dt), mask=mask)
    tl.store(S + H + cols, z.to(dt), mask=mask)
    tl.store(S + 2 * H + cols, n.to(dt), mask=mask)
    tl.store(S + 3 * H + cols, qn.to(dt), mask=mask)
    tl.store(Hout + row * H + cols, (n + z * (h - n)).to(dt), mask=mask)


@triton.jit
def _gru_bwd_kernel(DH, S, Hp, EX, DX, DQ, DHD, stride_dh, stride_s, stride_h, stride_ex, H,
                    HAS_EXTRA: tl.constexpr,  # the scan folds the previous step's output gradient into dh_direct
                    BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    S += row * stride_s
    r = tl.load(S + cols, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(S + H + cols, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(S + 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    qn = tl.load(S + 3 * H + cols, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(Hp + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h - n) * z * (1.0 - z)
    dr = dn * qn * r * (1.0 - r)
    DX += row * 3 * H
    DQ += row * 3 * H
    dt = DX.dtype.element_ty
    tl.store(DX + cols, dr.to(dt), mask=mask)
    tl.store(DX + H + cols, dz.to(dt), mask=mask)
    tl.store(DX + 2 * H + cols, dn.to(dt), mask=mask)
    tl.store(DQ + cols, dr.to(dt), mask=mask)
    tl.store(DQ + H + cols, dz.to(dt), mask=mask)
    tl.store(DQ + 2 * H + cols, (dn * r).to(dt), mask=mask)
    dhd = dh * z
    if HAS_EXTRA:
        dhd += tl.load(EX + row * stride_ex + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(DHD + row * H + cols, dhd.to(dt), mask=mask)


@triton.jit
def _rnn_act_kernel(Y, stride_y, H, RELU: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    Y += row * stride_y
    p = tl.load(Y + cols, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        h = tl.where(p < 0.0, 0.0, p)   # NaN passes, as torch's relu
    else:
        h = _tanh(p)
    tl.store(Y + cols, h.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rnn_bwd_kernel(DH, HN, DP, stride_dh, stride_h, H, RELU: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    dh = tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(HN + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dp = tl.where(h > 0.0, dh, 0.0)
    else:
        dp = dh * (1.0 - h * h)
    tl.store(DP + row * H + cols, dp.to(DP.dtype.element_ty), mask=mask)


def _grid(B, H):
    block = min(triton.next_power_of_2(max(H, 1)), 1024)
    return (B, triton.cdiv(H, block)), block, min(max(block // 256, 1), 8)


# ---- writers: launch one cell step into given outputs (rows of H / 4H / 3H contiguous elements) ----
def _lstm_fwd_into(gates, c, h, cn, act):
    B, H = c.shape
    grid, block, warps = _grid(B, H)
    if B * H > 0:
        _lstm_fwd_kernel[grid](gates, c, h, cn, act, gates.stride(0), c.stride(0), H, BLOCK_H=block,
                               num_warps=warps)


def _lstm_bwd_into(dh, dc, act, cn, c, dg, dcp):
    B, H = c.shape
    grid, block, warps = _grid(B, H)
    if B * H > 0:
        _lstm_bwd_kernel[grid](dh, dc, act, cn, c, dg, dcp, dh.stride(0), dc.stride(0), act.stride(0),
                               cn.stride(0), c.stride(0), H, BLOCK_H=block, num_warps=warps)


def _gru_fwd_into(xg, hg, h, hn, saved):
    B, H = h.shape
    grid, block, warps = _grid(B, H)
    if B * H > 0:
        _gru_fwd_kernel[grid](xg, hg, h, hn, saved, xg.stride(0), hg.stride(0), h.stride(0), H, BLOCK_H=block,
                              num_warps=warps)


def _gru_bwd_into(dh, saved, h, extra, dx, dq, dhd):
    B, H = h.shape
    grid, block, warps = _grid(B, H)
    if B * H > 0:
        _gru_bwd_kernel[grid](dh, saved, h, extra, dx, dq, dhd, dh.stride(0), saved.stride(0), h.stride(0),
                              extra.stride(0) if extra is not None else 0, H, HAS_EXTRA=extra is not None,
                              BLOCK_H=block, num_warps=warps)


# ---- the cell ops (one time step) ----
def lstm_cell_fwd(gates, c):
    """h', c', act = LSTM cell on pre-activations.  gates (B, 4H) (unit column stride), c (B, H) ->
    h (B, H), c' (B, H), act (B, 4H) (the activated i, f, g, o, saved for backward).  Moves 11BH elements."""
    B, H = c.shape
    h, cn, act = c.new_empty((B, H)), c.new_empty((B, H)), c.new_empty((B, 4 * H))
    _lstm_fwd_into(gates, c, h, cn, act)
    return h, cn, act


def lstm_cell_bwd(dh, dc, act, cn, c):
    """dgates, dc_prev of the LSTM cell.  dh, dc (B, H) (gradients reaching h', c'), act (B, 4H), c' and c
    (B, H) -> dgates (B, 4H) (w.r.t. the pre-activations), dc_prev (B, H).  Moves 13BH elements."""
    B, H = c.shape
    dg, dcp = c.new_empty((B, 4 * H)), c.new_empty((B, H))
    _lstm_bwd_into(dh, dc, act, cn, c, dg, dcp)
    return dg, dcp


def gru_cell_fwd(xg, hg, h):
    """h', saved = GRU cell.  xg (B, 3H) = x @ W_ih^T + b_ih, hg (B, 3H) = h @ W_hh^T + b_hh, h (B, H) ->
    h' (B, H), saved (B, 4H) = [r, z, n, hg_n] for backward.  Moves 12BH elements."""
    B, H = h.shape
    hn, saved = h.new_empty((B, H)), h.new_empty((B, 4 * H))
    _gru_fwd_into(xg, hg, h, hn, saved)
    return hn, saved


def gru_cell_bwd(dh, saved, h):
    """dxg, dhg, dh_direct of the GRU cell.  dh (B, H), saved (B, 4H), h (B, H) -> dxg (B, 3H), dhg (B, 3H)
    (gradients w.r.t. xg and hg), dh_direct (B, H) = dh * z.  Moves 13BH elements."""
    B, H = h.shape
    dx, dq, dhd = h.new_empty((B, 3 * H)), h.new_empty((B, 3 * H)), h.new_empty((B, H))
    _gru_bwd_into(dh, saved, h, None, dx, dq, dhd)
    return dx, dq, dhd


# ---- the scans: a layer-direction through time; per step one matmul (into a scratch buffer) and one cell
# kernel writing straight into the (T, B, .) outputs ----
def _step(k, T, reverse):
    return T - 1 - k if reverse else k


def lstm_scan_fwd(xproj, w_hh, h0, c0, reverse):
    """hs, cs, acts of an LSTM layer-direction.  xproj (T, B, 4H) = x W_ih^T + b_ih + b_hh, w_hh (4H, H),
    h0, c0 (B, H) -> hs, cs (T, B, H), acts (T, B, 4H).  Per step: 8BH^2 flops, 11BH elements."""
    T, B, G = xproj.shape
    H = G // 4
    hs, cs, acts = xproj.new_empty((T, B, H)), xproj.new_empty((T, B, H)), xproj.new_empty((T, B, G))
    gates, wt = xproj.new_empty((B, G)), w_hh.t()
    for k in range(T):
        t, tp = _step(k, T, reverse), _step(k - 1, T, reverse)
        h_prev, c_prev = (h0, c0) if k == 0 else (hs[tp], cs[tp])
        torch.addmm(xproj[t], h_prev, wt, out=gates)
        _lstm_fwd_into(gates, c_prev, hs[t], cs[t], acts[t])
    return hs, cs, acts


def lstm_scan_bwd(dhs, dcT, w_hh, h0, c0, cs, acts, reverse):
    """dgates (T, B, 4H), dh0, dc0 (B, H) of an LSTM layer-direction from the output gradients dhs (T, B, H)
    and dcT (B, H).  Per step: 8BH^2 flops, 13BH elements."""
    T, B, G = acts.shape
    H = G // 4
    dgates = acts.new_empty((T, B, G))
    dc = dcT.clone(memory_format=torch.contiguous_format)
    dh, dh0 = acts.new_empty((B, H)), acts.new_empty((B, H))
    for k in range(T - 1, -1, -1):
        t, tp = _step(k, T, reverse), _step(k - 1, T, reverse)
        c_prev = c0 if k == 0 else cs[tp]
        _lstm_bwd_into(dhs[t] if k == T - 1 else dh, dc, acts[t], cs[t], c_prev, dgates[t], dc)
        if k > 0:
            torch.addmm(dhs[tp], dgates[t], w_hh, out=dh)
        else:
            torch.mm(dgates[t], w_hh, out=dh0)
    return dgates, dh0, dc


def gru_scan_fwd(xproj, w_hh, b_hh, h0, reverse):
    """hs (T, B, H), saved (T, B, 4H) of a GRU layer-direction.  xproj (T, B, 3H) = x W_ih^T + b_ih,
    w_hh (3H, H), b_hh (3H,) or None, h0 (B, H).  Per step: 6BH^2 flops, 12BH elements."""
    T, B, G = xproj.shape
    H = G // 3
    hs, saved = xproj.new_empty((T, B, H)), xproj.new_empty((T, B, 4 * H))
    q, wt = xproj.new_empty((B, G)), w_hh.t()
    for k in range(T):
        t, tp = _step(k, T, reverse), _step(k - 1, T, reverse)
        h_prev = h0 if k == 0 else hs[tp]
        if b_hh is None:
            torch.mm(h_prev, wt, out=q)
        else:
            torch.addmm(b_hh, h_prev, wt, out=q)
        _gru_fwd_into(xproj[t], q, h_prev, hs[t], saved[t])
    return hs, saved


def gru_scan_bwd(dhs, w_hh, h0, hs, saved, reverse):
    """dxproj (T, B, 3H), dq (T, B, 3H) (w.r.t. h W_hh^T + b_hh), dh0 (B, H) of a GRU layer-direction.
    Per step: 6BH^2 flops, 13BH elements."""
    T, B, H = hs.shape
    dx, dq = hs.new_empty((T, B, 3 * H)), hs.new_empty((T, B, 3 * H))
    dh, direct, dh0 = hs.new_empty((B, H)), hs.new_empty((B, H)), hs.new_empty((B, H))
    for k in range(T - 1, -1, -1):
        t, tp = _step(k, T, reverse), _step(k - 1, T, reverse)
        h_prev = h0 if k == 0 else hs[tp]
        _gru_bwd_into(dhs[t] if k == T - 1 else dh, saved[t], h_prev, dhs[tp] if k > 0 else None, dx[t], dq[t],
                      direct)
        torch.addmm(direct, dq[t], w_hh, out=dh if k > 0 else dh0)
    return dx, dq, dh0


def _rnn_act_into(y, relu):
    B, H = y.shape
    grid, block, warps = _grid(B, H)
    if B * H > 0:
        _rnn_act_kernel[grid](y, y.stride(0), H, RELU=relu, BLOCK_H=block, num_warps=warps)


def rnn_scan_fwd(xproj, w_hh, h0, reverse, relu):
    """hs (T, B, H) of an Elman RNN layer-direction.  xproj (T, B, H) = x W_ih^T + b_ih + b_hh, w_hh (H, H),
    h0 (B, H); act relu or tanh.  Per step: 2BH^2 flops (the addmm, written into h_t) and 2BH elements."""
    T, B, H = xproj.shape
    hs, wt = xproj.new_empty((T, B, H)), w_hh.t()
    for k in range(T):
        t, tp = _step(k, T, reverse), _step(k - 1, T, reverse)
        torch.addmm(xproj[t], h0 if k == 0 else hs[tp], wt, out=hs[t])
        _rnn_act_into(hs[t], relu)
    return hs


def rnn_scan_bwd(dhs, w_hh, h0, hs, reverse, relu):
    """dpre (T, B, H) (w.r.t. the pre-activations, i.e. xproj), dh0 (B, H) of an Elman RNN layer-direction.
    Per step: 2BH^2 flops, 3BH elements."""
    T, B, H = hs.shape
    dpre = hs.new_empty((T, B, H))
    dh, dh0 = hs.new_empty((B, H)), hs.new_empty((B, H))
    grid, block, warps = _grid(B, H)
    for k in range(T - 1, -1, -1):
        t, tp = _step(k, T, reverse), _step(k - 1, T, reverse)
        g = dhs[t] if k == T - 1 else dh
        if B * H > 0:
            _rnn_bwd_kernel[grid](g, hs[t], dpre[t], g.stride(0), hs.stride(1), H, RELU=relu, BLOCK_H=block,
                                  num_warps=warps)
        if k > 0:
            torch.addmm(dhs[tp], dpre[t], w_hh, out=dh)
        else:
            torch.mm(dpre[t], w_hh, out=dh0)
    return dpre, dh0
