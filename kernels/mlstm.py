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
BLOCK_DV columns, batch, head) and computes n and den in each (every program writes the same ns and ms). Neither
kernel holds a whole (DK, BLOCK_DV) state in registers (at DK = 128 that spills): the state lives in the saved
states themselves (the forward reads the chunk's C from Cs, written the chunk before, and writes the next one), and
every product over DK runs over key blocks of BLOCK_K rows, summing (L, L) and (L, BLOCK_DV) tiles. The backward runs
one program per (batch, head), keeps the state's adjoint (dC, dn) in the dC0 / dn0 outputs (their final values there)
and walks each chunk three times: the value blocks for the row sums dh . num that den's adjoint needs, the value
blocks again for dP, the gates' terms and dv (dC still the adjoint after the chunk), then the key blocks (the value
blocks within each) for dq, dk, the (L, BLOCK_K) dC v_s and the adjoint before the chunk. A chunk is a few tl.dot
products of (L, D) tiles (L = the chunk, a power of two >= 16; the op takes 16 on CUDA, ops.mlstm.mlstm_chunk),
float32 throughout (16-bit inputs widened on load).
"""
import torch
import triton
import triton.language as tl

# Key blocks of at most 64 rows, column blocks of 16, no software pipelining (its staged copies cost registers), 4
# warps in the forward and 8 in the backward: a program's (L, BLOCK_K) tiles, the (L, L) gate and score matrices and
# one (BLOCK_K, BLOCK_DV) block of the state fit the register file on sm_80 / sm_90 at any head size (the whole
# (DK, BLOCK_DV) state in registers spills at DK = 128 on sm_90).
BLOCK_V = 16
BLOCK_K = 64
NUM_WARPS = 8
FWD_WARPS = 4
NUM_STAGES = 1


def _block(d: int) -> int:
    return max(16, triton.next_power_of_2(max(d, 1)))


@triton.jit
def _mlstm_fwd_kernel(
    Q, Kt, V, I, Fg, C0, N0, M0, H_out, CS, NS, MS,
    T, DK, DV, scale, eps, nchunks,
    HAS_H0: tl.constexpr, CH: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    ov = tl.program_id(0) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    ol = tl.arange(0, CH)
    mv = ov < DV
    # the state before the first chunk into CS[0] / NS[0] / MS[0] (this program's columns of C, all of n)
    for k0 in range(0, DK, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = ok < DK
        kv = ok[:, None] * DV + ov[None, :]
        mkv = mk[:, None] & mv[None, :]
        if HAS_H0:
            C = tl.load(C0 + bh * DK * DV + kv, mask=mkv, other=0.0)
            n = tl.load(N0 + bh * DK + ok, mask=mk, other=0.0)
        else:
            C = tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32)
            n = tl.zeros([BLOCK_K], dtype=tl.float32)
        tl.store(CS + bh * (nchunks + 1) * DK * DV + kv, C, mask=mkv)
        tl.store(NS + bh * (nchunks + 1) * DK + ok, n, mask=mk)
    if HAS_H0:
        m = tl.load(M0 + bh)
    else:
        m = 0.0
    tl.store(MS + bh * (nchunks + 1), m)
    causal = ol[:, None] >= ol[None, :]
    for c in range(0, nchunks):
        tl.debug_barrier()  # the state before the chunk is written (CS[c], NS[c]) before any thread reads it
        t = c * CH + ol
        mt_ = t < T
        row = bh * T + t
        v = tl.load(V + row[:, None] * DV + ov[None, :], mask=mt_[:, None] & mv[None, :], other=0.0).to(tl.float32)
        ig = tl.load(I + row, mask=mt_, other=0.0).to(tl.float32)
        fg = tl.load(Fg + row, mask=mt_, other=0.0).to(tl.float32)
        logf = tl.where(mt_, tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg))), 0.0)
        ig = tl.where(mt_, ig, float("-inf"))
        F = tl.cumsum(logf, 0)
        D = tl.where(causal, F[:, None] - F[None, :] + ig[None, :], float("-inf"))
        mrow = tl.maximum(F + m, tl.max(D, 1))
        E = tl.exp(D - mrow[:, None])
        g = tl.exp(F + m - mrow)
        FL = tl.sum(logf, 0)
        a = FL - F + ig
        mnew = tl.maximum(FL + m, tl.max(a, 0))
        G = tl.exp(FL + m - mnew)
        w = tl.exp(a - mnew)
        # the key blocks: Q K^T, Q C and Q n from the state before the chunk, then the state after it
        qk = tl.zeros([CH, CH], dtype=tl.float32)
        qC = tl.zeros([CH, BLOCK_DV], dtype=tl.float32)
        qn = tl.zeros([CH], dtype=tl.float32)
        for k0 in range(0, DK, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            mk = ok < DK
            kv = ok[:, None] * DV + ov[None, :]
            mkv = mk[:, None] & mv[None, :]
            mtk = mt_[:, None] & mk[None, :]
            q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32) * scale
            k = tl.load(Kt + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32)
            C = tl.load(CS + (bh * (nchunks + 1) + c) * DK * DV + kv, mask=mkv, other=0.0)
            n = tl.load(NS + (bh * (nchunks + 1) + c) * DK + ok, mask=mk, other=0.0)
            qk += tl.dot(q, tl.trans(k), input_precision="ieee")
            qC += tl.dot(q, C, input_precision="ieee")
            qn += tl.sum(q * n[None, :], 1)
            kw = k * w[:, None]
            tl.store(CS + (bh * (nchunks + 1) + c + 1) * DK * DV + kv,
                     G * C + tl.dot(tl.trans(kw), v, input_precision="ieee"), mask=mkv)
            tl.store(NS + (bh * (nchunks + 1) + c + 1) * DK + ok, G * n + tl.sum(kw, 0), mask=mk)
        P = E * qk
        num = g[:, None] * qC + tl.dot(P, v, input_precision="ieee")
        den = g * qn + tl.sum(P, 1)
        z = tl.maximum(tl.abs(den), tl.exp(-mrow)) + eps
        h = num / z[:, None]
        tl.store(H_out + row[:, None] * DV + ov[None, :], h.to(H_out.dtype.element_ty), mask=mt_[:, None] & mv[None, :])
        m = mnew
        tl.store(MS + bh * (nchunks + 1) + c + 1, m)


@triton.jit
def _mlstm_bwd_kernel(
    DH, Q, Kt, V, I, Fg, CS, NS, MS, DCT, DNT, DQ, DK_, DV_, DI, DF, DC0, DN0,
    T, DK, DV, scale, eps, nchunks,
    HAS_DCT: tl.constexpr, HAS_DNT: tl.constexpr, CH: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    ol = tl.arange(0, CH)
    # the state's adjoint (dC, dn) lives in DC0 / DN0 (its final value the result), updated one block at a time
    for k0 in range(0, DK, BLOCK_K):
        ok = k0 + tl.arange(0, BLOCK_K)
        mk = ok < DK
        for v0 in range(0, DV, BLOCK_DV):
            ov = v0 + tl.arange(0, BLOCK_DV)
            kv = ok[:, None] * DV + ov[None, :]
            mkv = mk[:, None] & (ov < DV)[None, :]
            if HAS_DCT:
                tl.store(DC0 + bh * DK * DV + kv, tl.load(DCT + bh * DK * DV + kv, mask=mkv, other=0.0), mask=mkv)
            else:
                tl.store(DC0 + bh * DK * DV + kv, tl.zeros([BLOCK_K, BLOCK_DV], dtype=tl.float32), mask=mkv)
        if HAS_DNT:
            tl.store(DN0 + bh * DK + ok, tl.load(DNT + bh * DK + ok, mask=mk, other=0.0), mask=mk)
        else:
            tl.store(DN0 + bh * DK + ok, tl.zeros([BLOCK_K], dtype=tl.float32), mask=mk)
    causal = ol[:, None] >= ol[None, :]
    for cc in range(0, nchunks):
        tl.debug_barrier()  # (dC, dn) after the chunk is written before any thread reads it
        c = nchunks - 1 - cc
        m = tl.load(MS + bh * (nchunks + 1) + c)
        t = c * CH + ol
        mt_ = t < T
        row = bh * T + t
        ig = tl.load(I + row, mask=mt_, other=0.0).to(tl.float32)
        fg = tl.load(Fg + row, mask=mt_, other=0.0).to(tl.float32)
        logf = tl.where(mt_, tl.minimum(fg, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(fg))), 0.0)
        ig = tl.where(mt_, ig, float("-inf"))
        F = tl.cumsum(logf, 0)
        D = tl.where(causal, F[:, None] - F[None, :] + ig[None, :], float("-inf"))
        mrow = tl.maximum(F + m, tl.max(D, 1))
        E = tl.exp(D - mrow[:, None])
        g = tl.exp(F + m - mrow)
        FL = tl.sum(logf, 0)
        a = FL - F + ig
        mnew = tl.maximum(FL + m, tl.max(a, 0))
        G = tl.exp(FL + m - mnew)
        w = tl.exp(a - mnew)
        # key blocks: Q K^T, Q n and dn . n (dn the adjoint after the chunk)
        qk = tl.zeros([CH, CH], dtype=tl.float32)
        qn = tl.zeros([CH], dtype=tl.float32)
        dFL = tl.sum(tl.zeros([CH], dtype=tl.float32), 0)
        for k0 in range(0, DK, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            mk = ok < DK
            mtk = mt_[:, None] & mk[None, :]
            q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32) * scale
            k = tl.load(Kt + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32)
            n = tl.load(NS + (bh * (nchunks + 1) + c) * DK + ok, mask=mk, other=0.0)
            dn = tl.load(DN0 + bh * DK + ok, mask=mk, other=0.0)
            qk += tl.dot(q, tl.trans(k), input_precision="ieee")
            qn += tl.sum(q * n[None, :], 1)
            dFL += G * tl.sum(dn * n, 0)
        P = E * qk
        den = g * qn + tl.sum(P, 1)
        z = tl.maximum(tl.abs(den), tl.exp(-mrow)) + eps
        # first walk over the value blocks: the output's row sums dh . num, for the adjoint of den
        sdn = tl.zeros([CH], dtype=tl.float32)
        for v0 in range(0, DV, BLOCK_DV):
            ov = v0 + tl.arange(0, BLOCK_DV)
            mv = ov < DV
            mtv = mt_[:, None] & mv[None, :]
            qC = tl.zeros([CH, BLOCK_DV], dtype=tl.float32)
            for k0 in range(0, DK, BLOCK_K):
                ok = k0 + tl.arange(0, BLOCK_K)
                mk = ok < DK
                q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mt_[:, None] & mk[None, :],
                            other=0.0).to(tl.float32) * scale
                C = tl.load(CS + (bh * (nchunks + 1) + c) * DK * DV + ok[:, None] * DV + ov[None, :],
                            mask=mk[:, None] & mv[None, :], other=0.0)
                qC += tl.dot(q, C, input_precision="ieee")
            v = tl.load(V + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            dh = tl.load(DH + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            num = g[:, None] * qC + tl.dot(P, v, input_precision="ieee")
            sdn += tl.sum(dh * num, 1)
        dz = -sdn / (z * z)
        dden = tl.where(tl.abs(den) >= tl.exp(-mrow), tl.where(den >= 0, dz, -dz), 0.0)
        # second walk: dP, the gates' terms and dv, block by block (dC still the adjoint after the chunk)
        dP = tl.zeros([CH, CH], dtype=tl.float32) + dden[:, None]
        dF = g * dden * qn
        for v0 in range(0, DV, BLOCK_DV):
            ov = v0 + tl.arange(0, BLOCK_DV)
            mv = ov < DV
            mtv = mt_[:, None] & mv[None, :]
            qC = tl.zeros([CH, BLOCK_DV], dtype=tl.float32)
            kdC = tl.zeros([CH, BLOCK_DV], dtype=tl.float32)
            for k0 in range(0, DK, BLOCK_K):
                ok = k0 + tl.arange(0, BLOCK_K)
                mk = ok < DK
                kv = ok[:, None] * DV + ov[None, :]
                mkv = mk[:, None] & mv[None, :]
                mtk = mt_[:, None] & mk[None, :]
                q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32) * scale
                k = tl.load(Kt + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32)
                C = tl.load(CS + (bh * (nchunks + 1) + c) * DK * DV + kv, mask=mkv, other=0.0)
                dC = tl.load(DC0 + bh * DK * DV + kv, mask=mkv, other=0.0)
                qC += tl.dot(q, C, input_precision="ieee")
                kdC += tl.dot(k, dC, input_precision="ieee")
                dFL += G * tl.sum(tl.sum(dC * C, 1), 0)
            v = tl.load(V + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            dh = tl.load(DH + row[:, None] * DV + ov[None, :], mask=mtv, other=0.0).to(tl.float32)
            dnum = dh / z[:, None]
            dP += tl.dot(dnum, tl.trans(v), input_precision="ieee")
            dF += g * tl.sum(dnum * qC, 1)
            dv = tl.dot(tl.trans(P), dnum, input_precision="ieee") + w[:, None] * kdC
            tl.store(DV_ + row[:, None] * DV + ov[None, :], dv.to(DV_.dtype.element_ty), mask=mtv)
        tl.debug_barrier()  # every read of (dC, dn) after the chunk is done before the blocks below update them
        dS = dP * E
        dD = dP * P
        # third walk, key blocks outside: dq, dk, the move to the chunk's end (da) and (dC, dn) before the chunk
        da = tl.zeros([CH], dtype=tl.float32)
        for k0 in range(0, DK, BLOCK_K):
            ok = k0 + tl.arange(0, BLOCK_K)
            mk = ok < DK
            mtk = mt_[:, None] & mk[None, :]
            q = tl.load(Q + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32) * scale
            k = tl.load(Kt + row[:, None] * DK + ok[None, :], mask=mtk, other=0.0).to(tl.float32)
            n = tl.load(NS + (bh * (nchunks + 1) + c) * DK + ok, mask=mk, other=0.0)
            dn = tl.load(DN0 + bh * DK + ok, mask=mk, other=0.0)
            dq = (g * dden)[:, None] * n[None, :] + tl.dot(dS, k, input_precision="ieee")
            vdc = tl.zeros([CH, BLOCK_K], dtype=tl.float32)   # (L, BLOCK_K): dC v_s, dC the adjoint after the chunk
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
                dnum = dh / z[:, None]
                dq += g[:, None] * tl.dot(dnum, tl.trans(C), input_precision="ieee")
                vdc += tl.dot(v, tl.trans(dC), input_precision="ieee")
                tl.store(DC0 + bh * DK * DV + kv, G * dC + tl.dot(tl.trans(gq), dnum, input_precision="ieee"),
                         mask=mkv)
            dk = tl.dot(tl.trans(dS), q, input_precision="ieee") + w[:, None] * (vdc + dn[None, :])
            da += w * (tl.sum(k * vdc, 1) + tl.sum(k * dn[None, :], 1))
            tl.debug_barrier()  # every thread has read this block's dn before it is overwritten
            tl.store(DN0 + bh * DK + ok, G * dn + tl.sum(gq * dden[:, None], 0), mask=mk)
            tl.store(DQ + row[:, None] * DK + ok[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=mtk)
            tl.store(DK_ + row[:, None] * DK + ok[None, :], dk.to(DK_.dtype.element_ty), mask=mtk)
        # within the chunk, and the move to its end
        di = tl.sum(dD, 0) + da
        dF += tl.sum(dD, 1) - tl.sum(dD, 0) - da
        dFL += tl.sum(da, 0)
        last = tl.minimum(T - c * CH, CH) - 1
        dF += tl.where(ol == last, dFL, 0.0)
        dlogf = tl.sum(dF, 0) - tl.cumsum(dF, 0) + dF
        df = dlogf / (1.0 + tl.exp(fg))
        tl.store(DI + row, di.to(DI.dtype.element_ty), mask=mt_)
        tl.store(DF + row, df.to(DF.dtype.element_ty), mask=mt_)


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
            HAS_H0=C0 is not None, CH=CH, BLOCK_K=min(_block(DK), BLOCK_K), BLOCK_DV=block_dv,
            num_warps=FWD_WARPS, num_stages=NUM_STAGES)
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
    dn0 = (torch.empty if launch else torch.zeros)((B, H, DK), dtype=f32, device=dev)
    if launch:
        _mlstm_bwd_kernel[(B * H,)](
            dh, q, k, v, i, f, Cs, ns, ms, dCT, dnT, dq, dk, dv, di, df, dC0, dn0,
            T, DK, DV, float(scale), float(eps), nc,
            HAS_DCT=dCT is not None, HAS_DNT=dnT is not None, CH=CH, BLOCK_K=min(_block(DK), BLOCK_K),
            BLOCK_DV=min(_block(DV), BLOCK_V), num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    return dq, dk, dv, di, df, dC0, dn0


def mlstm_step(q, k, v, i, f, C, n, m, scale: float, eps: float):
    """One decoding step: q, k (B, H, DK), v (B, H, DV), i, f (B, H) X; the state (C, n, m) float32 -> h (B, H, DV)
    X and the new state (the forward kernel on a one-step sequence, one chunk)."""
    h, Cs, ns, ms = mlstm_fwd(*(t.unsqueeze(2) for t in (q, k, v, i, f)), scale, eps, C, n, m, 16)
    return h[:, :, 0], Cs[:, :, -1].contiguous(), ns[:, :, -1].contiguous(), ms[:, :, -1].contiguous()
