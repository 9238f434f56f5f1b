"""xLSTM's mLSTM cell in the chunkwise-parallel form: forward, backward and the decoding step (the recurrence and its
conventions are in tritium.ops.mlstm). Per (batch, head), the state before a chunk (C (DK, DV), n (DK), m) and the
chunk's L steps (F the cumulative logsigmoid(f) from the chunk's start, q scaled):

    D_ts = F_t - F_s + i_s (s <= t);  m_t = max(F_t + m, max_s D_ts);  g_t = exp(F_t + m - m_t)
    P = exp(D - m_t) * (Q K^T);  num = g (Q C) + P V;  den = g (Q n) + rowsum(P)
    h = num / (max(|den|, e^{-m_t}) + eps)
    the chunk's end: a_s = F_L - F_s + i_s, m' = max(F_L + m, max a), w = e^{a - m'},
    C' = e^{F_L + m - m'} C + (w K)^T V

Backward (m a stabiliser: no gradient through it), with (dC, dn) the adjoint of the state after the chunk:
    dnum = dh / z;  dden = -(dh . num) / z^2 sign(den) where |den| >= e^{-m_t};  dP = dnum V^T + dden
    dQ = (dP E) K + g (dnum C^T + dden n);  dK = (dP E)^T Q + w (V dC^T + dn);  dV = P^T dnum + w K dC
    dD = dP P: di = colsum(dD) + da, dF = rowsum(dD) - colsum(dD) - da (+ the chunk end's terms at F_L), with
    da = w (K . (V dC^T) + K . dn); then (dC, dn) <- e^{F_L + m - m'} (dC, dn) + (g Q)^T (dnum, dden);
    dlogf = the reverse cumulative sum of dF, df = dlogf sigmoid(-f).

Layout: q, k (B, H, T, DK), v and dh (B, H, T, DV), i, f (B, H, T), all contiguous; the states (B, H, nchunks + 1,
DK, DV) / (.., DK) / (..) float32 (the state before each chunk, the last the final state). The state's DV columns
are independent but for n and den (which need only q, k and the gates): the forward runs one program per (block of
BLOCK_DV columns, batch, head), carrying its (BLOCK_DK, BLOCK_DV) share of C in registers through the chunks and
computing n and den in each (every program writes the same ns and ms). The backward runs one program per (batch,
head) and walks the column blocks within each chunk twice (first the row sums dh . num that den's adjoint needs, then
the rest), keeping dC in the dC0 output (its final value there) and dn in registers; the cross-block sums (dP, dq,
the (L, DK) dC v_s) accumulate in registers. A chunk is a few tl.dot products of (L, D) tiles (L = the chunk, a power
of two >= 16; the op takes 16 on CUDA, ops.mlstm.mlstm_chunk), float32 throughout (16-bit inputs widened on load).
"""
import torch
import triton
import triton.language as tl

# Column blocks of 16 and 8 warps: at head size 64 and chunk 16 a program's (L, DK) tiles, the (L, L) gate and score
# matrices and its share of the state fit the register file on sm_80 / sm_90 (wider blocks or chunks spill).
BLOCK_V = 16
NUM_WARPS = 8


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


@triton.jit
def _mlstm_fwd_kernel(
    Q, Kt, V, I, Fg, C0, N0, M0, H_out, CS, NS, MS,
    T, DK, DV, scale, eps, nchunks,
    HAS_H0: tl.constexpr, CH: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    ok = tl.arange(0, BLOCK_DK)
    ov = tl.program_id(0) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    ol = tl.arange(0, CH)
    mk = ok < DK
    mv = ov < DV
    kv = ok[:, None] * DV + ov[None, :]
    mkv = mk[:, None] & mv[None, :]
    if HAS_H0:
        C = tl.load(C0 + bh * DK * DV + kv, mask=mkv, other=0.0)
        n = tl.load(N0 + bh * DK + ok, mask=mk, other=0.0)
        m = tl.load(M0 + bh)
    else:
        C = tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32)
        n = tl.zeros([BLOCK_DK], dtype=tl.float32)
        m = tl.sum(tl.zeros([BLOCK_DK], dtype=tl.float32), 0)
    causal = ol[:, None] >= ol[None, :]
    for c in range(0, nchunks):
        tl.store(CS + (bh * (nchunks + 1) + c) * DK * DV + kv, C, mask=mkv)
        tl.store(NS + (bh * (nchunks + 1) + c) * DK + ok, n, mask=mk)
        tl.store(MS + bh * (nchunks + 1) + c, m)
        t = c * CH + ol
        mt_ = t < T
        row = bh * T + t
        q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mt_[:, None] & mk[None, :], other=0.0).to(tl.float32)
        q = q * scale
        k = tl.load(Kt + row[:, None] * DK + ok[None, :], mask=mt_[:, None] & mk[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + row[:, None] * DV + ov[None, :], mask=mt_[:, None] & mv[None, :], other=0.0).to(tl.float32)
        ig = tl.load(I + row, mask=mt_, other=0.0).to(tl.float32)
        fg = tl.load(Fg + row, mask=mt_, other=0.0).to(tl.float32)
        logf = tl.where(mt_, tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg))), 0.0)
        ig = tl.where(mt_, ig, float("-inf"))
        F = tl.cumsum(logf, 0)
        D = tl.where(causal, F[:, None] - F[None, :] + ig[None, :], float("-inf"))
        mrow = tl.maximum(F + m, tl.max(D, 1))
        E = tl.exp(D - mrow[:, None])
        P = E * tl.dot(q, tl.trans(k), input_precision="ieee")
        g = tl.exp(F + m - mrow)
        num = g[:, None] * tl.dot(q, C, input_precision="ieee") + tl.dot(P, v, input_precision="ieee")
        den = g * tl.sum(q * n[None, :], 1) + tl.sum(P, 1)
        z = tl.maximum(tl.abs(den), tl.exp(-mrow)) + eps
        h = num / z[:, None]
        tl.store(H_out + row[:, None] * DV + ov[None, :], h.to(H_out.dtype.element_ty), mask=mt_[:, None] & mv[None, :])
        FL = tl.sum(logf, 0)
        a = FL - F + ig
        mnew = tl.maximum(FL + m, tl.max(a, 0))
        G = tl.exp(FL + m - mnew)
        w = tl.exp(a - mnew)
        kw = k * w[:, None]
        C = G * C + tl.dot(tl.trans(kw), v, input_precision="ieee")
        n = G * n + tl.sum(kw, 0)
        m = mnew
    tl.store(CS + (bh * (nchunks + 1) + nchunks) * DK * DV + kv, C, mask=mkv)
    tl.store(NS + (bh * (nchunks + 1) + nchunks) * DK + ok, n, mask=mk)
    tl.store(MS + bh * (nchunks + 1) + nchunks, m)


@triton.jit
def _mlstm_bwd_kernel(
    DH, Q, Kt, V, I, Fg, CS, NS, MS, DCT, DNT, DQ, DK_, DV_, DI, DF, DC0, DN0,
    T, DK, DV, scale, eps, nchunks,
    HAS_DCT: tl.constexpr, HAS_DNT: tl.constexpr, CH: tl.constexpr, BLOCK_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    ok = tl.arange(0, BLOCK_DK)
    ol = tl.arange(0, CH)
    mk = ok < DK
    # the state's adjoint dC lives in DC0 (its final value the result), updated one value block at a time
    for v0 in range(0, DV, BLOCK_DV):
        ov = v0 + tl.arange(0, BLOCK_DV)
        kv = ok[:, None] * DV + ov[None, :]
        mkv = mk[:, None] & (ov < DV)[None, :]
        if HAS_DCT:
            tl.store(DC0 + bh * DK * DV + kv, tl.load(DCT + bh * DK * DV + kv, mask=mkv, other=0.0), mask=mkv)
        else:
            tl.store(DC0 + bh * DK * DV + kv, tl.zeros([BLOCK_DK, BLOCK_DV], dtype=tl.float32), mask=mkv)
    if HAS_DNT:
        dn = tl.load(DNT + bh * DK + ok, mask=mk, other=0.0)
    else:
        dn = tl.zeros([BLOCK_DK], dtype=tl.float32)
    tl.debug_barrier()  # dC's first value is written before any thread reads it
    causal = ol[:, None] >= ol[None, :]
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        n = tl.load(NS + (bh * (nchunks + 1) + c) * DK + ok, mask=mk, other=0.0)
        m = tl.load(MS + bh * (nchunks + 1) + c)
        t = c * CH + ol
        mt_ = t < T
        row = bh * T + t
        mtk = mt_[:, None] & mk[None, :]
        q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32) * scale
        k = tl.load(Kt + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32)
        ig = tl.load(I + row, mask=mt_, other=0.0).to(tl.float32)
        fg = tl.load(Fg + row, mask=mt_, other=0.0).to(tl.float32)
        logf = tl.where(mt_, tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg))), 0.0)
        ig = tl.where(mt_, ig, float("-inf"))
        F = tl.cumsum(logf, 0)
        D = tl.where(causal, F[:, None] - F[None, :] + ig[None, :], float("-inf"))
        mrow = tl.maximum(F + m, tl.max(D, 1))
        E = tl.exp(D - mrow[:, None])
        P = E * tl.dot(q, tl.trans(k), input_precision="ieee")
        g = tl.exp(F + m - mrow)
        qn = tl.sum(q * n[None, :], 1)
        den = g * qn + tl.sum(P, 1)
        z = tl.maximum(tl.abs(den), tl.exp(-mrow)) + eps
        FL = tl.sum(logf, 0)
        a = FL - F + ig
        mnew = tl.maximum(FL + m, tl.max(a, 0))
        G = tl.exp(FL + m - mnew)
        w = tl.exp(a - mnew)
        # first walk over the value blocks: the output's row sums dh . num, for the adjoint of den
        sdn = tl.zeros([CH], dtype=tl.float32)
        for v0 in range(0, DV, BLOCK_DV):
            ov = v0 + tl.arange(0, BLOCK_DV)
            mv = ov < DV
            kv = ok[:, None] * DV + ov[None, :]
            mtv = mt_[:, None] & mv[None, :]
            C = tl.load(CS + (bh * (nchunks + 1) + c) * DK * DV + kv, mask=mk[:, None] & mv[None, :], other=0.0)
            v = tl.load(V + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            dh = tl.load(DH + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            num = g[:, None] * tl.dot(q, C, input_precision="ieee") + tl.dot(P, v, input_precision="ieee")
            sdn += tl.sum(dh * num, 1)
        dz = -sdn / (z * z)
        dden = tl.where(tl.abs(den) >= tl.exp(-mrow), tl.where(den >= 0, dz, -dz), 0.0)
        # second walk: everything the value columns contribute, and the value-side gradients and dC block by block
        dP = tl.zeros([CH, CH], dtype=tl.float32) + dden[:, None]
        dq = (g * dden)[:, None] * n[None, :]
        dF = g * dden * qn
        dFL = G * tl.sum(dn * n, 0)
        vdc = tl.zeros([CH, BLOCK_DK], dtype=tl.float32)   # (L, DK): dC v_s, with dC the adjoint after the chunk
        gq = q * g[:, None]
        for v0 in range(0, DV, BLOCK_DV):
            ov = v0 + tl.arange(0, BLOCK_DV)
            mv = ov < DV
            kv = ok[:, None] * DV + ov[None, :]
            mkv = mk[:, None] & mv[None, :]
            mtv = mt_[:, None] & mv[None, :]
            C = tl.load(CS + (bh * (nchunks + 1) + c) * DK * DV + kv, mask=mkv, other=0.0)
            dC = tl.load(DC0 + bh * DK * DV + kv, mask=mkv, other=0.0)
            v = tl.load(V + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            dh = tl.load(DH + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            qC = tl.dot(q, C, input_precision="ieee")
            dnum = dh / z[:, None]
            dP += tl.dot(dnum, tl.trans(v), input_precision="ieee")
            dq += g[:, None] * tl.dot(dnum, tl.trans(C), input_precision="ieee")
            dF += g * tl.sum(dnum * qC, 1)
            dFL += G * tl.sum(tl.sum(dC * C, 1), 0)
            vdc += tl.dot(v, tl.trans(dC), input_precision="ieee")
            dv = tl.dot(tl.trans(P), dnum, input_precision="ieee") + w[:, None] * tl.dot(k, dC, input_precision="ieee")
            tl.store(DV_ + row[:, None] * DV + ov[None, :], dv.to(DV_.dtype.element_ty), mask=mtv)
            tl.store(DC0 + bh * DK * DV + kv, G * dC + tl.dot(tl.trans(gq), dnum, input_precision="ieee"), mask=mkv)
        # within the chunk
        dS = dP * E
        dD = dP * P
        dq += tl.dot(dS, k, input_precision="ieee")
        dk = tl.dot(tl.trans(dS), q, input_precision="ieee")
        di = tl.sum(dD, 0)
        dF += tl.sum(dD, 1) - tl.sum(dD, 0)
        # the move to the chunk's end, with the adjoint (dC, dn) of the state after it
        da = w * (tl.sum(k * vdc, 1) + tl.sum(k * dn[None, :], 1))
        dk += w[:, None] * (vdc + dn[None, :])
        di += da
        dF -= da
        dFL += tl.sum(da, 0)
        last = tl.minimum(T - c * CH, CH) - 1
        dF += tl.where(ol == last, dFL, 0.0)
        dn = G * dn + tl.sum(gq * dden[:, None], 0)
        dlogf = tl.sum(dF, 0) - tl.cumsum(dF, 0) + dF
        df = dlogf / (1.0 + tl.exp(fg))
        tl.store(DQ + row[:, None] * DK + ok[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mtk)
        tl.store(DK_ + row[:, None] * DK + ok[None, :], dk.to(DK_.dtype.element_ty), mask=mtk)
        tl.store(DI + row, di.to(DI.dtype.element_ty), mask=mt_)
        tl.store(DF + row, df.to(DF.dtype.element_ty), mask=mt_)
        tl.debug_barrier()  # the chunk's dC is written before the next chunk reads it
    tl.store(DN0 + bh * DK + ok, dn, mask=mk)


def _chunk_for_triton(chunk: int) -> int:
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"mlstm (Triton): chunk must be a power of two >= 16, got {chunk}")
    return chunk


def mlstm_fwd(q, k, v, i, f, scale: float, eps: float, C0, n0, m0, chunk: int):
    """h, Cs, ns, ms of the chunkwise mLSTM (module docstring). q, k (B, H, T, DK), v (B, H, T, DV), i, f (B, H, T)
    dtype X contiguous; C0, n0, m0 float32 contiguous or None -> h (B, H, T, DV) X, the states before every chunk
    and the final one: Cs (B, H, nchunks + 1, DK, DV), ns (.., DK), ms (..) float32. Moves the inputs once and
    B H (nchunks + 1) (DK DV + DK + 1) * 4 bytes of states."""
    CH = _chunk_for_triton(chunk)
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    nc = triton.cdiv(T, CH)
    dev, f32 = q.device, torch.float32
    h = torch.empty((B, H, T, DV), dtype=v.dtype, device=dev)
    Cs = torch.empty((B, H, nc + 1, DK, DV), dtype=f32, device=dev)
    ns = torch.empty((B, H, nc + 1, DK), dtype=f32, device=dev)
    ms = torch.empty((B, H, nc + 1), dtype=f32, device=dev)
    if B * H * T * DK * DV > 0:
        block_dv = min(_block(DV), BLOCK_V)
        _mlstm_fwd_kernel[(triton.cdiv(DV, block_dv), B * H)](
            q, k, v, i, f, C0, n0, m0, h, Cs, ns, ms, T, DK, DV, float(scale), float(eps), nc,
            HAS_H0=C0 is not None, CH=CH, BLOCK_DK=_block(DK), BLOCK_DV=block_dv, num_warps=NUM_WARPS)
    return h, Cs, ns, ms


def mlstm_bwd(dh, q, k, v, i, f, scale: float, eps: float, Cs, ns, ms, chunk: int, dCT, dnT):
    """Gradients of the chunkwise mLSTM (module docstring): dh like h (contiguous), the forward's inputs and states,
    dCT / dnT the final state's gradient (float32 or None) -> dq, dk, dv, di, df (X) and dC0, dn0 (float32).
    Moves the inputs and dh once, the saved states once."""
    CH = _chunk_for_triton(chunk)
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    nc = Cs.shape[2] - 1
    dev, f32 = q.device, torch.float32
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    di, df = torch.empty_like(i), torch.empty_like(f)
    launch = B * H * T * DK * DV > 0
    dC0 = (torch.empty if launch else torch.zeros)((B, H, DK, DV), dtype=f32, device=dev)  # the kernel works in it
    dn0 = torch.zeros((B, H, DK), dtype=f32, device=dev)
    if launch:
        _mlstm_bwd_kernel[(B * H,)](
            dh, q, k, v, i, f, Cs, ns, ms, dCT, dnT, dq, dk, dv, di, df, dC0, dn0,
            T, DK, DV, float(scale), float(eps), nc,
            HAS_DCT=dCT is not None, HAS_DNT=dnT is not None, CH=CH, BLOCK_DK=_block(DK),
            BLOCK_DV=min(_block(DV), BLOCK_V), num_warps=NUM_WARPS)
    return dq, dk, dv, di, df, dC0, dn0


def mlstm_step(q, k, v, i, f, C, n, m, scale: float, eps: float):
    """One decoding step: q, k (B, H, DK), v (B, H, DV), i, f (B, H) X; the state (C, n, m) float32 -> h (B, H, DV)
    X and the new state (the forward kernel on a one-step sequence, one chunk)."""
    h, Cs, ns, ms = mlstm_fwd(*(t.unsqueeze(2) for t in (q, k, v, i, f)), scale, eps, C, n, m, 16)
    return h[:, :, 0], Cs[:, :, -1].contiguous(), ns[:, :, -1].contiguous(), ms[:, :, -1].contiguous()
