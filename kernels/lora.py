"""LoRA linear layers (tritium.ops.lora): a frozen base weight W (N, K) with a low-rank adapter A (R, K), B (N, R)
and scale s, the dropout on the adapter's input given as a 0/1 mask m (M, K) (or none) whose 1 / (1 - p) the caller
folds into s.

forward:  xs = s (x * m) A^T (M, R), saved for the backward;  y = x W^T + bias + xs B^T (M, N)
backward: g = dy B (M, R);  dx = dy W + s ((g A) * m);  dA = s g^T (x * m) (R, K);  dB = dy^T xs (N, R)

Three kernels serve the five products, each taking its operands through strides (so transposes are views):

- ``_lora_down_kernel``: out (M, R) = scale (X (M, K) [* m]) @ Wr (R, K)^T: xs in the forward, g in the backward
  (X = dy, Wr = B^T). One program per BLOCK_M rows and BLOCK_R ranks (16, the smallest dot, to 64).
- ``_lora_matmul_kernel``: C (M, N) = X (M, K) @ W (N, K)^T [+ bias] + (E (M, R) @ F (N, R)^T) [* m]: the
  forward's y (E = xs, F = B) and the backward's dx (X = dy, W = W^T, E = s g, F = A^T, the mask on the low-rank
  term). The low-rank product is the epilogue of the tile's K loop (BLOCK_R ranks per dot), added to the float32
  accumulator before the one store, so the (M, N) output is written once and never read back.
- ``_lora_tgrad_kernel``: out (P, R) = scale X (M, P)^T [* m] @ G (M, R): dB (X = dy, G = xs) and dA^T (X = x with
  the mask, G = g), a loop over M per BLOCK_P columns and BLOCK_R ranks.

16-bit inputs multiply on the dot units with float32 accumulation; float32 ones with IEEE float32 dots (no tf32).
Row offsets are 64-bit.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _dot(a, b, acc, IEEE_F32: tl.constexpr):
    if IEEE_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _lora_down_kernel(
    X, MASK, WR, OUT,
    M, K, R, scale,
    stride_xm, stride_xk, stride_mm, stride_wr, stride_wk, stride_om,
    HAS_MASK: tl.constexpr, IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mmask = rm < M
    rmask = rr < R
    rm64 = rm.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        xm = mmask[:, None] & kmask[None, :]
        x = tl.load(X + rm64[:, None] * stride_xm + rk[None, :] * stride_xk, mask=xm, other=0.0)
        if HAS_MASK:
            # the product in float32 (exact for a 0/1 mask), rounded back to x's dtype for the dot
            x = (x.to(tl.float32) * tl.load(MASK + rm64[:, None] * stride_mm + rk[None, :], mask=xm,
                                              other=0.0).to(tl.float32)).to(x.dtype)
        w = tl.load(WR + rr[None, :] * stride_wr + rk[:, None] * stride_wk, mask=kmask[:, None] & rmask[None, :],
                    other=0.0)
        acc = _dot(x, w.to(x.dtype), acc, IEEE_F32)
    tl.store(OUT + rm64[:, None] * stride_om + rr[None, :], (acc * scale).to(OUT.dtype.element_ty),
             mask=mmask[:, None] & rmask[None, :])


@triton.jit
def _lora_matmul_kernel(
    X, W, BIAS, E, F, MASK, C,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_em, stride_fn, stride_fr, stride_mm, stride_cm,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped ordering of the tiles: GROUP_M row blocks sweep the columns together, so W's tiles stay in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_n)
    first_m = group * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_n)) % size_m
    pid_n = (pid % (GROUP_M * n_n)) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(X + rm64[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mmask[:, None] & kmask[None, :],
                    other=0.0)
        w = tl.load(W + rn64[None, :] * stride_wn + rk[:, None] * stride_wk, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = _dot(x, w, acc, IEEE_F32)
    # the low-rank term, in the epilogue: (BLOCK_M, R) @ (R, BLOCK_N), BLOCK_R ranks at a time
    # (into the accumulator itself without a mask: a second (BLOCK_M, BLOCK_N) float32 tile would spill)
    cmask = mmask[:, None] & nmask[None, :]
    low = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) if HAS_MASK else acc
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        rmask = rr < R
        e = tl.load(E + rm64[:, None] * stride_em + rr[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        f = tl.load(F + rn64[None, :] * stride_fn + rr[:, None] * stride_fr, mask=rmask[:, None] & nmask[None, :],
                    other=0.0)
        low = _dot(e, f.to(e.dtype), low, IEEE_F32)
    if HAS_MASK:
        acc += low * tl.load(MASK + rm64[:, None] * stride_mm + rn[None, :], mask=cmask, other=0.0).to(tl.float32)
    else:
        acc = low
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(C + rm64[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=cmask)


@triton.jit
def _lora_tgrad_kernel(
    X, MASK, G, OUT,
    M, P, R, scale,
    stride_xm, stride_mm, stride_gm, stride_op, stride_or,
    HAS_MASK: tl.constexpr, IEEE_F32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
):
    rp = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    pmask = rp < P
    rmask = rr < R
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < M
        rm64 = rm.to(tl.int64)
        xm = pmask[:, None] & mmask[None, :]
        xt = tl.load(X + rm64[None, :] * stride_xm + rp[:, None], mask=xm, other=0.0)   # (BLOCK_P, BLOCK_M)
        if HAS_MASK:
            xt = (xt.to(tl.float32) * tl.load(MASK + rm64[None, :] * stride_mm + rp[:, None], mask=xm,
                                                other=0.0).to(tl.float32)).to(xt.dtype)
        g = tl.load(G + rm64[:, None] * stride_gm + rr[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        acc = _dot(xt, g.to(xt.dtype), acc, IEEE_F32)
    tl.store(OUT + rp[:, None].to(tl.int64) * stride_op + rr[None, :] * stride_or,
             (acc * scale).to(OUT.dtype.element_ty), mask=pmask[:, None] & rmask[None, :])


# ---- launchers ----
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the matmul by how it multiplies: IEEE float32 dots run on
# the FMA units, each thread holding both operands' rows in registers (smaller tiles); 16-bit ones on tensor cores.
# tests/kernels/test_lora.py::test_gpu_compile checks each compiles for sm_80/sm_90 without spills.
_MATMUL = {"ieee": (32, 64, 32, 8, 2), "mma": (128, 128, 32, 8, 3)}
_GROUP_M = 8


def _rank_block(r: int, most: int = 64) -> int:
    """Ranks per dot: at least 16 (the smallest dot), at most `most` (higher ranks loop, or take more programs;
    the matmul's epilogue takes 32 at a time beside its accumulator tile)."""
    return min(most, max(16, triton.next_power_of_2(r)))


def _down(x, mask, wr, scale, ieee):
    """scale (x [* mask]) @ wr^T -> (M, R) in x's dtype; wr (R, K) any strides, x and mask unit last stride."""
    M, K = x.shape
    R = wr.shape[0]
    out = torch.empty((M, R), dtype=x.dtype, device=x.device)
    if M == 0:
        return out
    BR = _rank_block(R)
    BM, BK = (32, 32) if ieee else (64, 64)
    _lora_down_kernel[(triton.cdiv(M, BM), triton.cdiv(R, BR))](
        x, mask if mask is not None else x, wr, out, M, K, R, scale,
        x.stride(0), x.stride(1), mask.stride(0) if mask is not None else 0, wr.stride(0), wr.stride(1),
        out.stride(0), HAS_MASK=mask is not None, IEEE_F32=ieee, BLOCK_M=BM, BLOCK_K=BK, BLOCK_R=BR,
        num_warps=4)
    return out


def _matmul(x, w, bias, e, f, mask, ieee):
    """x (M, K) @ w^T + bias + (e @ f^T) [* mask] -> (M, N); w (N, K) and f (N, R) any strides."""
    M, K = x.shape
    N, R = w.shape[0], e.shape[1]
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return c
    BM, BN, BK, warps, stages = _MATMUL["ieee" if ieee else "mma"]
    grid = (triton.cdiv(M, BM) * triton.cdiv(N, BN),)
    _lora_matmul_kernel[grid](
        x, w, bias if bias is not None else x, e, f, mask if mask is not None else x, c,
        M, N, K, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), e.stride(0), f.stride(0), f.stride(1),
        mask.stride(0) if mask is not None else 0, c.stride(0),
        HAS_BIAS=bias is not None, HAS_MASK=mask is not None, IEEE_F32=ieee,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, BLOCK_R=_rank_block(R, 32), GROUP_M=_GROUP_M,
        num_warps=warps, num_stages=stages)
    return c


def _tgrad(x, mask, g, scale, out, ieee):
    """out (P, R) (any strides) = scale (x [* mask])^T @ g; x (M, P), g (M, R) unit last stride."""
    M, P = x.shape
    R = g.shape[1]
    if P == 0:
        return out
    BP, BM = (32, 32) if ieee else (64, 64)
    BR = _rank_block(R)
    _lora_tgrad_kernel[(triton.cdiv(P, BP), triton.cdiv(R, BR))](
        x, mask if mask is not None else x, g, out, M, P, R, scale,
        x.stride(0), mask.stride(0) if mask is not None else 0, g.stride(0), out.stride(0), out.stride(1),
        HAS_MASK=mask is not None, IEEE_F32=ieee, BLOCK_P=BP, BLOCK_M=BM, BLOCK_R=BR, num_warps=4)
    return out


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, mask, scaling):
    """y (M, N) = x W^T + bias + xs B^T and xs (M, R) = scaling (x * mask) A^T, both in x's dtype (xs rounded once,
    the low-rank product from it as the forward's epilogue). x and mask (M, K) with unit last stride, weight
    (N, K), lora_A (R, K), lora_B (N, R), bias (N,) or None, mask None or 0/1 in x's dtype. Reads x twice (the
    down product, then each of the cdiv(N, BLOCK_N) column blocks' K loops) and W once per row block, writes
    M (N + R)."""
    ieee = x.dtype == torch.float32
    xs = _down(x, mask, lora_A, scaling, ieee)
    y = _matmul(x, weight, bias, xs, lora_B, None, ieee)
    return y, xs


def lora_linear_bwd(dy, x, weight, lora_A, lora_B, mask, xs, scaling, need_dx):
    """dx (M, K) = dy W + scaling ((dy B) A) * mask (empty when not need_dx), dA (R, K) = scaling (dy B)^T (x * mask),
    dB (N, R) = dy^T xs, in x's dtype. g = dy B (M, R) is computed once, scaled by `scaling` and rounded to x's
    dtype, and feeds dx's epilogue and dA."""
    ieee = x.dtype == torch.float32
    M, K = x.shape
    gs = _down(dy, None, lora_B.t(), scaling, ieee)                       # s dy B (M, R)
    dx = (_matmul(dy, weight.t(), None, gs, lora_A.t(), mask, ieee) if need_dx
          else torch.empty((0,), dtype=x.dtype, device=x.device))
    dA = torch.empty(lora_A.shape, dtype=x.dtype, device=x.device)
    _tgrad(x, mask, gs, 1.0, dA.t(), ieee)                                # dA^T (K, R) = (x m)^T (s g)
    dB = torch.empty(lora_B.shape, dtype=x.dtype, device=x.device)
    _tgrad(dy, None, xs, 1.0, dB, ieee)                                   # dB (N, R) = dy^T xs
    return dx, dA, dB
