"""The row losses (tritium::loss_rows / loss_rows_bwd; csrc/losses.cpp's row kernel): one program per row, a loop
over the row in blocks of BLOCK columns, float32 sums (16-bit inputs are read and widened), loss id KIND
(tritium.ops.losses.ROW_*) selecting the formula at compile time; one table of formulas (``_sums``, ``_loss``,
``_factors``, ``_grads``) shared by the forward and the backward kernel.

  0 / 1 triplet (1: swap)  x1 anchor, x2 positive, x3 negative; d(u, v) = ||u - v + c||_b;
          stats d(a,p), d(a,n), d(p,n) (d(a,n) without swap); loss max(d(a,p) - dn + a, 0), dn = the smaller of
          d(a,n) and d(p,n) with swap (a tie goes to d(a,n))
  2 cosine       x1, x2, y in {1, -1} (others: 0); stats P = x1.x2, S1 = |x1|^2 + 1e-12, S2 = |x2|^2 + 1e-12;
          c = P / sqrt(S1 S2); y = 1: 1 - c; y = -1: max(c - a, 0)
  3 contrastive  x1, x2, y (1 similar, 0 not); stats d = ||x1 - x2 + c||_2, 0, 0; (y d^2 + (1 - y) max(a - d, 0)^2) / 2
  4 multi_margin x1 scores (N, C), y int64 classes, w per class or none, b = p (1 or 2); stats zeros;
          sum_{j != y, z_j > 0} w_y z_j^p / C, z_j = a - x_y + x_j
The losses and the statistics are float32 (the accumulation dtype; the backward reads the statistics instead of a
pass over the rows); the gradient rows are written in the inputs' dtype times the row's upstream gradient (one
rounding). Traffic: the forward reads the rows once; the backward reads them once (twice without statistics) and
writes the gradient rows asked for.
"""
import torch
import triton
import triton.language as tl

from ._utils import row_warps

TRIPLET, TRIPLET_SWAP, COSINE, CONTRASTIVE, MULTI_MARGIN = 0, 1, 2, 3, 4
MAX_BLOCK = 1024  # columns per step of the row loop: 8 per thread at 4 warps, three inputs live without spills


@triton.jit
def _norm_term(v, P_MODE: tl.constexpr, p):
    """|v|^p of the p-norm's sum (P_MODE 2, 1, or 0: any p > 0 through exp2 / log2, 0 at v = 0)."""
    if P_MODE == 2:
        r = v * v
    elif P_MODE == 1:
        r = tl.abs(v)
    else:
        r = tl.exp2(p * tl.log2(tl.abs(v)))
    return r


@triton.jit
def _norm_root(s, P_MODE: tl.constexpr, p):
    if P_MODE == 2:
        r = tl.sqrt(s)
    elif P_MODE == 1:
        r = s
    else:
        r = tl.exp2(tl.log2(s) / p)
    return r


@triton.jit
def _norm_grad(v, n, P_MODE: tl.constexpr, p):
    """d||v||_p / dv given the norm n: sign(v) |v|^(p-1) / n^(p-1); 0 where n == 0 (torch's norm backward)."""
    sg = tl.where(v > 0.0, 1.0, 0.0) - tl.where(v < 0.0, 1.0, 0.0)
    if P_MODE == 2:
        r = v / n
    elif P_MODE == 1:
        r = sg
    else:
        r = sg * tl.exp2((p - 1.0) * tl.log2(tl.abs(v) / n))
    return tl.where(n == 0.0, 0.0, r)


@triton.jit
def _load3(U, V, Z, cols, mask, KIND: tl.constexpr):
    """The row's three inputs at cols (float32; x3 only for the triplet, 0 where not read)."""
    u = tl.load(U + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + cols, mask=mask, other=0.0).to(tl.float32)
    if KIND <= 1:
        z = tl.load(Z + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        z = u
    return u, v, z


@triton.jit
def _sums(KIND: tl.constexpr, U, V, Z, D, b, c, P_MODE: tl.constexpr, BLOCK: tl.constexpr):
    """The row's statistics (s0, s1, s2) for KIND 0-3 (module docstring), one pass over the row."""
    offs = tl.arange(0, BLOCK)
    a0 = tl.zeros([BLOCK], dtype=tl.float32)
    a1 = tl.zeros([BLOCK], dtype=tl.float32)
    a2 = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, D, BLOCK):
        cols = off + offs
        mask = cols < D
        u, v, z = _load3(U, V, Z, cols, mask, KIND)
        if KIND <= 1:  # the padding's term (c^p) is not 0: only the row's lanes count
            a0 += tl.where(mask, _norm_term(u - v + c, P_MODE, b), 0.0)
            a1 += tl.where(mask, _norm_term(u - z + c, P_MODE, b), 0.0)
            if KIND == 1:
                a2 += tl.where(mask, _norm_term(v - z + c, P_MODE, b), 0.0)
        elif KIND == 2:  # zero-padded: no masking needed
            a0 += u * v
            a1 += u * u
            a2 += v * v
        else:
            t = tl.where(mask, u - v + c, 0.0)
            a0 += t * t
    s0 = tl.sum(a0, axis=0)
    s1 = tl.sum(a1, axis=0)
    s2 = tl.sum(a2, axis=0)
    if KIND <= 1:
        s0 = _norm_root(s0, P_MODE, b)
        s1 = _norm_root(s1, P_MODE, b)
        if KIND == 1:
            s2 = _norm_root(s2, P_MODE, b)
        else:
            s2 = s1
    elif KIND == 2:
        s1 += 1e-12
        s2 += 1e-12
    else:
        s0 = tl.sqrt(s0)
    return s0, s1, s2


@triton.jit
def _loss(KIND: tl.constexpr, s0, s1, s2, lab, a):
    """The row's loss from its statistics (KIND 0-3); NaN statistics give a NaN loss, as the C++ kernel."""
    if KIND <= 1:
        vv = s0 - tl.where(s2 < s1, s2, s1) + a
        r = tl.where(vv < 0.0, 0.0, vv)
    elif KIND == 2:
        cs = s0 / tl.sqrt(s1 * s2)
        neg = cs - a
        r = tl.where(lab == 1.0, 1.0 - cs, 0.0) + tl.where(lab == -1.0, tl.where(neg < 0.0, 0.0, neg), 0.0)
    else:
        h = tl.maximum(a - s0, 0.0)
        r = 0.5 * (lab * s0 * s0 + (1.0 - lab) * h * h)
    return r


@triton.jit
def _factors(KIND: tl.constexpr, s0, s1, s2, lab, a, gs):
    """The row's scalar gradient factors (k0, k1, k2) for _grads, gs the row's upstream gradient."""
    if KIND <= 1:  # k0: the active gate times gs; k1: whether the swap's d(p, n) is the negative distance
        vv = s0 - tl.where(s2 < s1, s2, s1) + a
        k0 = tl.where(vv >= 0.0, gs, 0.0)
        k1 = tl.where(s2 < s1, 1.0, 0.0)
        k2 = 0.0
    elif KIND == 2:  # dc / den, dc c / S1, dc c / S2
        den = tl.sqrt(s1 * s2)
        cs = s0 / den
        dc = gs * tl.where(lab == 1.0, -1.0, tl.where((lab == -1.0) & (cs - a >= 0.0), 1.0, 0.0))
        k0 = dc / den
        k1 = dc * cs / s1
        k2 = dc * cs / s2
    else:  # d(d^2 / 2)/dv = v (0 at d = 0 through sqrt); d(h^2 / 2)/dv = -h v / d (0 at d = 0)
        h = tl.maximum(a - s0, 0.0)
        k0 = tl.where(s0 > 0.0, gs * (lab - (1.0 - lab) * h / tl.where(s0 > 0.0, s0, 1.0)), 0.0)
        k1 = 0.0
        k2 = 0.0
    return k0, k1, k2


@triton.jit
def _grads(KIND: tl.constexpr, u, v, z, s0, s1, s2, k0, k1, k2, b, c, P_MODE: tl.constexpr):
    """The three gradient blocks at one block of the row's columns (KIND 0-3; the unused ones are 0)."""
    if KIND <= 1:
        gap = _norm_grad(u - v + c, s0, P_MODE, b)
        use_pn = k1 != 0.0
        gneg = tl.where(use_pn, _norm_grad(v - z + c, s2, P_MODE, b), _norm_grad(u - z + c, s1, P_MODE, b))
        g0 = k0 * tl.where(use_pn, gap, gap - gneg)
        g1 = k0 * tl.where(use_pn, -gap - gneg, -gap)
        g2 = k0 * gneg
    elif KIND == 2:
        g0 = v * k0 - u * k1
        g1 = u * k0 - v * k2
        g2 = g0
    else:
        g0 = (u - v + c) * k0
        g1 = -g0
        g2 = g0
    return g0, g1, g2


@triton.jit
def _margin_row(U, T, W, G, D, a, gs, HAS_W: tl.constexpr, P2: tl.constexpr, GRAD: tl.constexpr,
                BLOCK: tl.constexpr):
    """multi_margin's row: its loss, and with GRAD its gradient row (gs times) stored into G. A target out of
    range (an error in the C++ kernel; a device assert in debug builds here) makes the row's loss and gradient NaN,
    where a GPU kernel cannot raise without a host sync."""
    t = tl.load(T)
    ok = (t >= 0) & (t < D)
    tl.device_assert(ok, "target out of range")
    t = tl.where(ok, t, 0)
    nan_if_bad = tl.where(ok, 1.0, float("nan"))
    if HAS_W:
        wt = tl.load(W + t).to(tl.float32)
    else:
        wt = 1.0
    inv = 1.0 / D
    base = a - tl.load(U + t).to(tl.float32)
    k = gs * wt * inv * nan_if_bad
    offs = tl.arange(0, BLOCK)
    tot = tl.zeros([BLOCK], dtype=tl.float32)
    gsum = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, D, BLOCK):
        cols = off + offs
        mask = cols < D
        z = base + tl.load(U + cols, mask=mask, other=0.0).to(tl.float32)
        on = (z > 0.0) & mask & (cols != t)  # torch: only z > 0 counts; the target's own column does not
        if P2:
            tot += tl.where(on, z * z, 0.0)
        else:
            tot += tl.where(on, z, 0.0)
        if GRAD:
            if P2:
                gv = tl.where(on, z + z, 0.0) * k
            else:
                gv = tl.where(on, k, 0.0)
            gsum += gv
            # the target's column is written once, after the loop (two stores to one address are unordered)
            tl.store(G + cols, gv.to(G.dtype.element_ty), mask=mask & (cols != t))
    if GRAD:
        tl.store(G + t, (-tl.sum(gsum, axis=0)).to(G.dtype.element_ty))
    return tl.sum(tot, axis=0) * wt * inv * nan_if_bad


@triton.jit
def _rows_fwd_kernel(X1, X2, X3, Y, W, LOSS, STATS, s1, s2, s3, sy, D, a, b, c, KIND: tl.constexpr,
                     P_MODE: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    if KIND == 4:
        loss = _margin_row(X1 + row * s1, Y + row * sy, W, X1, D, a, 0.0, HAS_W, P_MODE == 2, False, BLOCK)
        st0 = tl.full([], 0.0, tl.float32)  # no statistics: its backward's one pass computes what it needs
        st1 = st0
        st2 = st0
    else:
        st0, st1, st2 = _sums(KIND, X1 + row * s1, X2 + row * s2, X3 + row * s3, D, b, c, P_MODE, BLOCK)
        if KIND == 2 or KIND == 3:
            lab = tl.load(Y + row * sy).to(tl.float32)
        else:
            lab = 0.0
        loss = _loss(KIND, st0, st1, st2, lab, a)
    tl.store(LOSS + row, loss)
    tl.store(STATS + row * 3, st0)
    tl.store(STATS + row * 3 + 1, st1)
    tl.store(STATS + row * 3 + 2, st2)


@triton.jit
def _rows_bwd_kernel(DL, X1, X2, X3, Y, W, STATS, G0, G1, G2, sdl, s1, s2, s3, sy, D, a, b, c, KIND: tl.constexpr,
                     P_MODE: tl.constexpr, HAS_W: tl.constexpr, HAS_STATS: tl.constexpr, NEED0: tl.constexpr,
                     NEED1: tl.constexpr, NEED2: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    gs = tl.load(DL + row * sdl)
    if KIND == 4:
        _margin_row(X1 + row * s1, Y + row * sy, W, G0 + row * D, D, a, gs, HAS_W, P_MODE == 2, True, BLOCK)
    else:
        U, V, Z = X1 + row * s1, X2 + row * s2, X3 + row * s3
        if HAS_STATS:  # the forward's statistics: no pass over the rows
            st0 = tl.load(STATS + row * 3)
            st1 = tl.load(STATS + row * 3 + 1)
            st2 = tl.load(STATS + row * 3 + 2)
        else:
            st0, st1, st2 = _sums(KIND, U, V, Z, D, b, c, P_MODE, BLOCK)
        if KIND == 2 or KIND == 3:
            lab = tl.load(Y + row * sy).to(tl.float32)
        else:
            lab = 0.0
        k0, k1, k2 = _factors(KIND, st0, st1, st2, lab, a, gs)
        offs = tl.arange(0, BLOCK)
        for off in range(0, D, BLOCK):
            cols = off + offs
            mask = cols < D
            u, v, z = _load3(U, V, Z, cols, mask, KIND)
            g0, g1, g2 = _grads(KIND, u, v, z, st0, st1, st2, k0, k1, k2, b, c, P_MODE)
            if NEED0:
                tl.store(G0 + row * D + cols, g0.to(G0.dtype.element_ty), mask=mask)
            if NEED1:
                tl.store(G1 + row * D + cols, g1.to(G1.dtype.element_ty), mask=mask)
            if NEED2:
                tl.store(G2 + row * D + cols, g2.to(G2.dtype.element_ty), mask=mask)


def _check(loss, x1, x2, x3, y, w, b):
    if not 0 <= loss <= MULTI_MARGIN:
        raise ValueError(f"loss_rows: unknown loss id {loss}")
    if x1.dim() != 2 or x1.stride(1) != 1 or (loss != MULTI_MARGIN and x2 is None) or (loss <= 1 and x3 is None):
        raise ValueError("loss_rows: x1 (and x2, x3 as the loss needs them) must be (rows, cols) with unit column "
                         "stride")
    for t in (x2, x3):
        if t is not None and (t.shape != x1.shape or t.dtype != x1.dtype or t.stride(1) != 1):
            raise ValueError("loss_rows: the inputs must share x1's shape and dtype, with unit column stride")
    if loss >= COSINE and (y is None or y.dim() != 1 or y.shape[0] != x1.shape[0]):
        raise ValueError(f"loss_rows: y must be ({x1.shape[0]},), got {None if y is None else tuple(y.shape)}")
    if w is not None and (w.dim() != 1 or w.shape[0] != x1.shape[1] or not w.is_contiguous()):
        raise ValueError(f"loss_rows: w must be contiguous ({x1.shape[1]},), got {tuple(w.shape)}")
    if loss == MULTI_MARGIN and b not in (1, 2):
        raise ValueError(f"loss_rows: multi_margin takes p = 1 or 2, got {b}")


def _common(loss, x1, x2, x3, y, w, b):
    """The launch arguments shared by both kernels: the rows, their strides, constexprs, block and warps."""
    d = x1.shape[1]
    block = min(triton.next_power_of_2(max(d, 1)), MAX_BLOCK)
    p_mode = 2 if b == 2 else 1 if b == 1 else 0
    strides = tuple(t.stride(0) if t is not None else 0 for t in (x1, x2, x3, y))
    # an absent x2 / x3 is passed as x1 (row offsets are computed for it, it is never read)
    rows = tuple(x1 if t is None else t for t in (x1, x2, x3))
    flags = dict(KIND=int(loss), P_MODE=p_mode, HAS_W=w is not None, BLOCK=block, num_warps=row_warps(block))
    return rows, strides, flags


def loss_rows(loss, x1, x2, x3, y, w, a, b, c):
    """(per-row loss (N,), statistics (N, 3)), float32, of row loss `loss` (module docstring). x1, x2, x3 (N, D)
    with unit column stride (x2, x3 None where the loss has none), y (N,) (labels in x1's dtype; int64 classes for
    multi_margin) or None, w (D,) or None. Reads the rows once; writes 16 bytes a row."""
    _check(loss, x1, x2, x3, y, w, b)
    n, d = x1.shape
    out = torch.empty((n,), device=x1.device, dtype=torch.float32)
    stats = torch.empty((n, 3), device=x1.device, dtype=torch.float32)
    xs, (s1, s2, s3, sy), flags = _common(loss, x1, x2, x3, y, w, b)
    if n:
        _rows_fwd_kernel[(n,)](*xs, y, w, out, stats, s1, s2, s3, sy, d, float(a), float(b), float(c),
                               **flags)
    return out, stats


def loss_rows_bwd(loss, dloss, x1, x2, x3, y, w, a, b, c, need1, need2, need3, stats=None):
    """The gradients of sum_r dloss[r] loss_r for x1, x2, x3 where asked for (need*, and the input present), in
    the inputs' dtype; an empty (0,) tensor for the others. dloss (N,) float32, any stride; stats: loss_rows'
    (ignored for multi_margin, which has none), else recomputed. Reads the rows once (twice without stats),
    writes the gradient rows."""
    _check(loss, x1, x2, x3, y, w, b)
    n, d = x1.shape
    need = (bool(need1), bool(need2) and x2 is not None, bool(need3) and x3 is not None)
    if loss == MULTI_MARGIN:
        need = (need[0], False, False)
    gs = [torch.empty(x1.shape if nd else (0,), device=x1.device, dtype=x1.dtype) for nd in need]
    has_stats = stats is not None and loss != MULTI_MARGIN
    xs, (s1, s2, s3, sy), flags = _common(loss, x1, x2, x3, y, w, b)
    if n and any(need):
        _rows_bwd_kernel[(n,)](
            dloss, *xs, y, w, stats if has_stats else None, *(g if nd else None for g, nd in zip(gs, need)),
            dloss.stride(0), s1, s2, s3, sy, d, float(a), float(b), float(c), HAS_STATS=has_stats,
            NEED0=need[0], NEED1=need[1], NEED2=need[2], **flags)
    return tuple(gs)


def loss_rows_grad(loss, dloss, x1, x2, x3, y, w, a, b, c, need1, need2, need3):
    """loss_rows and loss_rows_bwd(dloss) together: (per-row loss, statistics, three gradients). Two launches (the
    forward's statistics feed the backward's): the one-pass form is the C++ kernel's; the public functions call this
    op on the CPU only."""
    out, stats = loss_rows(loss, x1, x2, x3, y, w, a, b, c)
    return (out, stats) + loss_rows_bwd(loss, dloss, x1, x2, x3, y, w, a, b, c, need1, need2, need3, stats)
