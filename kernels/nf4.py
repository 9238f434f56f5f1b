"""NF4 weight-only linear layers (tritium.ops.nf4; docs/quantization.md "NF4" has bitsandbytes' layout).

W (N, K), K a multiple of the blocksize (64 .. 4096), is ``qweight`` uint8 (N K / 2,): row n is bytes
[n K / 2, (n + 1) K / 2), byte j of a row holding element 2j in its high nibble and 2j + 1 in its low one; ``absmax``
float32 (N K / blocksize,) scales each block of blocksize elements of a row. A weight is NF4_CODE[q] * absmax in
float32 (bitsandbytes' dequantize_4bit, one rounding).

Each program reads runs of 32 bytes of BLOCK_N rows (64 elements, inside one block): the high nibbles are the
run's 32 even elements and the low nibbles its 32 odd ones; each index becomes its code value by a load from the
16-entry code table (a 64-byte array that stays in L1), times the block's absmax; tl.join of the two halves and a
reshape put the 64 weights back in order for one dot.

Kernels (all accumulate in float32; float32 operands in IEEE float32 dots, 16-bit ones on the dot units with the
weights rounded to x's dtype, as torch's matmul of a 16-bit dequantised weight; row offsets are 64-bit):

nf4_linear_fwd:  y (M, N) = x (M, K) @ W^T + bias, per (BLOCK_M rows of x, BLOCK_N rows of W) program, a loop over K
                 in runs of 64. Reads the packed weight once per BLOCK_M rows of x, writes M * N.
nf4_linear_dx:   dx (M, K) = dy (M, N) @ W, per (BLOCK_M rows, one run of 64 columns) program, a loop over N.
nf4_dequantize:  W (N, K) in float32 / bfloat16 / float16.
"""
import torch
import triton
import triton.language as tl

from tritium.ops.nf4 import NF4_CODE_VALUES

RUN = 64  # elements per run (32 bytes): blocksizes are multiples of it
_codes = {}


def _code(device) -> torch.Tensor:
    key = str(device)
    if key not in _codes:
        _codes[key] = torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)
    return _codes[key]


@triton.jit
def _dot(a, b, acc, IEEE_F32: tl.constexpr):
    if IEEE_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _run_weights(Q, A, CODE, rn64, nmask, k0, K, bs, BLOCK_N: tl.constexpr):
    """(BLOCK_N, 64) float32 weights of elements k0 .. k0 + 63 of rows rn (0 in masked rows)."""
    rj = tl.arange(0, 32)
    b = tl.load(Q + rn64[:, None] * (K // 2) + (k0 // 2 + rj)[None, :], mask=nmask[:, None], other=0).to(tl.int32)
    s = tl.load(A + rn64 * (K // bs) + k0 // bs, mask=nmask, other=0.0)
    we = tl.load(CODE + (b >> 4)) * s[:, None]
    wo = tl.load(CODE + (b & 15)) * s[:, None]
    return tl.reshape(tl.join(we, wo), (BLOCK_N, 64))


@triton.jit
def _fwd_kernel(X, Q, A, CODE, BIAS, Y, M, N, K, bs, stride_xm, stride_ym,
                HAS_BIAS: tl.constexpr, IEEE_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    nmask = rn < N
    mmask = rm < M
    rn64 = rn.to(tl.int64)
    rm64 = rm.to(tl.int64)
    rk = tl.arange(0, 64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, 64):
        x = tl.load(X + rm64[:, None] * stride_xm + (k0 + rk)[None, :], mask=mmask[:, None], other=0.0)
        w = _run_weights(Q, A, CODE, rn64, nmask, k0, K, bs, BLOCK_N)
        acc = _dot(x, tl.trans(w.to(x.dtype)), acc, IEEE_F32)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm64[:, None] * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _dx_kernel(DY, Q, A, CODE, DX, M, N, K, bs, stride_dm, stride_xm,
               IEEE_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * 64
    rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < M
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, 64), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        nmask = rn < N
        dy = tl.load(DY + rm64[:, None] * stride_dm + rn[None, :], mask=mmask[:, None] & nmask[None, :], other=0.0)
        w = _run_weights(Q, A, CODE, rn.to(tl.int64), nmask, k0, K, bs, BLOCK_N)
        acc = _dot(dy, w.to(dy.dtype), acc, IEEE_F32)
    tl.store(DX + rm64[:, None] * stride_xm + (k0 + tl.arange(0, 64))[None, :], acc.to(DX.dtype.element_ty),
             mask=mmask[:, None])


@triton.jit
def _dequant_kernel(Q, A, CODE, OUT, N, K, bs, BLOCK_N: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * 64
    nmask = rn < N
    rn64 = rn.to(tl.int64)
    w = _run_weights(Q, A, CODE, rn64, nmask, k0, K, bs, BLOCK_N)
    tl.store(OUT + rn64[:, None] * K + (k0 + tl.arange(0, 64))[None, :], w.to(OUT.dtype.element_ty),
             mask=nmask[:, None])


def _tiles(m, ieee_f32):
    """(BLOCK_M, BLOCK_N, num_warps): a 16-row tile (the smallest dot) and narrow N tiles (more programs) for a
    decode step; 64 x 64 for 16-bit prefill; 32 x 32 on 8 warps for float32 (IEEE dots on FMA units)."""
    if m <= 16:
        return 16, 32, 4
    return (32, 32, 8) if ieee_f32 else (64, 64, 8)


def nf4_linear_fwd(x, qweight, absmax, bias, n, k, blocksize):
    m = x.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    ieee = x.dtype == torch.float32
    block_m, block_n, warps = _tiles(m, ieee)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _fwd_kernel[grid](x, qweight, absmax, _code(x.device), bias if bias is not None else x, y, m, n, k, blocksize,
                      x.stride(0), y.stride(0), HAS_BIAS=bias is not None, IEEE_F32=ieee,
                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return y


def nf4_linear_dx(dy, qweight, absmax, n, k, blocksize):
    m = dy.shape[0]
    dx = torch.empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0:
        return dx
    if n == 0:
        return dx.zero_()
    ieee = dy.dtype == torch.float32
    block_m = 16 if m <= 16 else (32 if ieee else 64)
    grid = (k // RUN, triton.cdiv(m, block_m))
    # a 64-row 16-bit tile spills on 4 warps (sm_80): 8 share its accumulator
    _dx_kernel[grid](dy, qweight, absmax, _code(dy.device), dx, m, n, k, blocksize, dy.stride(0), dx.stride(0),
                     IEEE_F32=ieee, BLOCK_M=block_m, BLOCK_N=32, num_warps=8 if block_m == 64 else 4)
    return dx


def nf4_dequantize(qweight, absmax, n, k, blocksize, dtype):
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if n == 0:
        return out
    grid = (triton.cdiv(n, 16), k // RUN)
    _dequant_kernel[grid](qweight, absmax, _code(qweight.device), out, n, k, blocksize, BLOCK_N=16, num_warps=4)
    return out
