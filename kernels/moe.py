"""Mixture-of-experts experts (tritium.ops.moe): SwiGLU MLPs over tokens grouped by expert, as grouped GEMMs over
the sorted rows. Rows r = 0..R-1 are the T k (token, expert) assignments sorted by expert: tokens[r] the token,
weights[r] the routing weight, offsets (E + 1) each expert's first row. x (T, D), w13 (E, 2F, D) = [gate; up],
w2 (E, D, F).

forward:  a = x[tokens] W13_e^T (R, 2F) (saved);  y[t] = sum_{r: tokens[r] = t} weights[r] swiglu(a_r) W2_e^T
backward: g = dy[tokens] W2_e (R, F);  dweights = rowsum(g * h);  da = swiglu'(a) (weights g) (R, 2F);
          dW2_e = dy[tok_e]^T (weights h)_e;  dW13_e = da_e^T x[tok_e];  dx[t] = sum_r da_r W13_e

Two kernels:

- ``_grouped_mm_kernel``: C (R, N) = A[rows] (R, K) @ B_e (K, N) per expert e over its rows, where a program takes
  BLOCK_M rows of one expert (a table of tiles per expert, computed on the device, maps the program to its
  expert: no host sync). A's rows come through tokens (GATHER: x or dy) or in place; SWIGLU_A: A is a (R, 2F)
  pre-activation whose rows are turned into silu(gate) * up as the tile is loaded (the forward's down product
  reads a, never an h). Epilogues: STORE (a, the forward's gate/up product), SCATTER (weights[r] * C_r added into
  a float32 (T, N) buffer at row tokens[r] with atomics: the combine and dx), SWIGLU_BWD (the backward's
  g = dy W2_e: dweights by atomics over the column blocks, da and weights * h stored).
- ``_grouped_tn_kernel``: out_e (P, Q) = A_e^T (P, n_e) @ B_e (n_e, Q) over each expert's rows (dW2, dW13), with
  either operand gathered through tokens; an expert without rows gets zeros.

16-bit operands multiply on the dot units with float32 accumulation; float32 with IEEE float32 dots (no tf32).
Row offsets are 64-bit.
"""
import torch
import triton
import triton.language as tl

STORE, SCATTER, SWIGLU_BWD = 0, 1, 2


@triton.jit
def _dot(a, b, acc, IEEE_F32: tl.constexpr):
    if IEEE_F32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile_expert(TILE_OFF, t, E):
    """The expert whose tiles [TILE_OFF[e], TILE_OFF[e + 1]) hold tile t (E when t is past the last tile)."""
    e = 0
    for i in range(0, E):
        e += (tl.load(TILE_OFF + i + 1) <= t).to(tl.int32)
    return e


@triton.jit
def _grouped_mm_kernel(
    A, B, C, TOK, W, OFF, TILE_OFF, AUX, DW, HW,
    N, K, E,
    stride_am, stride_be, stride_bk, stride_bn, stride_cm, stride_auxm,
    GATHER: tl.constexpr, SWIGLU_A: tl.constexpr, EPILOGUE: tl.constexpr, HAS_W: tl.constexpr,
    IEEE_F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    e = _tile_expert(TILE_OFF, t, E)
    if e >= E:
        return
    row0 = tl.load(OFF + e)
    row1 = tl.load(OFF + e + 1)
    rm = row0 + (t - tl.load(TILE_OFF + e)) * BLOCK_M + tl.arange(0, BLOCK_M)
    mmask = rm < row1
    rm64 = rm.to(tl.int64)
    if GATHER:
        arow = tl.load(TOK + rm64, mask=mmask, other=0)
    else:
        arow = rm64
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    b_base = B + e.to(tl.int64) * stride_be
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        am = mmask[:, None] & kmask[None, :]
        if SWIGLU_A:
            # A is (R, 2K): gate columns [0, K), up columns [K, 2K); the tile of silu(gate) * up in float32
            gate = tl.load(A + arow[:, None] * stride_am + rk[None, :], mask=am, other=0.0)
            up = tl.load(A + arow[:, None] * stride_am + K + rk[None, :], mask=am, other=0.0)
            gf = gate.to(tl.float32)
            a = (gf / (1.0 + tl.exp(-gf)) * up.to(tl.float32)).to(gate.dtype)
        else:
            a = tl.load(A + arow[:, None] * stride_am + rk[None, :], mask=am, other=0.0)
        b = tl.load(b_base + rk[:, None] * stride_bk + rn[None, :] * stride_bn, mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = _dot(a, b, acc, IEEE_F32)
    cmask = mmask[:, None] & nmask[None, :]
    if EPILOGUE == 0:
        tl.store(C + rm64[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=cmask)
    elif EPILOGUE == 1:
        # C is the float32 (T, N) accumulator: C[tokens[r]] += weights[r] * row r (a token's k rows are in k
        # different experts, so different programs may add into one row: atomics)
        tok = tl.load(TOK + rm64, mask=mmask, other=0)
        if HAS_W:
            acc = acc * tl.load(W + rm64, mask=mmask, other=0.0).to(tl.float32)[:, None]
        tl.atomic_add(C + tok[:, None] * stride_cm + rn[None, :], acc, mask=cmask)
    else:
        # acc = g (BLOCK_M, BLOCK_N) of dy W2_e; AUX = a (R, 2N); C = da (R, 2N); DW = float32 dweights (R,);
        # W = weights; HW = weights * h (R, N), the down weight's gradient operand.
        g = acc.to(C.dtype.element_ty).to(tl.float32)   # rounded as the C++ kernel's GEMM output is
        gate = tl.load(AUX + rm64[:, None] * stride_auxm + rn[None, :], mask=cmask, other=0.0).to(tl.float32)
        up = tl.load(AUX + rm64[:, None] * stride_auxm + N + rn[None, :], mask=cmask, other=0.0).to(tl.float32)
        w = tl.load(W + rm64, mask=mmask, other=0.0).to(tl.float32)[:, None]
        s = 1.0 / (1.0 + tl.exp(-gate))
        sl = gate * s
        h = sl * up
        tl.atomic_add(DW + rm64, tl.sum(g * h, axis=1), mask=mmask)
        dh = w * g
        tl.store(C + rm64[:, None] * stride_cm + rn[None, :], (dh * up * s * (1.0 + gate * (1.0 - s))).to(
            C.dtype.element_ty), mask=cmask)
        tl.store(C + rm64[:, None] * stride_cm + N + rn[None, :], (dh * sl).to(C.dtype.element_ty), mask=cmask)
        tl.store(HW + rm64[:, None] * N + rn[None, :], (w * h).to(C.dtype.element_ty), mask=cmask)


@triton.jit
def _grouped_tn_kernel(
    A, B, TOK, OFF, OUT,
    P, Q,
    stride_am, stride_bm, stride_oe, stride_op,
    GATHER_A: tl.constexpr, GATHER_B: tl.constexpr, IEEE_F32: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
):
    e = tl.program_id(0)
    rp = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rq = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    pmask = rp < P
    qmask = rq < Q
    row0 = tl.load(OFF + e)
    row1 = tl.load(OFF + e + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(row0, row1, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        mmask = rm < row1
        rm64 = rm.to(tl.int64)
        tok = tl.load(TOK + rm64, mask=mmask, other=0)
        ra = tok if GATHER_A else rm64
        rb = tok if GATHER_B else rm64
        at = tl.load(A + ra[None, :] * stride_am + rp[:, None], mask=pmask[:, None] & mmask[None, :], other=0.0)
        b = tl.load(B + rb[:, None] * stride_bm + rq[None, :], mask=mmask[:, None] & qmask[None, :], other=0.0)
        acc = _dot(at, b, acc, IEEE_F32)
    tl.store(OUT + e.to(tl.int64) * stride_oe + rp[:, None].to(tl.int64) * stride_op + rq[None, :],
             acc.to(OUT.dtype.element_ty), mask=pmask[:, None] & qmask[None, :])


# ---- launchers ----
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by how the dots multiply: IEEE float32 on the FMA units
# (smaller tiles), 16-bit on tensor cores; tests/kernels/test_moe.py::test_gpu_compile checks each compiles for
# sm_80/sm_90 without spills.
_MM = {"ieee": (32, 64, 32, 4, 2), "mma": (64, 64, 32, 4, 3)}
# the SwiGLU-backward epilogue holds g, gate, up and three results per tile: twice the warps for the same tile
_MM_SWIGLU_BWD = {"ieee": (32, 64, 32, 8, 2), "mma": (64, 64, 32, 8, 3)}
_TN = {"ieee": (32, 64, 32, 4), "mma": (64, 64, 64, 4)}


def _tiles(offsets, block_m):
    """The grouped GEMM's tile table: (TILE_OFF (E + 1,) int32 on the device, the grid's row-tile count, an
    upper bound needing no host sync: cdiv(R, block_m) + E)."""
    counts = offsets[1:] - offsets[:-1]
    tiles = torch.div(counts + block_m - 1, block_m, rounding_mode="floor")
    tile_off = torch.zeros(offsets.shape[0], dtype=torch.int32, device=offsets.device)
    tile_off[1:] = torch.cumsum(tiles, 0)
    return tile_off


def _grouped_mm(a, b, c, tok, w, offsets, R, N, K, *, gather, swiglu_a, epilogue, b_strides, aux=None, dw=None,
                hw=None):
    """Launch _grouped_mm_kernel: b_strides = (expert, k, n) strides of B_e (K, N)."""
    E = offsets.shape[0] - 1
    if R == 0 or N == 0:
        return
    ieee = a.dtype == torch.float32
    BM, BN, BK, warps, stages = (_MM_SWIGLU_BWD if epilogue == SWIGLU_BWD else _MM)["ieee" if ieee else "mma"]
    tile_off = _tiles(offsets, BM)
    grid = (triton.cdiv(R, BM) + E, triton.cdiv(N, BN))
    _grouped_mm_kernel[grid](
        a, b, c, tok, w if w is not None else a, offsets, tile_off, aux if aux is not None else a,
        dw if dw is not None else a, hw if hw is not None else a,
        N, K, E, a.stride(0), *b_strides, c.stride(0), aux.stride(0) if aux is not None else 0,
        GATHER=gather, SWIGLU_A=swiglu_a, EPILOGUE=epilogue, HAS_W=w is not None, IEEE_F32=ieee,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)


def _grouped_tn(a, b, tok, offsets, out, gather_a, gather_b):
    """out[e] (P, Q) = a_e^T @ b_e over expert e's rows (a (., P), b (., Q) unit last stride, either gathered)."""
    E = offsets.shape[0] - 1
    P, Q = out.shape[1], out.shape[2]
    if E == 0 or P == 0 or Q == 0:
        return out
    ieee = a.dtype == torch.float32
    BP, BQ, BM, warps = _TN["ieee" if ieee else "mma"]
    _grouped_tn_kernel[(E, triton.cdiv(P, BP), triton.cdiv(Q, BQ))](
        a, b, tok, offsets, out, P, Q, a.stride(0), b.stride(0), out.stride(0), out.stride(1),
        GATHER_A=gather_a, GATHER_B=gather_b, IEEE_F32=ieee, BLOCK_P=BP, BLOCK_Q=BQ, BLOCK_M=BM, num_warps=warps)
    return out


def moe_experts_fwd(x, w13, w2, tokens, offsets, weights):
    """y (T, D) = sum over each token's rows of weights[r] * swiglu(x[tokens[r]] W13_e^T) W2_e^T, and a (R, 2F)
    the gate/up pre-activations, in x's dtype (y summed in float32 and rounded once). Reads x's rows k times and
    each expert's weights once per row block; writes a (R, 2F) and y."""
    T, D = x.shape
    F = w13.shape[1] // 2
    R = tokens.shape[0]
    x = x.contiguous()
    a = torch.empty((R, 2 * F), dtype=x.dtype, device=x.device)
    acc = torch.zeros((T, D), dtype=torch.float32, device=x.device)
    w13, w2 = w13.contiguous(), w2.contiguous()
    # a = x[tok] @ W13_e^T: B_e (D, 2F) = W13_e^T, strides (expert, k = d, n = 2F row)
    _grouped_mm(x, w13, a, tokens, None, offsets, R, 2 * F, D, gather=True, swiglu_a=False, epilogue=STORE,
                b_strides=(w13.stride(0), w13.stride(2), w13.stride(1)))
    # y[tok] += weights * swiglu(a) @ W2_e^T: B_e (F, D) = W2_e^T
    _grouped_mm(a, w2, acc, tokens, weights, offsets, R, D, F, gather=False, swiglu_a=True, epilogue=SCATTER,
                b_strides=(w2.stride(0), w2.stride(2), w2.stride(1)))
    return acc.to(x.dtype), a


def moe_experts_infer(x, w13, w2, tokens, offsets, weights):
    """moe_experts_fwd's y alone (no backward to come). The down product reads the pre-activations a, so they are
    computed and written all the same; only the op's result leaves them out."""
    return moe_experts_fwd(x, w13, w2, tokens, offsets, weights)[0]


def moe_experts_bwd(dy, x, w13, w2, tokens, offsets, weights, a, need_dx):
    """dx (T, D) (empty when not need_dx), dw13 (E, 2F, D), dw2 (E, D, F), dweights (R,), in x's dtype."""
    T, D = x.shape
    F2 = w13.shape[1]
    F = F2 // 2
    R = tokens.shape[0]
    dy, x, a = dy.contiguous(), x.contiguous(), a.contiguous()
    w13, w2 = w13.contiguous(), w2.contiguous()
    da = torch.empty((R, F2), dtype=x.dtype, device=x.device)
    hw = torch.empty((R, F), dtype=x.dtype, device=x.device)
    dwt = torch.zeros((R,), dtype=torch.float32, device=x.device)
    # g = dy[tok] @ W2_e: B_e (D, F) = W2_e as stored; the epilogue gives da, weights * h and dweights
    _grouped_mm(dy, w2, da, tokens, weights, offsets, R, F, D, gather=True, swiglu_a=False, epilogue=SWIGLU_BWD,
                b_strides=(w2.stride(0), w2.stride(1), w2.stride(2)), aux=a, dw=dwt, hw=hw)
    dw2 = torch.empty_like(w2)
    _grouped_tn(dy, hw, tokens, offsets, dw2, True, False)      # dW2_e = dy[tok]^T (weights h) (D, F)
    dw13 = torch.empty_like(w13)
    _grouped_tn(da, x, tokens, offsets, dw13, False, True)      # dW13_e = da^T x[tok] (2F, D)
    if need_dx:
        acc = torch.zeros((T, D), dtype=torch.float32, device=x.device)
        # dx[tok] += da @ W13_e: B_e (2F, D) = W13_e as stored
        _grouped_mm(da, w13, acc, tokens, None, offsets, R, D, F2, gather=False, swiglu_a=False, epilogue=SCATTER,
                    b_strides=(w13.stride(0), w13.stride(1), w13.stride(2)))
        dx = acc.to(x.dtype)
    else:
        dx = torch.empty((0,), dtype=x.dtype, device=x.device)
    return dx, dw13, dw2, dwt.to(x.dtype)
