"""Mamba's selective scan: the forward scan, its backward, and the one-token decoding step.

    dt_t  = softplus(delta_t + delta_bias)            (bias and softplus optional; softplus(x) = x for x > 20)
    x_t   = exp(dt_t A) * x_{t-1} + dt_t u_t B_t        x: (N,) per (batch, channel), x_{-1} = 0
    y_t   = <x_t, C_t> + D u_t;   out_t = y_t * silu(z_t)
Backward, with g_t = dout_t silu(z_t) and the state adjoint h_t = C_t g_t + exp(dt_{t+1} A) h_{t+1}
(h_{L-1} also gets dlast, the gradient reaching the final state):
    dz_t = dout_t y_t silu'(z_t);  dC_t += g_t x_t;  dB_t += dt_t u_t h_t;  du_t = dt_t <h_t, B_t> + D g_t
    ddt_t = <h_t, A exp(dt_t A) x_{t-1} + u_t B_t>;  dA += dt_t h_t exp(dt_t A) x_{t-1};  dD += g_t u_t
    ddelta_t = ddt_t sigmoid(delta_t + bias) (ddt_t where softplus is the identity);  dbias = sum_{b,t} ddelta

Layout: u, delta, z, dout (batch, dim, L) with a unit L stride; A (dim, N); B, C (batch, G, N, L) contiguous, channel
d reading group d // (dim // G); D, delta_bias (dim,). Every kernel runs one program per (batch, group, block of
BLOCK_D channels of that group), so a program's channels share one B_t and C_t (two (N,) vectors per step) and its
dB / dC contributions are one (N,) row per step: the backward writes them to a per-block partial buffer
(batch, G, blocks, N, L) that the launcher sums (deterministic; with one block per group the kernel writes dB / dC
directly). dA, dD and dbias are per-channel sums over t written per batch and summed over batch by the launcher.
The state, a (BLOCK_D, BLOCK_N) tile (BLOCK_N = N rounded up to a power of two, masked), stays in float32
registers for the whole sequence; 16-bit inputs are widened on load.
The forward writes the state once every `chunk` steps; the backward walks the chunks in reverse, recomputes each
chunk's states from the saved one before it into a float32 scratch buffer (batch, dim, min(chunk, L), N), then
walks the chunk in reverse carrying the adjoint in registers.
"""
import torch
import triton
import triton.language as tl

# Elements of the (BLOCK_D, BLOCK_N) state tile per program: 4 per thread of 4 warps. The backward keeps about ten
# such tiles live (state, previous state, chunk start, adjoint, dA accumulator, temporaries), which fits the
# register file without spills on sm_80 / sm_90; smaller tiles also mean more programs for the sequential scan.
TILE = 512
MAX_BLOCK_D = 64


# ---------------------------------------------------------------------------------------------------------
# kernels. The per-step math is written out in the loops rather than in @triton.jit helpers: under the interpreter
# every call of a jit function re-patches triton.language, which costs more than the step's arithmetic.
# softplus(x) = x for x > 20 (torch's threshold), else log1p(exp(x)) computed as log(w) * e / (w - 1) with
# w = 1 + e, e = exp(x) (Goldberg: exact where w rounds; e where w == 1); sigmoid(x) = 1 / (1 + exp(-x)).
# ---------------------------------------------------------------------------------------------------------
@triton.jit
def _scan_fwd_kernel(
    U, DELTA, A, B, C, D, Z, DBIAS, OUT, STATES,
    stride_ub, stride_ud, stride_db, stride_dd, stride_zb, stride_zd,
    dim, L, dpg, G, N, chunk, nchunks,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    cin = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # channels within the group
    mask_d = cin < dpg
    d = g * dpg + cin.to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask = mask_d[:, None] & mask_n[None, :]
    a = tl.load(A + d[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    dv = 0.0
    if HAS_D:
        dv = tl.load(D + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=mask_d, other=0.0).to(tl.float32)
    u_p = U + b * stride_ub + d * stride_ud
    dl_p = DELTA + b * stride_db + d * stride_dd
    z_p = Z
    if HAS_Z:
        z_p = Z + b * stride_zb + d * stride_zd
    o_p = OUT + (b * dim + d) * L
    b_p = B + ((b * G + g) * N + n) * L
    c_p = C + ((b * G + g) * N + n) * L
    s_p = STATES + (b * dim + d[:, None]) * nchunks * N + n[None, :]
    x = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    for c in range(0, nchunks):
        t0 = c * chunk
        t1 = tl.minimum(t0 + chunk, L)
        for t in range(t0, t1):
            u = tl.load(u_p + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dl_p + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                e = tl.exp(dt)
                w = 1.0 + e
                dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))
            bt = tl.load(b_p + t, mask=mask_n, other=0.0)
            ct = tl.load(c_p + t, mask=mask_n, other=0.0)
            x = tl.exp(dt[:, None] * a) * x + (dt * u)[:, None] * bt[None, :]
            y = tl.sum(x * ct[None, :], axis=1)
            if HAS_D:
                y += dv * u
            if HAS_Z:
                zz = tl.load(z_p + t, mask=mask_d, other=0.0).to(tl.float32)
                y = y * zz / (1.0 + tl.exp(-zz))
            tl.store(o_p + t, y.to(OUT.dtype.element_ty), mask=mask_d)
        tl.store(s_p + c * N, x, mask=mask)


@triton.jit
def _scan_bwd_kernel(
    DOUT, U, DELTA, A, B, C, D, Z, DBIAS, STATES, DLAST, SCRATCH,
    DU, DDELTA, DZ, DB_P, DC_P, DA_P, DD_P, DBIAS_P,
    stride_ob, stride_od, stride_ub, stride_ud, stride_db, stride_dd, stride_zb, stride_zd,
    dim, L, dpg, G, N, chunk, nchunks, scratch_len, nblk,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DLAST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2).to(tl.int64)
    cin = j * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cin < dpg
    d = g * dpg + cin
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask = mask_d[:, None] & mask_n[None, :]
    dn = d[:, None] * N + n[None, :]
    a = tl.load(A + dn, mask=mask, other=0.0).to(tl.float32)
    dv = 0.0
    if HAS_D:
        dv = tl.load(D + d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(DBIAS + d, mask=mask_d, other=0.0).to(tl.float32)
    do_p = DOUT + b * stride_ob + d * stride_od
    u_p = U + b * stride_ub + d * stride_ud
    dl_p = DELTA + b * stride_db + d * stride_dd
    z_p = Z
    if HAS_Z:
        z_p = Z + b * stride_zb + d * stride_zd
    row = (b * dim + d) * L                                   # du, ddelta, dz: contiguous (batch, dim, L)
    du_p, ddl_p, dz_p = DU + row, DDELTA + row, DZ + row
    b_p = B + ((b * G + g) * N + n) * L
    c_p = C + ((b * G + g) * N + n) * L
    part = (((b * G + g) * nblk + j) * N + n) * L            # this block's rows of the dB / dC partials
    db_p, dc_p = DB_P + part, DC_P + part
    s_p = STATES + (b * dim + d[:, None]) * nchunks * N + n[None, :]
    w_p = SCRATCH + (b * dim + d[:, None]) * scratch_len * N + n[None, :]
    if HAS_DLAST:
        carry = tl.load(DLAST + (b * dim) * N + dn, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)  # exp(dt_{t+1} A) h_{t+1}
    da_acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    dd_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        t0 = c * chunk
        T = tl.minimum(chunk, L - t0)
        # the state before the chunk (zero before the first), then the chunk's states into the scratch buffer
        # (scalar conditions go through tl.where, not into load masks: the interpreter takes only tensor masks)
        x0 = tl.where(c > 0, tl.load(s_p + tl.maximum(c - 1, 0) * N, mask=mask, other=0.0), 0.0)
        x = x0
        for i in range(0, T):
            t = t0 + i
            u = tl.load(u_p + t, mask=mask_d, other=0.0).to(tl.float32)
            dt = tl.load(dl_p + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                e = tl.exp(dt)
                w = 1.0 + e
                dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))
            bt = tl.load(b_p + t, mask=mask_n, other=0.0)
            x = tl.exp(dt[:, None] * a) * x + (dt * u)[:, None] * bt[None, :]
            tl.store(w_p + i * N, x, mask=mask)
        tl.debug_barrier()  # the chunk's states are written before any thread reads them back
        for k in range(0, T):
            i = T - 1 - k
            t = t0 + i
            x_prev = tl.where(i > 0, tl.load(w_p + tl.maximum(i - 1, 0) * N, mask=mask, other=0.0), x0)
            u = tl.load(u_p + t, mask=mask_d, other=0.0).to(tl.float32)
            raw = tl.load(dl_p + t, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                raw += bias
            dt = raw
            if SOFTPLUS:
                e = tl.exp(raw)
                w = 1.0 + e
                dt = tl.where(raw > 20.0, raw, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))
            dout = tl.load(do_p + t, mask=mask_d, other=0.0).to(tl.float32)
            bt = tl.load(b_p + t, mask=mask_n, other=0.0)
            ct = tl.load(c_p + t, mask=mask_n, other=0.0)
            ea = tl.exp(dt[:, None] * a)
            if HAS_Z:
                zz = tl.load(z_p + t, mask=mask_d, other=0.0).to(tl.float32)
                sz = 1.0 / (1.0 + tl.exp(-zz))
                y = tl.sum(x * ct[None, :], axis=1)               # the output before the gate
                if HAS_D:
                    y += dv * u
                tl.store(dz_p + t, (dout * y * sz * (1.0 + zz * (1.0 - sz))).to(DZ.dtype.element_ty),
                         mask=mask_d)
                gy = dout * zz * sz
            else:
                gy = dout
            h = ct[None, :] * gy[:, None] + carry
            tl.store(dc_p + t, tl.sum(gy[:, None] * x, axis=0), mask=mask_n)
            hb = tl.sum(h * bt[None, :], axis=1)
            hax = h * ea * x_prev
            tl.store(db_p + t, tl.sum(h * (dt * u)[:, None], axis=0), mask=mask_n)
            da_acc += dt[:, None] * hax
            du = dt * hb
            if HAS_D:
                du += dv * gy
                dd_acc += gy * u
            ddt = tl.sum(a * hax, axis=1) + u * hb
            if SOFTPLUS:
                ddt = tl.where(raw > 20.0, ddt, ddt * (e / w))  # softplus'(x) = sigmoid(x) = e / (1 + e)
            dbias_acc += ddt
            tl.store(du_p + t, du.to(DU.dtype.element_ty), mask=mask_d)
            tl.store(ddl_p + t, ddt.to(DDELTA.dtype.element_ty), mask=mask_d)
            carry = ea * h
            x = x_prev
        tl.debug_barrier()  # every read of the scratch buffer is done before the next chunk overwrites it
    tl.store(DA_P + (b * dim) * N + dn, da_acc, mask=mask)
    if HAS_D:
        tl.store(DD_P + b * dim + d, dd_acc, mask=mask_d)
    if HAS_BIAS:
        tl.store(DBIAS_P + b * dim + d, dbias_acc, mask=mask_d)


@triton.jit
def _state_update_kernel(
    STATE, X, DT, A, B, C, D, Z, DBIAS, Y,
    stride_sb, stride_sd, stride_xb, stride_xd, stride_tb, stride_td, stride_zb, stride_zd,
    dim, dpg, G, N,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    cin = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = cin < dpg
    d = g * dpg + cin.to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    mask_n = n < N
    mask = mask_d[:, None] & mask_n[None, :]
    a = tl.load(A + d[:, None] * N + n[None, :], mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(X + b * stride_xb + d * stride_xd, mask=mask_d, other=0.0).to(tl.float32)
    dt = tl.load(DT + b * stride_tb + d * stride_td, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += tl.load(DBIAS + d, mask=mask_d, other=0.0).to(tl.float32)
    if SOFTPLUS:
        e = tl.exp(dt)
        w = 1.0 + e
        dt = tl.where(dt > 20.0, dt, tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0))))
    bt = tl.load(B + (b * G + g) * N + n, mask=mask_n, other=0.0)
    ct = tl.load(C + (b * G + g) * N + n, mask=mask_n, other=0.0)
    s_p = STATE + b * stride_sb + d[:, None] * stride_sd + n[None, :]
    s = tl.load(s_p, mask=mask, other=0.0).to(tl.float32)
    s = s * tl.exp(dt[:, None] * a) + (dt * xv)[:, None] * bt[None, :]
    tl.store(s_p, s.to(STATE.dtype.element_ty), mask=mask)
    y = tl.sum(s * ct[None, :], axis=1)
    if HAS_D:
        y += tl.load(D + d, mask=mask_d, other=0.0).to(tl.float32) * xv
    if HAS_Z:
        zz = tl.load(Z + b * stride_zb + d * stride_zd, mask=mask_d, other=0.0).to(tl.float32)
        y = y * zz / (1.0 + tl.exp(-zz))
    tl.store(Y + b * dim + d, y.to(Y.dtype.element_ty), mask=mask_d)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------
def _blocks(dpg, N):
    """(BLOCK_D, BLOCK_N, num_warps, blocks per group) for groups of dpg channels and state size N."""
    block_n = triton.next_power_of_2(max(N, 1))
    block_d = min(triton.next_power_of_2(max(dpg, 1)), max(1, TILE // block_n), MAX_BLOCK_D)
    warps = 4 if block_d * block_n >= 512 else (2 if block_d * block_n >= 128 else 1)
    return block_d, block_n, warps, triton.cdiv(dpg, block_d)


def _strides(t):
    return (t.stride(0), t.stride(1)) if t is not None else (0, 0)


def _unit_last(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int):
    """out, states of the selective scan (module docstring).  u, delta, z (or None) (batch, dim, L) dtype T, any
    strides but the last; A (dim, N), B, C (batch, G, N, L), D, delta_bias (dim,) or None, float32 contiguous ->
    out (batch, dim, L) T, states (batch, dim, ceil(L / chunk), N) float32 (states[:, :, c] = the state after step
    min((c + 1) chunk, L) - 1).  Moves (3 + [z]) batch dim L elements of T, 2 batch G N L * 4 bytes of B, C (read
    once per block of channels, from cache after the first), and batch dim ceil(L / chunk) N * 4 bytes of states."""
    u, delta, z = _unit_last(u), _unit_last(delta), _unit_last(z)
    batch, dim, L = u.shape
    N, G = A.shape[1], B.shape[1]
    dpg = dim // G
    nchunks = triton.cdiv(L, chunk)
    out = torch.empty((batch, dim, L), dtype=u.dtype, device=u.device)
    states = torch.empty((batch, dim, nchunks, N), dtype=torch.float32, device=u.device)
    block_d, block_n, warps, nblk = _blocks(dpg, N)
    if batch * dim * L > 0:
        _scan_fwd_kernel[(batch, G, nblk)](
            u, delta, A, B, C, D, z, delta_bias, out, states,
            *_strides(u), *_strides(delta), *_strides(z), dim, L, dpg, G, N, chunk, nchunks,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    return out, states


def selective_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, chunk: int, states, dlast):
    """Gradients of the selective scan (module docstring).  dout (batch, dim, L) T (any strides but the last), the
    forward's arguments and states, dlast (batch, dim, N) float32 or None (the gradient reaching the final state)
    -> du, ddelta (w.r.t. the raw delta) (batch, dim, L) T; dA (dim, N); dB, dC (batch, G, N, L); dD (dim,) or (0,)
    without D; dz (batch, dim, L) T or (0,) without z; ddelta_bias (dim,) or (0,); all but du, ddelta, dz float32.
    Moves (7 + 2 [z]) batch dim L elements of T (u and delta read twice: recompute and reverse walk), B and C
    likewise twice per block of channels; every state written to and read back from the scratch buffer (2 batch
    dim L N * 4 bytes; a program's chunk, BLOCK_D chunk N * 4 bytes, mostly from cache); the dB, dC partials
    (2 batch G blocks N L * 4 bytes) written and read back by the sum."""
    dout, u, delta, z = _unit_last(dout), _unit_last(u), _unit_last(delta), _unit_last(z)
    batch, dim, L = u.shape
    N, G = A.shape[1], B.shape[1]
    dpg = dim // G
    nchunks = states.shape[2]
    block_d, block_n, warps, nblk = _blocks(dpg, N)
    launch = batch * dim * L > 0
    dev, f32 = u.device, torch.float32
    part = torch.empty if launch else torch.zeros
    du = torch.empty((batch, dim, L), dtype=u.dtype, device=dev)
    ddelta = torch.empty((batch, dim, L), dtype=delta.dtype, device=dev)
    dz = torch.empty((batch, dim, L), dtype=z.dtype, device=dev) if z is not None else u.new_empty((0,))
    dB_p = part((batch, G, nblk, N, L), dtype=f32, device=dev)
    dC_p = part((batch, G, nblk, N, L), dtype=f32, device=dev)
    dA_p = part((batch, dim, N), dtype=f32, device=dev)
    dD_p = part((batch, dim), dtype=f32, device=dev) if D is not None else None
    dbias_p = part((batch, dim), dtype=f32, device=dev) if delta_bias is not None else None
    scratch_len = min(chunk, L)
    if launch:
        scratch = torch.empty((batch, dim, scratch_len, N), dtype=f32, device=dev)
        dlast = dlast.contiguous() if dlast is not None else None
        states = states.contiguous()
        _scan_bwd_kernel[(batch, G, nblk)](
            dout, u, delta, A, B, C, D, z, delta_bias, states, dlast, scratch,
            du, ddelta, dz, dB_p, dC_p, dA_p, dD_p, dbias_p,
            *_strides(dout), *_strides(u), *_strides(delta), *_strides(z),
            dim, L, dpg, G, N, chunk, nchunks, scratch_len, nblk,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            HAS_DLAST=dlast is not None, BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    dB = dB_p.view(batch, G, N, L) if nblk == 1 else dB_p.sum(2)
    dC = dC_p.view(batch, G, N, L) if nblk == 1 else dC_p.sum(2)
    dA = dA_p.sum(0)
    dD = dD_p.sum(0) if D is not None else A.new_empty((0,))
    dbias = dbias_p.sum(0) if delta_bias is not None else A.new_empty((0,))
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus: bool):
    """One decoding step, in place on state: dt' = softplus(dt + dt_bias); state = state exp(dt' A) + dt' x B;
    y = <state, C> + D x, times silu(z).  state (batch, dim, N) float32 (unit last stride, any other strides: a
    slice of a cache), x, dt, z (or None) (batch, dim) T (any strides); A (dim, N), B, C (batch, G, N), D, dt_bias
    (dim,) or None, float32 contiguous -> y (batch, dim) T.  Moves 2 batch dim N * 4 bytes of state, dim N * 4 of
    A and (3 + [z]) batch dim elements of T."""
    batch, dim, N = state.shape
    G = B.shape[1]
    dpg = dim // G
    y = torch.empty((batch, dim), dtype=x.dtype, device=x.device)
    block_d, block_n, warps, nblk = _blocks(dpg, N)
    if batch * dim > 0:
        _state_update_kernel[(batch, G, nblk)](
            state, x, dt, A, B, C, D, z, dt_bias, y,
            state.stride(0), state.stride(1), *_strides(x), *_strides(dt), *_strides(z), dim, dpg, G, N,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=dt_bias is not None, SOFTPLUS=bool(dt_softplus),
            BLOCK_D=block_d, BLOCK_N=block_n, num_warps=warps)
    return y
