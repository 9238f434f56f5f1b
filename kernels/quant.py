"""Weight-only quantized linear layers (tritium.ops.quant; docs/quantization.md has the logical format).

The GPU layout of a weight W (N, K) given as q uint8 (N, K), scales and mins (N, G), G = n_groups(K, group):

- ``qdata`` uint8 (N, row_bytes), row-major, row n holding row n of W:
  8-bit: row_bytes = Kp = K rounded up to 32; byte k = q[n, k].
  4-bit: row_bytes = K64 / 2, K64 = K rounded up to 64; byte 32 c + j (j < 32) = q[n, 64 c + j] |
  q[n, 64 c + 32 + j] << 4: the low nibbles of each 32-byte run are 32 consecutive elements, the high nibbles
  the next 32, so a run unpacks with a mask and a shift into two tiles that each cover one block of 32
  activations (the int8-activation path needs one block per integer dot) and no shuffle of elements.
  Padding elements (k >= K) hold q = 2**(bits - 1); the kernels mask them by k < K whatever they hold.
- ``scales`` (N, G) and ``mins`` (N, G) (``mins`` (0,) when absent): the logical arrays, contiguous, in their own
  dtype (float16 or float32), widened to float32 in registers.

Kernels (all accumulate in float32; row offsets n * row_bytes and m * K are 64-bit):

quant_linear:    y (M, N) = x (M, K) @ W^T. Per (BLOCK_N rows of W, BLOCK_M rows of x) program, a loop over K
                 that loads the packed bytes, widens them to float32 weights in registers (one rounding:
                 s * (q - 2**(bits-1)), or fma(s, q, m)) and multiplies: IEEE float32 dots for float32 x,
                 dots in x's dtype (float32 accumulation) for 16-bit x, as torch's matmul of a 16-bit copy of W
                 would. Traffic: reads the packed weight once per BLOCK_M rows of x, writes M * N.
quant_linear with int8 activations: _act_quant_kernel first writes x as int8 per block of 32 (M, Kp) and one
                 float32 scale d per block (reference.quantize_int8_act's arithmetic exactly); then per block an
                 integer dot sum(xq * (q - 2**(bits-1))) (int8 x int8 -> int32, exact) is scaled in float32:
                 d * s * isum, or with mins d * (s * (isum + 2**(bits-1) sum(xq)) + m * sum(xq)).
quant_linear_dx: dx (M, K) = dy (M, N) @ W, per (K columns, BLOCK_M rows) program, a loop over N.
quant_dequantize: W (N, K) (or rows of it) in a float dtype, the weights the matmul uses.
"""
import os

import torch
import triton
import triton.language as tl

from tritium.ops.quant import BLOCK, activation_terms, n_groups, padded_k

if os.environ.get("TRITON_INTERPRET") == "1":
    @triton.jit
    def _rint(v):
        # round half to even for |v| < 2**22: 1.5 * 2**23 has an ulp of 1, so the add rounds v to an integer
        # (numpy does no fma contraction, libdevice is not available in the interpreter)
        return (v + 12582912.0) - 12582912.0
else:
    from triton.language.extra.cuda import libdevice

    @triton.jit
    def _rint(v):
        # cvt.rni: round half to even; the add trick above could be contracted with the multiply that made v
        return libdevice.rint(v)


@triton.jit
def _vec(P, off, k0, K, nmask, BLOCK_N: tl.constexpr):
    """(BLOCK_N,) float32 values P[off] of a run starting at element k0 (0 where k0 >= K: a run past the row)."""
    live = nmask & (tl.full([BLOCK_N], k0, tl.int32) < K)  # the scalar condition broadcast to a tensor mask
    return tl.load(P + off, mask=live, other=0.0).to(tl.float32)


@triton.jit
def _run_weights(qv, S, MN, soff, k0, K, group, nmask,
                 HAS_MINS: tl.constexpr, GROUP16: tl.constexpr, OFF: tl.constexpr, N_AXIS: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """float32 weights of the 32 elements k0 .. k0 + 31 of BLOCK_N rows from their integers qv, (32, BLOCK_N) if
    N_AXIS == 1 else (BLOCK_N, 32); soff (BLOCK_N,) the rows' offsets into the scales. A run lies in one group
    (groups are multiples of 32), or in two halves with group 16."""
    if GROUP16:
        first = tl.expand_dims(tl.arange(0, 32) < 16, N_AXIS)
        g = k0 // 16
        s = tl.where(first, tl.expand_dims(_vec(S, soff + g, k0, K, nmask, BLOCK_N), 1 - N_AXIS),
                     tl.expand_dims(_vec(S, soff + g + 1, k0 + 16, K, nmask, BLOCK_N), 1 - N_AXIS))
        if HAS_MINS:
            mn = tl.where(first, tl.expand_dims(_vec(MN, soff + g, k0, K, nmask, BLOCK_N), 1 - N_AXIS),
                          tl.expand_dims(_vec(MN, soff + g + 1, k0 + 16, K, nmask, BLOCK_N), 1 - N_AXIS))
    else:
        g = k0 // group
        s = tl.expand_dims(_vec(S, soff + g, k0, K, nmask, BLOCK_N), 1 - N_AXIS)
        if HAS_MINS:
            mn = tl.expand_dims(_vec(MN, soff + g, k0, K, nmask, BLOCK_N), 1 - N_AXIS)
    qf = qv.to(tl.float32)
    if HAS_MINS:
        return tl.fma(qf, s, mn)  # s * q + m rounded once, as the format specifies
    else:
        return (qf - OFF) * s  # q - OFF is exact: one rounding


@triton.jit
def _dot(a, b, acc, IEEE_F32: tl.constexpr):
    if IEEE_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b.to(a.dtype), acc)


@triton.jit
def _block_term(isum, xsum, s, mn, HAS_MINS: tl.constexpr, OFF: tl.constexpr):
    """One block's contribution before the activation scale: s * sum(xq * q) + m * sum(xq) from the integer sums
    isum = sum(xq * (q - OFF)) (BLOCK_M, BLOCK_N) and xsum = sum(xq) (BLOCK_M,)."""
    if HAS_MINS:
        iq = isum + OFF * xsum[:, None]  # sum(xq * q), exact in int32
        return s[None, :] * iq.to(tl.float32) + mn[None, :] * xsum.to(tl.float32)[:, None]
    else:
        return s[None, :] * isum.to(tl.float32)


@triton.jit
def _act_quant_kernel(
    X, XQ, XD, K, KB, stride_xm, stride_xk, stride_qm, stride_dm,
    BLOCKS: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    k = b[:, None] * 32 + tl.arange(0, 32)[None, :]  # (BLOCKS, 32)
    x = tl.load(X + m * stride_xm + k.to(tl.int64) * stride_xk, mask=k < K, other=0.0).to(tl.float32)
    d = tl.math.div_rn(tl.max(tl.abs(x), axis=1), 127.0)  # correctly rounded, as the float64 reference
    inv = tl.where(d > 0, tl.math.div_rn(1.0, tl.where(d > 0, d, 1.0)), 0.0)
    xq = _rint(x * inv[:, None])  # in [-127, 127]
    tl.store(XQ + m * stride_qm + k, xq.to(tl.int8), mask=b[:, None] < KB)
    tl.store(XD + m * stride_dm + b, d, mask=b < KB)


@triton.jit
def _linear_kernel(
    X, XQ, XD, Q, S, MN, Y,
    M, N, K, group, row_bytes,
    stride_xm, stride_xk, stride_qn, stride_sn, stride_ym, stride_xqm, stride_xdm,
    BITS: tl.constexpr, HAS_MINS: tl.constexpr,
    INT8_ACT: tl.constexpr,    # x given as int8 blocks XQ (M, Kp) with scales XD (M, Kp / 32); X unused
    GROUP16: tl.constexpr,     # group == 16 (8-bit only): two weight scales per run of 32
    IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Each step reads one 32-byte run of BLOCK_N rows: 32 elements (8-bit) or two halves of 32 (4-bit, low and
    # high nibbles), each half one block of activations and within one group, so its scales are a vector.
    OFF: tl.constexpr = 1 << (BITS - 1)
    HALVES: tl.constexpr = 2 if BITS == 4 else 1
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    j = tl.arange(0, 32)
    soff = rn64 * stride_sn
    qptr = Q + rn64[None, :] * stride_qn + j[:, None]  # (32, BLOCK_N); row_bytes is a multiple of 32
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for b0 in range(0, row_bytes, 32):
        qb = tl.load(qptr + b0, mask=nmask[None, :], other=0)
        for h in tl.static_range(HALVES):
            k0 = HALVES * b0 + 32 * h
            if BITS == 8:
                qv = qb
            elif h == 0:
                qv = qb & 15
            else:
                qv = qb >> 4
            if INT8_ACT:
                mlive = mmask & (tl.full([BLOCK_M], k0, tl.int32) < K)
                xq = tl.load(XQ + rm64[:, None] * stride_xqm + (k0 + j)[None, :], mask=mlive[:, None], other=0)
                d = tl.load(XD + rm64 * stride_xdm + k0 // 32, mask=mlive, other=0.0)
                wq = (qv.to(tl.int32) - OFF).to(tl.int8)
                isum = tl.dot(xq, wq, out_dtype=tl.int32)
                xsum = tl.sum(xq.to(tl.int32), axis=1)
                if GROUP16:
                    # the halves of the block have their own scales: the first half's sums, the second's by
                    # difference
                    xq0 = tl.where((j < 16)[None, :], xq, tl.zeros_like(xq))
                    isum0 = tl.dot(xq0, wq, out_dtype=tl.int32)
                    xsum0 = tl.sum(xq0.to(tl.int32), axis=1)
                    g = k0 // 16
                    s0 = _vec(S, soff + g, k0, K, nmask, BLOCK_N)
                    s1 = _vec(S, soff + g + 1, k0 + 16, K, nmask, BLOCK_N)
                    m0 = s0
                    m1 = s1
                    if HAS_MINS:
                        m0 = _vec(MN, soff + g, k0, K, nmask, BLOCK_N)
                        m1 = _vec(MN, soff + g + 1, k0 + 16, K, nmask, BLOCK_N)
                    t = (_block_term(isum0, xsum0, s0, m0, HAS_MINS, OFF)
                         + _block_term(isum - isum0, xsum - xsum0, s1, m1, HAS_MINS, OFF))
                else:
                    s = _vec(S, soff + k0 // group, k0, K, nmask, BLOCK_N)
                    mn = s
                    if HAS_MINS:
                        mn = _vec(MN, soff + k0 // group, k0, K, nmask, BLOCK_N)
                    t = _block_term(isum, xsum, s, mn, HAS_MINS, OFF)
                acc += d[:, None] * t
            else:
                kk = k0 + j
                x = tl.load(X + rm64[:, None] * stride_xm + kk[None, :] * stride_xk,
                            mask=mmask[:, None] & (kk < K)[None, :], other=0.0)
                w = _run_weights(qv, S, MN, soff, k0, K, group, nmask, HAS_MINS, GROUP16, OFF, 1, BLOCK_N)
                acc = _dot(x, w, acc, IEEE_F32)
    tl.store(Y + rm64[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _dx_kernel(
    DY, Q, S, MN, DX,
    M, N, K, group,
    stride_dym, stride_dyn, stride_qn, stride_sn, stride_dxm,
    BITS: tl.constexpr, HAS_MINS: tl.constexpr, GROUP16: tl.constexpr, IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one 32-byte run of every row per program: output columns k0 .. k0 + 31 (and the 4-bit high half's next 32)
    OFF: tl.constexpr = 1 << (BITS - 1)
    b0 = tl.program_id(0) * 32
    pid_m = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    j = tl.arange(0, 32)
    if BITS == 8:
        k0 = b0
    else:
        k0 = 2 * b0
    acc_lo = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        rn64 = rn.to(tl.int64)
        soff = rn64 * stride_sn
        dy = tl.load(DY + rm64[:, None] * stride_dym + rn64[None, :] * stride_dyn,
                     mask=mmask[:, None] & nmask[None, :], other=0.0)
        qb = tl.load(Q + rn64[:, None] * stride_qn + (b0 + j)[None, :], mask=nmask[:, None], other=0)
        if BITS == 8:
            w = _run_weights(qb, S, MN, soff, k0, K, group, nmask, HAS_MINS, GROUP16, OFF, 0, BLOCK_N)
            acc_lo = _dot(dy, w, acc_lo, IEEE_F32)
        else:
            w = _run_weights(qb & 15, S, MN, soff, k0, K, group, nmask, HAS_MINS, GROUP16, OFF, 0, BLOCK_N)
            acc_lo = _dot(dy, w, acc_lo, IEEE_F32)
            w = _run_weights(qb >> 4, S, MN, soff, k0 + 32, K, group, nmask, HAS_MINS, GROUP16, OFF, 0, BLOCK_N)
            acc_hi = _dot(dy, w, acc_hi, IEEE_F32)
    out = DX + rm64[:, None] * stride_dxm
    tl.store(out + (k0 + j)[None, :], acc_lo.to(DX.dtype.element_ty), mask=mmask[:, None] & (k0 + j < K)[None, :])
    if BITS == 4:
        tl.store(out + (k0 + 32 + j)[None, :], acc_hi.to(DX.dtype.element_ty),
                 mask=mmask[:, None] & (k0 + 32 + j < K)[None, :])


@triton.jit
def _dequant_kernel(
    Q, S, MN, ROWS, W,
    R, K, group, stride_qn, stride_sn, stride_wr,
    BITS: tl.constexpr, HAS_MINS: tl.constexpr, GROUP16: tl.constexpr, HAS_ROWS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    # one 32-byte run of BLOCK_R rows per program
    OFF: tl.constexpr = 1 << (BITS - 1)
    HALVES: tl.constexpr = 2 if BITS == 4 else 1
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rr < R
    if HAS_ROWS:
        rn64 = tl.load(ROWS + rr, mask=rmask, other=0).to(tl.int64)
    else:
        rn64 = rr.to(tl.int64)
    b0 = tl.program_id(1) * 32
    j = tl.arange(0, 32)
    qb = tl.load(Q + rn64[:, None] * stride_qn + (b0 + j)[None, :], mask=rmask[:, None], other=0)
    out = W + rr.to(tl.int64)[:, None] * stride_wr
    for h in tl.static_range(HALVES):
        k0 = HALVES * b0 + 32 * h
        if BITS == 8:
            qv = qb
        elif h == 0:
            qv = qb & 15
        else:
            qv = qb >> 4
        w = _run_weights(qv, S, MN, rn64 * stride_sn, k0, K, group, rmask, HAS_MINS, GROUP16, OFF, 0, BLOCK_R)
        tl.store(out + (k0 + j)[None, :], w.to(W.dtype.element_ty), mask=rmask[:, None] & (k0 + j < K)[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------
def row_bytes(k: int, bits: int) -> int:
    """Bytes per packed row: K padded to 32 (8-bit) or to 64 and two per byte (4-bit)."""
    return padded_k(k) if bits == 8 else -(-k // 64) * 32


def packed_shapes(n, k, bits, group, has_mins):
    """(qdata, scales, mins) shapes of the GPU layout (the module docstring)."""
    ng = n_groups(k, group)
    return (n, row_bytes(k, bits)), (n, ng), ((n, ng) if has_mins else (0,))


def _has_mins(mins) -> bool:
    return mins is not None and mins.numel() > 0


def quant_pack(q, scales, mins, bits, group):
    """The logical weight (q uint8 (N, K), scales/mins (N, n_groups)) in the GPU layout: (qdata, scales, mins),
    mins (0,) when absent. Torch ops (run once at load)."""
    n, k = q.shape
    off = 1 << (bits - 1)
    if bits == 8:
        qdata = torch.full((n, row_bytes(k, 8)), off, dtype=torch.uint8, device=q.device)
        qdata[:, :k] = q
    else:
        k64 = row_bytes(k, 4) * 2
        full = torch.full((n, k64), off, dtype=torch.uint8, device=q.device)
        full[:, :k] = q
        runs = full.view(n, k64 // 64, 2, 32)
        qdata = (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(n, k64 // 2)
    m = mins.contiguous().clone() if _has_mins(mins) else scales.new_empty((0,))
    return qdata, scales.contiguous().clone(), m


def quant_unpack(qdata, scales, mins, bits, group, n, k):
    """The inverse of quant_pack, bit for bit: (q (N, K), scales, mins)."""
    if bits == 8:
        q = qdata[:, :k].clone()
    else:
        runs = qdata.view(n, -1, 1, 32)
        q = torch.cat((runs & 15, runs >> 4), 2).reshape(n, -1)[:, :k].contiguous()
    m = mins.clone() if _has_mins(mins) else scales.new_empty((0,))
    return q, scales.clone(), m


def quantize_int8_act(x):
    """x (M, K) as int8 blocks of 32: (xq int8 (M, Kp), d float32 (M, Kp / 32)) with d = absmax / 127 and
    xq = round_half_even(x * (1 / d)) (0 where d == 0); the row padded with zeros to Kp = K rounded up to 32.
    Reads M * K, writes M * Kp bytes and M * Kp / 8 scale bytes."""
    m, k = x.shape
    kp = padded_k(k)
    xq = torch.empty((m, kp), dtype=torch.int8, device=x.device)
    xd = torch.empty((m, kp // BLOCK), dtype=torch.float32, device=x.device)
    if m == 0 or kp == 0:
        return xq, xd
    blocks = 8
    _act_quant_kernel[(m, triton.cdiv(kp // BLOCK, blocks))](
        x, xq, xd, k, kp // BLOCK, x.stride(0), x.stride(1), xq.stride(0), xd.stride(0),
        BLOCKS=blocks, num_warps=1,
    )
    return xq, xd


def _tiles(m, ieee_f32, int8_act):
    """(BLOCK_M, BLOCK_N, num_warps): a 16-row tile (the smallest dot) and narrow N tiles (more programs) for
    decode. For prefill: 64 x 64 in 16-bit; 32 rows with int8 activations (int32 sums per block live next to the
    float32 accumulator); 32 x 32 on 8 warps for float32 x, whose IEEE dots run on FMA units that hold both
    operands in registers."""
    if m <= 16:
        return 16, 32, 4
    if int8_act:
        return 32, 64, 4
    return (32, 32, 8) if ieee_f32 else (64, 64, 8)


def quantize_int8_terms(x):
    """x (M, K) as two int8 terms (quant_linear's int8_act=2): (xq (2M, Kp), d (2M, Kp / 32)) with rows 2i the
    row quantized as quantize_int8_act does and 2i + 1 what that left over (x - d * xq, rounded once to float32),
    quantized the same way. The two rows' products add up to x's."""
    m, k = x.shape
    kp = padded_k(k)
    xq1, d1 = quantize_int8_act(x)
    first = (xq1.double().view(m, kp // BLOCK, BLOCK) * d1.double()[:, :, None]).view(m, kp)[:, :k]
    xq2, d2 = quantize_int8_act((x.double() - first).float())
    return torch.stack([xq1, xq2], 1).view(2 * m, -1), torch.stack([d1, d2], 1).view(2 * m, -1)


def quant_linear(x, qdata, scales, mins, bits, group, n, k, int8_act):
    """y (M, N) = x (M, K) @ W^T in x's dtype, W dequantised in registers; int8_act 1: x quantized per block of 32
    first (quantize_int8_act) and multiplied with integer dots; 2: two int8 terms (quantize_int8_terms), their
    float32 products summed (float activations from FLOAT_ROWS rows: activation_terms). Reads the packed weight once
    per BLOCK_M rows of x (N * row_bytes bytes + scales), x, and writes M * N."""
    int8_act = activation_terms(int(int8_act), x.shape[0])
    if int8_act == 2:
        xq, xd = quantize_int8_terms(x)
        y2 = _int8_linear(xq, xd, torch.float32, qdata, scales, mins, bits, group, n, k)
        return y2.view(x.shape[0], 2, n).sum(1).to(x.dtype)
    if int8_act:
        return _int8_linear(*quantize_int8_act(x), x.dtype, qdata, scales, mins, bits, group, n, k)
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    ieee = x.dtype == torch.float32
    block_m, block_n, warps = _tiles(m, ieee, False)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    has_mins = _has_mins(mins)
    _linear_kernel[grid](
        x, x, x, qdata, scales, mins if has_mins else scales, y,
        m, n, k, group, qdata.shape[1],
        x.stride(0), x.stride(1), qdata.stride(0), scales.stride(0), y.stride(0), 0, 0,
        BITS=bits, HAS_MINS=has_mins, INT8_ACT=False, GROUP16=group == 16, IEEE_F32=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y


def _int8_linear(xq, xd, dtype, qdata, scales, mins, bits, group, n, k):
    """y (M, N) in dtype from int8 activations xq (M, Kp) with block scales xd (M, Kp / 32)."""
    m = xq.shape[0]
    y = torch.empty((m, n), dtype=dtype, device=xq.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.zero_()
    has_mins = _has_mins(mins)
    block_m, block_n, warps = _tiles(m, False, True)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _linear_kernel[grid](
        xq, xq, xd, qdata, scales, mins if has_mins else scales, y,
        m, n, k, group, qdata.shape[1],
        0, 0, qdata.stride(0), scales.stride(0), y.stride(0), xq.stride(0), xd.stride(0),
        BITS=bits, HAS_MINS=has_mins, INT8_ACT=True, GROUP16=group == 16, IEEE_F32=False,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y


def quant_linear_dx(dy, qdata, scales, mins, bits, group, n, k):
    """dx (M, K) = dy (M, N) @ W in dy's dtype, one 32-byte run of the rows (32 or 64 columns) per program. Reads
    the packed weight once per BLOCK_M rows of dy, writes M * K."""
    m = dy.shape[0]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    has_mins = _has_mins(mins)
    ieee = dy.dtype == torch.float32
    block_m = 16 if m <= 16 else (32 if ieee else 64)
    warps = 8 if ieee and m > 16 else 4
    grid = (qdata.shape[1] // 32, triton.cdiv(m, block_m))
    _dx_kernel[grid](
        dy, qdata, scales, mins if has_mins else scales, dx,
        m, n, k, group,
        dy.stride(0), dy.stride(1), qdata.stride(0), scales.stride(0), dx.stride(0),
        BITS=bits, HAS_MINS=has_mins, GROUP16=group == 16, IEEE_F32=ieee,
        BLOCK_M=block_m, BLOCK_N=32, num_warps=warps,
    )
    return dx


def quant_dequantize(qdata, scales, mins, bits, group, n, k, dtype, rows=None):
    """W (N, K) in dtype, or W[rows] (R, K) for int64 row indices (an embedding lookup): the float32 weights of
    the format rounded to dtype. Reads R * row_bytes bytes and scales, writes R * K elements."""
    r = n if rows is None else rows.shape[0]
    w = torch.empty((r, k), dtype=dtype, device=qdata.device)
    if r == 0 or k == 0:
        return w
    has_mins = _has_mins(mins)
    block_r = 64
    grid = (triton.cdiv(r, block_r), qdata.shape[1] // 32)
    _dequant_kernel[grid](
        qdata, scales, mins if has_mins else scales, rows if rows is not None else qdata, w,
        r, k, group, qdata.stride(0), scales.stride(0), w.stride(0),
        BITS=bits, HAS_MINS=has_mins, GROUP16=group == 16, HAS_ROWS=rows is not None, BLOCK_R=block_r,
        num_warps=4,
    )
    return w
