"""Graph message passing over a CSR graph (tritium.ops.graph): the aggregation (sum / mean / max, optional edge
weights) and GAT's fused edge softmax, forward and backward; csrc/graph.cpp is the CPU twin.

rowptr (Nd + 1) / col (E) is the graph by destination, csc_ptr (Ns + 1) / csc_dst / csc_perm (E) its transpose
(the edges by source, their destination, their CSR index). One program per destination row (and block of
features, or head): it walks the row's edges, so no (edges, features) tensor exists and no output is written by
two programs. The backward's gradients of the sources walk the transpose the same way (no atomics). Accumulation
in float32; offsets in int64 (node indices are int64 loads, program ids converted).

- _agg_fwd_kernel: out[i] = AGG_e w_e x[col_e] (AGG 0 sum, 1 mean, 2 max with the first maximal edge in arg).
- _agg_dx_kernel: dx[j] = sum over j's out-edges of w_e s_i g[i] (s_i = 1 / deg(i) for mean; max: only the
  features whose arg is e). _agg_dw_kernel: dw_e = s_i <g[i], x[col_e]> (max: the features whose arg is e).
- _gat_fwd_kernel (per destination and head): online softmax of leaky_relu(a_src[col_e] + a_dst[i]) over the
  row's edges with the weighted sum of x rows; writes the row's log-sum-exp.
- _gat_bwd_dst_kernel: per destination and head, delta = sum_e alpha_e <g[i], x[col_e]>, then
  alpha_e and ds_e = alpha_e (<g[i], x[col_e]> - delta) leaky'(z_e) into (E, H) float32 buffers, da_dst = sum ds.
- _gat_bwd_src_kernel: per source and head, dx[j] = sum alpha_e g[dst_e], da_src[j] = sum ds_e over the CSC.
Traffic: each pass reads the rows of x (or g) once per edge: E * F elements, plus the index arrays.
"""
import torch
import triton
import triton.language as tl

MAX_BLOCK_F = 128   # features per program of the aggregation (a grid dim covers wider rows)
WARPS = 4


@triton.jit
def _agg_fwd_kernel(X, ROWPTR, COL, W, OUT, ARG, F, HAS_W: tl.constexpr, AGG: tl.constexpr,
                    BLOCK_F: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = offs < F
    e0 = tl.load(ROWPTR + i)
    e1 = tl.load(ROWPTR + i + 1)
    if AGG == 2:
        acc = tl.full([BLOCK_F], float("-inf"), tl.float32)
    else:
        acc = tl.zeros([BLOCK_F], tl.float32)
    am = tl.full([BLOCK_F], -1, tl.int64)
    for e in range(e0, e1):
        j = tl.load(COL + e)
        v = tl.load(X + j * F + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(W + e).to(tl.float32)
        if AGG == 2:
            better = (v > acc) | (am < 0)
            acc = tl.where(better, v, acc)
            am = tl.where(better, e, am)
        else:
            acc += v
    if AGG == 1:
        acc = acc / tl.maximum(e1 - e0, 1).to(tl.float32)
    if AGG == 2:
        acc = tl.where(am < 0, 0.0, acc)
        tl.store(ARG + i * F + offs, am, mask=mask)
    tl.store(OUT + i * F + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _agg_dx_kernel(G, ROWPTR, W, ARG, CPTR, CDST, CPERM, DX, F, HAS_W: tl.constexpr, AGG: tl.constexpr,
                   BLOCK_F: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = offs < F
    t0 = tl.load(CPTR + j)
    t1 = tl.load(CPTR + j + 1)
    acc = tl.zeros([BLOCK_F], tl.float32)
    for t in range(t0, t1):
        i = tl.load(CDST + t)
        e = tl.load(CPERM + t)
        c = 1.0
        if HAS_W:
            c = tl.load(W + e).to(tl.float32)
        if AGG == 1:
            c = c / (tl.load(ROWPTR + i + 1) - tl.load(ROWPTR + i)).to(tl.float32)
        gv = tl.load(G + i * F + offs, mask=mask, other=0.0).to(tl.float32)
        if AGG == 2:
            a = tl.load(ARG + i * F + offs, mask=mask, other=-1)
            gv = tl.where(a == e, gv, 0.0)
        acc += c * gv
    tl.store(DX + j * F + offs, acc.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _agg_dw_kernel(G, X, ROWPTR, COL, ARG, DW, F, AGG: tl.constexpr, BLOCK_F: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    e0 = tl.load(ROWPTR + i)
    e1 = tl.load(ROWPTR + i + 1)
    scale = 1.0
    if AGG == 1:
        scale = 1.0 / tl.maximum(e1 - e0, 1).to(tl.float32)
    for e in range(e0, e1):
        j = tl.load(COL + e)
        acc = tl.zeros([BLOCK_F], tl.float32)
        for f0 in range(0, F, BLOCK_F):
            offs = f0 + tl.arange(0, BLOCK_F)
            mask = offs < F
            prod = (tl.load(G + i * F + offs, mask=mask, other=0.0).to(tl.float32)
                    * tl.load(X + j * F + offs, mask=mask, other=0.0).to(tl.float32))
            if AGG == 2:
                a = tl.load(ARG + i * F + offs, mask=mask, other=-1)
                prod = tl.where(a == e, prod, 0.0)
            acc += prod
        tl.store(DW + e, (tl.sum(acc, 0) * scale).to(DW.dtype.element_ty))


@triton.jit
def _gat_fwd_kernel(X, ASRC, ADST, ROWPTR, COL, OUT, LSE, H, C, slope, BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    e0 = tl.load(ROWPTR + i)
    e1 = tl.load(ROWPTR + i + 1)
    ad = tl.load(ADST + i * H + h).to(tl.float32)
    m = ad * 0.0 - float("inf")
    s = ad * 0.0
    acc = tl.zeros([BLOCK_C], tl.float32)
    for e in range(e0, e1):
        j = tl.load(COL + e)
        z = tl.load(ASRC + j * H + h).to(tl.float32) + ad
        v = tl.where(z > 0.0, z, z * slope)
        m_new = tl.maximum(m, v)
        r = tl.exp(m - m_new)
        p = tl.exp(v - m_new)
        s = s * r + p
        acc = acc * r + p * tl.load(X + (j * H + h) * C + offs, mask=mask, other=0.0).to(tl.float32)
        m = m_new
    has = e1 > e0
    out = tl.where(has, acc / tl.where(has, s, 1.0), 0.0)
    tl.store(OUT + (i * H + h) * C + offs, out.to(OUT.dtype.element_ty), mask=mask)
    tl.store(LSE + i * H + h, tl.where(has, m + tl.log(tl.where(has, s, 1.0)), float("-inf")))


@triton.jit
def _gat_bwd_dst_kernel(G, X, ASRC, ADST, ROWPTR, COL, LSE, ALPHA, DS, DADST, H, C, slope,
                        BLOCK_C: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    e0 = tl.load(ROWPTR + i)
    e1 = tl.load(ROWPTR + i + 1)
    ad = tl.load(ADST + i * H + h).to(tl.float32)
    lse = tl.load(LSE + i * H + h)
    g = tl.load(G + (i * H + h) * C + offs, mask=mask, other=0.0).to(tl.float32)
    delta = ad * 0.0
    asum = ad * 0.0
    for e in range(e0, e1):
        j = tl.load(COL + e)
        z = tl.load(ASRC + j * H + h).to(tl.float32) + ad
        a = tl.exp(tl.where(z > 0.0, z, z * slope) - lse)
        xr = tl.load(X + (j * H + h) * C + offs, mask=mask, other=0.0).to(tl.float32)
        delta += a * tl.sum(g * xr, 0)
        asum += a
    # alpha renormalised to sum 1 (removes the rounding of the saved log-sum-exp, common to the row)
    rs = 1.0 / tl.where(asum > 0.0, asum, 1.0)
    delta = delta * rs
    total = ad * 0.0
    for e in range(e0, e1):  # the second pass recomputes alpha and <g, x> (no read-back of this program's stores)
        j = tl.load(COL + e)
        z = tl.load(ASRC + j * H + h).to(tl.float32) + ad
        a = tl.exp(tl.where(z > 0.0, z, z * slope) - lse) * rs
        xr = tl.load(X + (j * H + h) * C + offs, mask=mask, other=0.0).to(tl.float32)
        d = a * (tl.sum(g * xr, 0) - delta) * tl.where(z > 0.0, 1.0, slope)
        tl.store(ALPHA + e * H + h, a)
        tl.store(DS + e * H + h, d)
        total += d
    tl.store(DADST + i * H + h, total.to(DADST.dtype.element_ty))


@triton.jit
def _gat_bwd_src_kernel(G, ALPHA, DS, CPTR, CDST, CPERM, DX, DASRC, H, C, BLOCK_C: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_C)
    mask = offs < C
    t0 = tl.load(CPTR + j)
    t1 = tl.load(CPTR + j + 1)
    acc = tl.zeros([BLOCK_C], tl.float32)
    total = tl.sum(acc, 0)
    for t in range(t0, t1):
        i = tl.load(CDST + t)
        e = tl.load(CPERM + t)
        acc += tl.load(ALPHA + e * H + h) * tl.load(G + (i * H + h) * C + offs, mask=mask, other=0.0).to(tl.float32)
        total += tl.load(DS + e * H + h)
    tl.store(DX + (j * H + h) * C + offs, acc.to(DX.dtype.element_ty), mask=mask)
    tl.store(DASRC + j * H + h, total.to(DASRC.dtype.element_ty))


# ---- launchers (the op schemas of tritium.ops.graph) ----
def _block_f(F: int) -> int:
    return min(triton.next_power_of_2(max(F, 1)), MAX_BLOCK_F)


def graph_agg(x, rowptr, col, w, csc_ptr, csc_dst, csc_perm, agg):
    """(out (Nd, F), arg (Nd, F) int64 for max, else empty) of out[i] = AGG_e w_e x[col_e]; x (Ns, F)."""
    nd, F = rowptr.numel() - 1, x.shape[1]
    out = torch.empty(nd, F, dtype=x.dtype, device=x.device)
    arg = torch.empty((nd, F) if agg == 2 else (0,), dtype=torch.int64, device=x.device)
    if nd and F:
        bf = _block_f(F)
        _agg_fwd_kernel[(nd, triton.cdiv(F, bf))](x, rowptr, col, x if w is None else w, out, arg, F,
                                                  HAS_W=w is not None, AGG=agg, BLOCK_F=bf, num_warps=WARPS)
    return out, arg


def graph_agg_bwd(g, x, rowptr, col, w, arg, csc_ptr, csc_dst, csc_perm, agg, need_x, need_w):
    """(dx (Ns, F) or empty, dw (E,) or empty) of graph_agg's backward from g (Nd, F)."""
    nd, ns, F = rowptr.numel() - 1, x.shape[0], x.shape[1]
    bf = _block_f(F)
    dx = torch.empty((ns, F) if need_x else (0,), dtype=x.dtype, device=x.device)
    dw = torch.empty((col.numel(),) if need_w and w is not None else (0,), dtype=x.dtype, device=x.device)
    if need_x and ns and F:
        _agg_dx_kernel[(ns, triton.cdiv(F, bf))](g, rowptr, g if w is None else w, arg if agg == 2 else g, csc_ptr,
                                                 csc_dst, csc_perm, dx, F, HAS_W=w is not None, AGG=agg, BLOCK_F=bf,
                                                 num_warps=WARPS)
    if need_w and w is not None and nd:
        _agg_dw_kernel[(nd,)](g, x, rowptr, col, arg if agg == 2 else g, dw, F, AGG=agg, BLOCK_F=bf,
                              num_warps=WARPS)
    return dx, dw


def _block_c(C: int) -> int:
    return triton.next_power_of_2(max(C, 1))


def gat_fwd(x, a_src, a_dst, rowptr, col, csc_ptr, csc_dst, csc_perm, slope):
    """(out (Nd, H, C), lse (Nd, H) float32) of GAT's edge softmax + aggregation; x (Ns, H, C)."""
    nd, (_, H, C) = rowptr.numel() - 1, x.shape
    out = torch.empty(nd, H, C, dtype=x.dtype, device=x.device)
    lse = torch.empty(nd, H, dtype=torch.float32, device=x.device)
    if nd and H:
        _gat_fwd_kernel[(nd, H)](x, a_src, a_dst, rowptr, col, out, lse, H, C, slope, BLOCK_C=_block_c(C),
                                 num_warps=WARPS)
    return out, lse


def gat_bwd(g, x, a_src, a_dst, rowptr, col, lse, csc_ptr, csc_dst, csc_perm, slope):
    """(dx, da_src, da_dst) of gat_fwd from g (Nd, H, C); (E, H) float32 buffers of alpha and the score
    gradients between the destination and the source pass."""
    nd, (ns, H, C), E = rowptr.numel() - 1, x.shape, col.numel()
    alpha = torch.empty(E, H, dtype=torch.float32, device=x.device)
    ds = torch.empty(E, H, dtype=torch.float32, device=x.device)
    dx = torch.empty_like(x)
    da_src = torch.empty_like(a_src)
    da_dst = torch.empty_like(a_dst)
    bc = _block_c(C)
    if nd and H:
        _gat_bwd_dst_kernel[(nd, H)](g, x, a_src, a_dst, rowptr, col, lse, alpha, ds, da_dst, H, C, slope,
                                     BLOCK_C=bc, num_warps=WARPS)
    if ns and H:
        _gat_bwd_src_kernel[(ns, H)](g, alpha, ds, csc_ptr, csc_dst, csc_perm, dx, da_src, H, C, BLOCK_C=bc,
                                     num_warps=WARPS)
    return dx, da_src, da_dst
