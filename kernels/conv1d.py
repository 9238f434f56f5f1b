"""Mamba's causal depthwise conv1d: forward, backward and the decoding update.

x (batch, dim, L) with L contiguous, weight (dim, W), bias (dim,), initial_states (batch, dim, W - 1). With xp the
row padded on the left by its initial states (zeros without them), xp[j] = x[j - (W - 1)]:
    z[t] = bias + sum_k w[k] xp[t + k],   out[t] = z[t] (silu: z[t] sigmoid(z[t]))           t in [0, L)
backward, dz[t] = dout[t] (silu: times s (1 + z (1 - s)), s = sigmoid(z[t]), z recomputed from x):
    dxp[u] = sum_k w[k] dz[u - k]   u in [0, L + W - 1): dx = dxp[W - 1:], d initial_states = dxp[:W - 1]
    dw[k] = sum_{batch, t} dz[t] xp[t + k],  dbias = sum_{batch, t} dz[t]
Each program takes a (BLOCK_D channels, BLOCK_L positions) tile of one batch entry; the backward writes its dw /
dbias sums to its own slots of a partials tensor, which the launcher sums (no atomics: deterministic). 16-bit
inputs accumulate in float32.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _conv_fwd_kernel(
    X, W, BIAS, INIT, OUT,
    D, L, stride_xb, stride_xd, stride_ib, stride_id, n_dblocks,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // n_dblocks).to(tl.int64)
    c = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cmask = c < D
    mask = cmask[:, None] & (t < L)[None, :]
    c64 = c.to(tl.int64)[:, None]
    xrow = X + b * stride_xb + c64 * stride_xd
    acc = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(WIDTH):
        w = tl.load(W + c * WIDTH + k, mask=cmask, other=0.0).to(tl.float32)
        s = t[None, :] - (WIDTH - 1) + k  # x's position
        v = tl.load(xrow + s, mask=mask & (s >= 0), other=0.0).to(tl.float32)
        if HAS_INIT:  # before position 0: the initial states
            v += tl.load(INIT + b * stride_ib + c64 * stride_id + (s + WIDTH - 1), mask=mask & (s < 0),
                         other=0.0).to(tl.float32)
        acc += w[:, None] * v
    if SILU:
        acc = acc / (1.0 + tl.exp(-acc))
    tl.store(OUT + (b * D + c64) * L + t[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _conv_bwd_kernel(
    DOUT, X, W, BIAS, INIT, DX, DINIT, DW_PART, DB_PART,
    D, L, stride_gb, stride_gd, stride_xb, stride_xd, stride_ib, stride_id, n_dblocks, n_lblocks,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_INIT: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    W1: tl.constexpr = WIDTH - 1
    pid = tl.program_id(0)
    pl = tl.program_id(1)
    b = (pid // n_dblocks).to(tl.int64)
    c = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    u = pl * BLOCK_L + tl.arange(0, BLOCK_L)  # positions of xp, [0, L + W - 1)
    cmask = c < D
    cm = cmask[:, None]
    c64 = c.to(tl.int64)[:, None]
    xrow = X + b * stride_xb + c64 * stride_xd
    grow = DOUT + b * stride_gb + c64 * stride_gd
    ws = ()
    for k in tl.static_range(WIDTH):
        ws = ws + (tl.load(W + c * WIDTH + k, mask=cmask, other=0.0).to(tl.float32)[:, None],)
    # xs[d] = xp[u + d - (W - 1)], d in [0, 2W - 1): every shift the recomputed z[u - k] reads, loaded once (without
    # silu only xp[u], for dw)
    xs = ()
    for d in tl.static_range(2 * WIDTH - 1 if SILU else 1):
        s = u[None, :] + (d - 2 * W1 if SILU else -W1)  # x's position
        m = cm & (s < L)
        v = tl.load(xrow + s, mask=m & (s >= 0), other=0.0).to(tl.float32)
        if HAS_INIT:
            v += tl.load(INIT + b * stride_ib + c64 * stride_id + (s + W1), mask=m & (s < 0) & (s >= -W1),
                         other=0.0).to(tl.float32)
        xs = xs + (v,)
    xu = xs[W1 if SILU else 0]
    zb = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    if HAS_BIAS:
        zb += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    part = (b * n_lblocks + pl) * D + c.to(tl.int64)
    dxp = tl.zeros((BLOCK_D, BLOCK_L), dtype=tl.float32)
    for k in tl.static_range(WIDTH):
        t = u - k
        dz = tl.load(grow + t[None, :], mask=cm & ((t >= 0) & (t < L))[None, :], other=0.0).to(tl.float32)
        if SILU:  # z[u - k] = bias + sum_j w[j] xp[u - k + j]
            z = zb
            for j in tl.static_range(WIDTH):
                z += ws[j] * xs[j - k + W1]
            sg = 1.0 / (1.0 + tl.exp(-z))
            dz = dz * sg * (1.0 + z * (1.0 - sg))
        dxp += ws[k] * dz
        # dw[k] = sum_t dz[t] xp[t + k] = sum_u dz[u - k] xp[u]
        tl.store(DW_PART + part * WIDTH + k, tl.sum(dz * xu, axis=1), mask=cmask)
        if HAS_BIAS and k == 0:  # dbias = sum_u dz[u]
            tl.store(DB_PART + part, tl.sum(dz, axis=1), mask=cmask)
    s = u - W1
    tl.store(DX + (b * D + c64) * L + s[None, :], dxp.to(DX.dtype.element_ty),
             mask=cm & ((s >= 0) & (s < L))[None, :])
    if HAS_INIT:
        tl.store(DINIT + (b * D + c64) * W1 + u[None, :], dxp.to(DINIT.dtype.element_ty), mask=cm & (u < W1)[None, :])


@triton.jit
def _conv_update_kernel(
    X, STATE, W, BIAS, OUT,
    D, T, S, stride_xb, stride_xd, stride_sb, stride_sd, n_dblocks,
    WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # the window of a row: win[j] = state[j] for j < S, x[j - S] for j in [S, S + T)
    pid = tl.program_id(0)
    b = (pid // n_dblocks).to(tl.int64)
    c = (pid % n_dblocks) * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = c < D
    cm = cmask[:, None]
    c64 = c.to(tl.int64)[:, None]
    xrow = X + b * stride_xb + c64 * stride_xd
    srow = STATE + b * stride_sb + c64 * stride_sd
    bias = tl.zeros((BLOCK_D, 1), dtype=tl.float32)
    if HAS_BIAS:
        bias += tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    # outputs (reads only): out[t] = bias + sum_k w[k] win[S + t - (W - 1) + k]
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tm = cm & (t < T)[None, :]
        acc = bias + tl.zeros((BLOCK_D, BLOCK_T), dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            w = tl.load(W + c * WIDTH + k, mask=cmask, other=0.0).to(tl.float32)
            j = S + t[None, :] - (WIDTH - 1) + k  # >= 0: S >= W - 1
            v = tl.load(srow + j, mask=tm & (j < S), other=0.0).to(tl.float32)
            v += tl.load(xrow + (j - S), mask=tm & (j >= S), other=0.0).to(tl.float32)
            acc += w[:, None] * v
        if SILU:
            acc = acc / (1.0 + tl.exp(-acc))
        tl.store(OUT + (b * D + c64) * T + t[None, :], acc.to(OUT.dtype.element_ty), mask=tm)
    # the new state: win[T + i], i in [0, S), loaded in full before any of it is stored
    i = tl.arange(0, BLOCK_S)[None, :]
    j = T + i
    sm = cm & (i < S)
    old = tl.load(srow + j, mask=sm & (j < S), other=0.0)
    new = tl.load(xrow + (j - S), mask=sm & (j >= S), other=0.0)
    new = tl.where(j < S, old, new)
    tl.debug_barrier()
    tl.store(srow + i, new, mask=sm)


def _tile(n: int, D: int, elems: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_L) for rows of n positions: up to 512 positions, channels filling `elems` elements."""
    block_l = min(max(triton.next_power_of_2(max(n, 1)), 16), 512)
    block_d = min(max(elems // block_l, 1), triton.next_power_of_2(D))
    return block_d, block_l


def causal_conv1d_fwd(x, weight, bias, initial_states, silu):
    """out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (W - 1) + k]), x before 0 being initial_states
    (zeros without them). x (batch, dim, L) with unit last stride, weight (dim, W) contiguous, bias (dim,) or None,
    initial_states (batch, dim, W - 1) (unit last stride) or None -> out (batch, dim, L) contiguous.
    Moves 2 batch dim L elements (+ the weights and states)."""
    B, D, L = x.shape
    W = weight.shape[1]
    out = torch.empty((B, D, L), device=x.device, dtype=x.dtype)
    if out.numel() > 0:
        block_d, block_l = _tile(L, D, 2048)
        nd = triton.cdiv(D, block_d)
        has_init = initial_states is not None
        _conv_fwd_kernel[(B * nd, triton.cdiv(L, block_l))](
            x, weight, bias, initial_states, out, D, L, x.stride(0), x.stride(1),
            initial_states.stride(0) if has_init else 0, initial_states.stride(1) if has_init else 0, nd,
            WIDTH=W, HAS_BIAS=bias is not None, HAS_INIT=has_init, SILU=bool(silu),
            BLOCK_D=block_d, BLOCK_L=block_l, num_warps=max(1, block_d * block_l // 512))  # 16 per thread
    return out


def causal_conv1d_bwd(dout, x, weight, bias, initial_states, silu):
    """The gradients of causal_conv1d_fwd: dout, x (batch, dim, L) with unit last stride -> dx (batch, dim, L),
    dweight (dim, W), dbias (dim,) (empty without bias), d initial_states (batch, dim, W - 1) (empty without them).
    The pre-activation is recomputed from x. Moves 3 batch dim L elements + batch ceil((L + W - 1) / BLOCK_L)
    dim (W + 1) float32 partials."""
    B, D, L = x.shape
    W = weight.shape[1]
    has_init = initial_states is not None
    dx = torch.empty((B, D, L), device=x.device, dtype=x.dtype)
    dinit = torch.empty((B, D, W - 1), device=x.device, dtype=x.dtype) if has_init else x.new_empty((0,))
    block_d, block_l = _tile(L + W - 1, D, 2048)
    nd, nl = triton.cdiv(D, block_d), triton.cdiv(L + W - 1, block_l)
    dw_part = torch.zeros((B * nl, D, W), device=x.device, dtype=torch.float32)
    db_part = torch.zeros((B * nl, D), device=x.device, dtype=torch.float32) if bias is not None else None
    if B * D > 0 and L > 0:
        _conv_bwd_kernel[(B * nd, nl)](
            dout, x, weight, bias, initial_states, dx, dinit, dw_part, db_part, D, L,
            dout.stride(0), dout.stride(1), x.stride(0), x.stride(1),
            initial_states.stride(0) if has_init else 0, initial_states.stride(1) if has_init else 0, nd, nl,
            WIDTH=W, HAS_BIAS=bias is not None, HAS_INIT=has_init, SILU=bool(silu),
            BLOCK_D=block_d, BLOCK_L=block_l, num_warps=max(1, block_d * block_l // 128))  # 4 per thread
    elif has_init:
        dinit.zero_()
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else x.new_empty((0,))
    return dx, dweight, dbias, dinit


def causal_conv1d_update(x, conv_state, weight, bias, silu):
    """Decoding steps: per row the window win = [conv_state (state_len), x (seqlen)];
    out[t] = act(bias + sum_k weight[k] win[state_len + t - (W - 1) + k]); conv_state (batch, dim, state_len >=
    W - 1, unit last stride) becomes win's last state_len entries, in place. x (batch, dim, seqlen) with unit last
    stride -> out (batch, dim, seqlen). Moves 2 batch dim (seqlen + state_len) elements."""
    B, D, T = x.shape
    W, S = weight.shape[1], conv_state.shape[2]
    out = torch.empty((B, D, T), device=x.device, dtype=x.dtype)
    if B * D > 0:
        block_t = min(triton.next_power_of_2(max(T, 1)), 16)
        block_s = triton.next_power_of_2(max(S, 1))
        block_d = min(max(256 // max(block_t, block_s), 1), triton.next_power_of_2(D))
        nd = triton.cdiv(D, block_d)
        _conv_update_kernel[(B * nd,)](
            x, conv_state, weight, bias, out, D, T, S, x.stride(0), x.stride(1), conv_state.stride(0),
            conv_state.stride(1), nd, WIDTH=W, HAS_BIAS=bias is not None, SILU=bool(silu),
            BLOCK_D=block_d, BLOCK_T=block_t, BLOCK_S=block_s, num_warps=2)
    return out
