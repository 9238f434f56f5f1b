"""xLSTM's sLSTM cell: the forward scan, its backward, and the one-token decoding step (the recurrence and its
conventions are in tritium.ops.slstm). Per step, for one (batch, head) with its four (Dh, Dh) recurrent blocks R_g:

    raw_g = wx_g + h_{t-1} R_g;  m_t = max(i, logsigmoid(f) + m_{t-1});  ig = e^{i - m_t};
    fg = e^{logsigmoid(f) + m_{t-1} - m_t};  c_t = fg c_{t-1} + ig tanh(z);  n_t = fg n_{t-1} + ig;
    h_t = sigmoid(o) c_t / n_t
Backward, with (dh, dc, dn) the adjoint of the state after step t (the final state's gradient at the end):
    dy~ = dy_t + dh;  dc~ = dc + dy~ o / n;  dn~ = dn - dy~ o c / n^2
    draw = [(dc~ z + dn~) ig, (dc~ c_{t-1} + dn~ n_{t-1}) fg sigmoid(-f), dc~ ig (1 - z^2), dy~ (c / n) o (1 - o)]
    dh <- sum_g R_g draw_g;  dc <- dc~ fg;  dn <- dn~ fg;  dR_g = sum_{b, t} h_{t-1}^T draw_g (the launcher)

Layout (as the C++ kernels, csrc/slstm.cpp): wx (B, T, 4 D) [i | f | z | o] with D = H Dh, contiguous; R (4, H, Dh, Dh)
float32 contiguous; the state (B, D) float32. The forward saves every step's (h, c, n, m) into states (B, T, 4, D)
and the activated gates (ig, fg, tanh z, sigmoid o, sigmoid(-f)) into gates (B, T, 5, D), float32. One program per
(batch, head) walks the sequence with its h, c, n, m (BLOCK = Dh rounded up to a power of two, masked) in registers;
each step reads the head's four R blocks (from cache after the first step: 16 Dh^2 bytes per program) and does the
matvecs as broadcast products reduced over the block. The backward writes the pre-activation gradient in float32
(B, T, 4 D); the launcher casts it to wx's dtype and forms dR as one batched matmul of it with the saved h_{t-1}
(deterministic, and the (4, Dh, Dh) accumulator never sits in a program's registers).
"""
import torch
import triton
import triton.language as tl

TILE = 1024  # elements of a (BLOCK_K, BLOCK_J) block of R

def _blocks(dh: int):
    """(BLOCK_K, BLOCK_J, num_warps): the head rounded up to a power of two, the column block (a (BLOCK_K, BLOCK_J) R
    tile of at most TILE elements: the four gates' tiles are 64 registers a thread at 2 warps) and the warps."""
    block_k = triton.next_power_of_2(max(dh, 1))
    block_j = max(1, min(block_k, TILE // block_k))
    return block_k, block_j, max(1, min(2, block_k * block_j // 256))


# The per-step math is written out in the loops (no @triton.jit helpers: under the interpreter every call of a jit
# function re-patches triton.language, which costs more than the step's arithmetic). tanh(x) = 1 - 2 / (e^{2x} + 1)
# is exact at both tails; logsigmoid(f) = min(f, 0) - log(1 + e^{-|f|}) never overflows.
#
# A step walks the head's columns in blocks of BLOCK_J: the four (Dh, Dh) blocks of R do not fit a program's
# registers at xLSTM's head sizes (and the compiler would keep them there across the steps, loop-invariant, and
# spill). So the state between steps lives in memory, not registers: the forward reads h_{t-1} (all Dh, the rows of
# R) and the column block's c, n, m from the previous step's saved states (the initial state at t = 0); the backward
# keeps its adjoint (dh, dc, dn) in the dh0, dc0, dn0 outputs, which hold the final result after the first step.
# A barrier ends each step: its writes are read by other threads in the next. (A scalar condition goes through
# tl.where, never into a load mask: the interpreter takes only tensor masks.)
@triton.jit
def _slstm_fwd_kernel(
    WX, R, H0, C0, N0, M0, Y, ST, GA, T, H, Dh,
    HAS_H0: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    hd = bh % H
    D = H * Dh
    gs = H * Dh * Dh                 # R[g + 1] - R[g]
    ok = tl.arange(0, BLOCK_K)
    mk = ok < Dh
    head = b * D + hd * Dh           # this head's offset in a (B, D) state
    x_p = WX + b * T * 4 * D + hd * Dh
    y_p = Y + b * T * D + hd * Dh
    st_p = ST + b * T * 4 * D + hd * Dh
    ga_p = GA + b * T * 5 * D + hd * Dh
    for t in range(0, T):
        tp = tl.maximum(t - 1, 0)
        hk = tl.load(st_p + tp * 4 * D + ok, mask=mk, other=0.0)
        if HAS_H0:
            hk = tl.where(t > 0, hk, tl.load(H0 + head + ok, mask=mk, other=0.0))
        else:
            hk = tl.where(t > 0, hk, 0.0)
        hk = hk[:, None]
        for j0 in range(0, Dh, BLOCK_J):
            oj = j0 + tl.arange(0, BLOCK_J)
            mj = oj < Dh
            r_p = R + hd * Dh * Dh + ok[:, None] * Dh + oj[None, :]
            rmask = mk[:, None] & mj[None, :]
            c = tl.load(st_p + tp * 4 * D + D + oj, mask=mj, other=0.0)
            n = tl.load(st_p + tp * 4 * D + 2 * D + oj, mask=mj, other=0.0)
            m = tl.load(st_p + tp * 4 * D + 3 * D + oj, mask=mj, other=0.0)
            if HAS_H0:
                c = tl.where(t > 0, c, tl.load(C0 + head + oj, mask=mj, other=0.0))
                n = tl.where(t > 0, n, tl.load(N0 + head + oj, mask=mj, other=0.0))
                m = tl.where(t > 0, m, tl.load(M0 + head + oj, mask=mj, other=float("-inf")))
            else:
                c = tl.where(t > 0, c, 0.0)
                n = tl.where(t > 0, n, 0.0)
                m = tl.where(t > 0, m, float("-inf"))
            xt = x_p + t * 4 * D + oj
            iv = tl.load(xt, mask=mj, other=0.0).to(tl.float32) + tl.sum(hk * tl.load(r_p, mask=rmask, other=0.0), 0)
            fv = tl.load(xt + D, mask=mj, other=0.0).to(tl.float32) \
                + tl.sum(hk * tl.load(r_p + gs, mask=rmask, other=0.0), 0)
            zv = tl.load(xt + 2 * D, mask=mj, other=0.0).to(tl.float32) \
                + tl.sum(hk * tl.load(r_p + 2 * gs, mask=rmask, other=0.0), 0)
            ov = tl.load(xt + 3 * D, mask=mj, other=0.0).to(tl.float32) \
                + tl.sum(hk * tl.load(r_p + 3 * gs, mask=rmask, other=0.0), 0)
            z = 1.0 - 2.0 / (tl.exp(2.0 * zv) + 1.0)
            o = 1.0 / (1.0 + tl.exp(-ov))
            lf = tl.minimum(fv, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fv)))
            mn = tl.maximum(iv, lf + m)
            ig = tl.exp(iv - mn)
            fg = tl.exp(lf + m - mn)
            c = fg * c + ig * z
            n = fg * n + ig
            h = o * c / n
            tl.store(y_p + t * D + oj, h.to(Y.dtype.element_ty), mask=mj)
            so = st_p + t * 4 * D + oj
            tl.store(so, h, mask=mj)
            tl.store(so + D, c, mask=mj)
            tl.store(so + 2 * D, n, mask=mj)
            tl.store(so + 3 * D, mn, mask=mj)
            go = ga_p + t * 5 * D + oj
            tl.store(go, ig, mask=mj)
            tl.store(go + D, fg, mask=mj)
            tl.store(go + 2 * D, z, mask=mj)
            tl.store(go + 3 * D, o, mask=mj)
            tl.store(go + 4 * D, 1.0 / (1.0 + tl.exp(fv)), mask=mj)
        tl.debug_barrier()  # the step's states are written before the next step reads them


@triton.jit
def _slstm_bwd_kernel(
    DY, R, C0, N0, ST, GA, DHT, DCT, DNT, DRAW, DH0, DC0, DN0, T, H, Dh,
    HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, HAS_DCT: tl.constexpr, HAS_DNT: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b = bh // H
    hd = bh % H
    D = H * Dh
    gs = H * Dh * Dh
    ok = tl.arange(0, BLOCK_K)
    mk = ok < Dh
    head = b * D + hd * Dh
    # the adjoint of the final state into dh0, dc0, dn0 (zeros for a final state that takes no gradient)
    if HAS_DHT:
        tl.store(DH0 + head + ok, tl.load(DHT + head + ok, mask=mk, other=0.0), mask=mk)
    else:
        tl.store(DH0 + head + ok, tl.zeros([BLOCK_K], dtype=tl.float32), mask=mk)
    if HAS_DCT:
        tl.store(DC0 + head + ok, tl.load(DCT + head + ok, mask=mk, other=0.0), mask=mk)
    else:
        tl.store(DC0 + head + ok, tl.zeros([BLOCK_K], dtype=tl.float32), mask=mk)
    if HAS_DNT:
        tl.store(DN0 + head + ok, tl.load(DNT + head + ok, mask=mk, other=0.0), mask=mk)
    else:
        tl.store(DN0 + head + ok, tl.zeros([BLOCK_K], dtype=tl.float32), mask=mk)
    tl.debug_barrier()
    dy_p = DY + b * T * D + hd * Dh
    st_p = ST + b * T * 4 * D + hd * Dh
    ga_p = GA + b * T * 5 * D + hd * Dh
    dr_p = DRAW + b * T * 4 * D + hd * Dh
    for tt in range(0, T):
        t = T - 1 - tt
        tp = tl.maximum(t - 1, 0)
        dhk = tl.zeros([BLOCK_K], dtype=tl.float32)  # the adjoint of h_{t-1}: sum_g R_g draw_g over the columns
        for j0 in range(0, Dh, BLOCK_J):
            oj = j0 + tl.arange(0, BLOCK_J)
            mj = oj < Dh
            r_p = R + hd * Dh * Dh + ok[:, None] * Dh + oj[None, :]
            rmask = mk[:, None] & mj[None, :]
            so = st_p + t * 4 * D + oj
            c = tl.load(so + D, mask=mj, other=0.0)
            n = tl.load(so + 2 * D, mask=mj, other=1.0)
            go = ga_p + t * 5 * D + oj
            ig = tl.load(go, mask=mj, other=0.0)
            fg = tl.load(go + D, mask=mj, other=0.0)
            z = tl.load(go + 2 * D, mask=mj, other=0.0)
            o = tl.load(go + 3 * D, mask=mj, other=0.0)
            sf = tl.load(go + 4 * D, mask=mj, other=0.0)
            cp = tl.load(st_p + tp * 4 * D + D + oj, mask=mj, other=0.0)
            np_ = tl.load(st_p + tp * 4 * D + 2 * D + oj, mask=mj, other=0.0)
            if HAS_H0:
                cp = tl.where(t > 0, cp, tl.load(C0 + head + oj, mask=mj, other=0.0))
                np_ = tl.where(t > 0, np_, tl.load(N0 + head + oj, mask=mj, other=0.0))
            else:
                cp = tl.where(t > 0, cp, 0.0)
                np_ = tl.where(t > 0, np_, 0.0)
            dyt = tl.load(dy_p + t * D + oj, mask=mj, other=0.0).to(tl.float32) \
                + tl.load(DH0 + head + oj, mask=mj, other=0.0)
            dct = tl.load(DC0 + head + oj, mask=mj, other=0.0) + dyt * o / n
            dnt = tl.load(DN0 + head + oj, mask=mj, other=0.0) - dyt * o * c / (n * n)
            d_i = (dct * z + dnt) * ig
            d_f = (dct * cp + dnt * np_) * fg * sf
            d_z = dct * ig * (1.0 - z * z)
            d_o = dyt * c / n * o * (1.0 - o)
            do = dr_p + t * 4 * D + oj
            tl.store(do, d_i, mask=mj)
            tl.store(do + D, d_f, mask=mj)
            tl.store(do + 2 * D, d_z, mask=mj)
            tl.store(do + 3 * D, d_o, mask=mj)
            tl.store(DC0 + head + oj, dct * fg, mask=mj)
            tl.store(DN0 + head + oj, dnt * fg, mask=mj)
            dhk += tl.sum(tl.load(r_p, mask=rmask, other=0.0) * d_i[None, :], 1)
            dhk += tl.sum(tl.load(r_p + gs, mask=rmask, other=0.0) * d_f[None, :], 1)
            dhk += tl.sum(tl.load(r_p + 2 * gs, mask=rmask, other=0.0) * d_z[None, :], 1)
            dhk += tl.sum(tl.load(r_p + 3 * gs, mask=rmask, other=0.0) * d_o[None, :], 1)
        tl.debug_barrier()  # every column block has read the old dh before it is overwritten
        tl.store(DH0 + head + ok, dhk, mask=mk)
        tl.debug_barrier()  # the step's adjoint is written before the next step reads it


def slstm_fwd(wx, R, h0, c0, n0, m0):
    """y, states, gates of the sLSTM scan (module docstring). wx (B, T, 4 D) dtype X contiguous, R (4, H, Dh, Dh)
    float32 contiguous, h0, c0, n0, m0 (B, D) float32 contiguous or all None -> y (B, T, D) X, states (B, T, 4, D)
    and gates (B, T, 5, D) float32. Moves wx and y once, writes 9 B T D * 4 bytes of saved states and gates, and
    reads R (16 H Dh^2 bytes) once per program and step, from cache after the first."""
    B, T, D4 = wx.shape
    _, H, Dh, _ = R.shape
    D = D4 // 4
    dev, f32 = wx.device, torch.float32
    y = torch.empty((B, T, D), dtype=wx.dtype, device=dev)
    states = torch.empty((B, T, 4, D), dtype=f32, device=dev)
    gates = torch.empty((B, T, 5, D), dtype=f32, device=dev)
    if B * T * D > 0:
        block_k, block_j, warps = _blocks(Dh)
        _slstm_fwd_kernel[(B * H,)](wx, R, h0, c0, n0, m0, y, states, gates, T, H, Dh,
                                    HAS_H0=h0 is not None, BLOCK_K=block_k, BLOCK_J=block_j, num_warps=warps,
                                    num_stages=1)
    return y, states, gates


def slstm_bwd(dy, wx, R, h0, c0, n0, m0, states, gates, dhT, dcT, dnT):
    """Gradients of the sLSTM scan (module docstring): dy (B, T, D) X contiguous, the forward's inputs and saved
    states and gates, dhT, dcT, dnT (B, D) float32 or None (the gradient reaching the final state) -> dwx (B, T, 4 D)
    X, dR (4, H, Dh, Dh) float32, dh0, dc0, dn0 (B, D) float32. Moves dy, states and gates once, writes the float32
    pre-activation gradient (4 B T D * 4 bytes) that the cast and the dR matmul (8 B T D Dh flops) read back."""
    B, T, D4 = wx.shape
    _, H, Dh, _ = R.shape
    D = D4 // 4
    dev, f32 = wx.device, torch.float32
    draw = torch.empty((B, T, 4, D), dtype=f32, device=dev)
    dh0, dc0, dn0 = (torch.empty((B, D), dtype=f32, device=dev) for _ in range(3))
    if B * T * D > 0:
        block_k, block_j, warps = _blocks(Dh)
        _slstm_bwd_kernel[(B * H,)](dy, R, c0, n0, states, gates, dhT, dcT, dnT, draw, dh0, dc0, dn0, T, H, Dh,
                                    HAS_H0=h0 is not None, HAS_DHT=dhT is not None, HAS_DCT=dcT is not None,
                                    HAS_DNT=dnT is not None, BLOCK_K=block_k, BLOCK_J=block_j, num_warps=warps,
                                    num_stages=1)
    # dR_g[head] = sum over (b, t) of h_{t-1}^T draw_g, h_{-1} = h0 (zeros without it)
    first = (torch.zeros((B, D), dtype=f32, device=dev) if h0 is None else h0).unsqueeze(1)
    hprev = torch.cat([first, states[:, :-1, 0]], 1).view(B * T, H, Dh)
    dR = torch.einsum("nhk,nghj->ghkj", hprev, draw.view(B * T, 4, H, Dh))
    return draw.view(B, T, D4).to(wx.dtype), dR, dh0, dc0, dn0


def slstm_step(wx, R, h, c, n, m):
    """One decoding step: wx (B, 4 D) X, R (4, H, Dh, Dh) float32, the state h, c, n, m (B, D) float32 contiguous ->
    y (B, D) X and the new (h, c, n, m) (the forward kernel on a one-step sequence)."""
    y, states, _ = slstm_fwd(wx.unsqueeze(1), R, h, c, n, m)
    return (y[:, 0], *(states[:, 0, j].contiguous() for j in range(4)))
