"""RWKV-7's wkv recurrence: the forward scan, its backward, and the one-token decoding step.

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        S: (K, V) per (batch, head)
    o_t = scale S_t^T r_t
Backward, with dS the state's adjoint carried from step t + 1 (dht, the final state's gradient, at the end) and
sa = S_{t-1}^T a_t:
    dS += scale r_t do_t^T;  dr_t = scale S_t do_t;  dk_t = dS v_t;  dv_t = dS^T k_t;  db_t = dS sa;
    dsa = dS^T b_t;  dw_t = exp(w_t) * rowsum(dS * S_{t-1});  da_t = S_{t-1} dsa;  dS <- diag(exp(w_t)) dS + a_t dsa^T

Layout: r, w, k, a, b (B, T, H, K) and v, do (B, T, H, V), each with a unit last stride (any other strides); the
state, initial state and dht (B, H, K, V) float32 contiguous. The state's columns are independent of each other
(a^T S and b^T dS act per column), so every kernel runs one program per (block of BLOCK_V columns, batch, head),
the (BLOCK_K, BLOCK_V) tile (BLOCK_K = K rounded up to a power of two, masked) in float32 registers for the whole
sequence; 16-bit inputs are widened on load. The per-key gradients (dr, dw, dk, da, db) sum over the columns:
each column block writes its partial sums to a float32 buffer (blocks, B, T, H, K) that the launcher sums
(deterministic). The forward writes the state once every `chunk` steps; the backward walks the chunks in reverse,
recomputes each chunk's states from the saved one before it into a float32 scratch buffer
(B, H, min(chunk, T), K, V), then walks the chunk in reverse carrying the adjoint in registers.
"""
import torch
import triton
import triton.language as tl

# Elements of the (BLOCK_K, BLOCK_V) tile per program: 8 per thread of 4 warps in the forward; the backward keeps
# about six such tiles live (adjoint, S_t, S_{t-1}, the chunk's start, temporaries) and takes half, which fits the
# register file without spills on sm_80 / sm_90. Smaller tiles also mean more programs for the sequential scan.
FWD_TILE = 1024
BWD_TILE = 512
NUM_WARPS = 4


def _blocks(K: int, V: int, tile: int):
    block_k = triton.next_power_of_2(max(K, 1))
    block_v = max(1, min(triton.next_power_of_2(max(V, 1)), tile // block_k))
    return block_k, block_v, triton.cdiv(V, block_v)


def _strides(t):
    return t.stride(0), t.stride(1), t.stride(2)


# ---------------------------------------------------------------------------------------------------------
# kernels. The per-step math is written out in the loops (no @triton.jit helpers: under the interpreter every call
# of a jit function re-patches triton.language, which costs more than the step's arithmetic).
# ---------------------------------------------------------------------------------------------------------
# RWKV-6: o_t = scale (S_{t-1} + diag(u) k_t v_t^T)^T r_t;  S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T, u (H, K).
# Backward (dS the adjoint of S_t, vdo = v_t . do_t over this program's columns, ru = sum_i r_i u_i k_i):
#   dk_t = dS v_t + scale u r_t vdo;  dv_t = dS^T k_t + scale ru do_t;  dw_t = exp(w_t) rowsum(dS S_{t-1});
#   dr_t = scale (S_{t-1} do_t + u k_t vdo);  du += scale r_t k_t vdo;  dS <- diag(exp(w_t)) dS + scale r_t do_t^T
# The per-key terms are linear in vdo, so each column block's partial sums add up to the whole.
#
# One forward and one backward kernel serve both versions: the constexpr V7 picks RWKV-7's step (a and b, no u)
# or RWKV-6's (u, no a and b); the version's absent operands are dummies that are never read or written.
@triton.jit
def _wkv_fwd_kernel(
    R, W, Kt, Vt, A, Bt, U, H0, O, STATES,
    srb, srt, srh, swb, swt, swh, skb, skt, skh, svb, svt, svh, sab, sat, sah, sbb, sbt, sbh,
    L, H, K, V, scale, chunk, nchunks,
    V7: tl.constexpr, HAS_H0: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    ok = tl.arange(0, BLOCK_K)
    ov = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = ok < K
    mv = ov < V
    mask = mk[:, None] & mv[None, :]
    kv = ok[:, None] * V + ov[None, :]
    if HAS_H0:
        S = tl.load(H0 + bh * K * V + kv, mask=mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if not V7:
        u = tl.load(U + h * K + ok, mask=mk, other=0.0).to(tl.float32)
    r_p = R + b * srb + h * srh + ok
    w_p = W + b * swb + h * swh + ok
    k_p = Kt + b * skb + h * skh + ok
    v_p = Vt + b * svb + h * svh + ov
    a_p = A + b * sab + h * sah + ok
    b_p = Bt + b * sbb + h * sbh + ok
    o_p = O + (b * L * H + h) * V + ov  # o: contiguous (B, T, H, V)
    s_p = STATES + bh * nchunks * K * V + kv
    for c in range(0, nchunks):
        t0 = c * chunk
        t1 = tl.minimum(t0 + chunk, L)
        for t in range(t0, t1):
            rt = tl.load(r_p + t * srt, mask=mk, other=0.0).to(tl.float32)
            wt = tl.load(w_p + t * swt, mask=mk, other=0.0).to(tl.float32)
            kt = tl.load(k_p + t * skt, mask=mk, other=0.0).to(tl.float32)
            vt = tl.load(v_p + t * svt, mask=mv, other=0.0).to(tl.float32)
            if V7:
                at = tl.load(a_p + t * sat, mask=mk, other=0.0).to(tl.float32)
                bt = tl.load(b_p + t * sbt, mask=mk, other=0.0).to(tl.float32)
                sa = tl.sum(at[:, None] * S, axis=0)
                S = tl.exp(wt)[:, None] * S + bt[:, None] * sa[None, :] + kt[:, None] * vt[None, :]
                o = tl.sum((rt * scale)[:, None] * S, axis=0)
            else:
                ru = tl.sum(rt * u * kt, axis=0)
                o = (tl.sum(rt[:, None] * S, axis=0) + ru * vt) * scale
                S = tl.exp(wt)[:, None] * S + kt[:, None] * vt[None, :]
            tl.store(o_p + t * H * V, o.to(O.dtype.element_ty), mask=mv)
        tl.store(s_p + c * K * V, S, mask=mask)


@triton.jit
def _wkv_bwd_kernel(
    DO, R, W, Kt, Vt, A, Bt, U, H0, STATES, DHT, SCRATCH,
    DR_P, DW_P, DK_P, DA_P, DB_P, DU_P, DV, DH0,
    sdb, sdt, sdh, srb, srt, srh, swb, swt, swh, skb, skt, skh, svb, svt, svh, sab, sat, sah, sbb, sbt, sbh,
    L, H, K, V, scale, chunk, nchunks, scratch_len, part_stride,
    V7: tl.constexpr, HAS_H0: tl.constexpr, HAS_DHT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    iv = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    ok = tl.arange(0, BLOCK_K)
    ov = iv * BLOCK_V + tl.arange(0, BLOCK_V)
    mk = ok < K
    mv = ov < V
    mask = mk[:, None] & mv[None, :]
    kv = ok[:, None] * V + ov[None, :]
    if HAS_DHT:
        dS = tl.load(DHT + bh * K * V + kv, mask=mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if HAS_H0:
        h0 = tl.load(H0 + bh * K * V + kv, mask=mask, other=0.0).to(tl.float32)
    else:
        h0 = tl.zeros([BLOCK_K, BLOCK_V], dtype=tl.float32)
    if not V7:
        u = tl.load(U + h * K + ok, mask=mk, other=0.0).to(tl.float32)
        du = tl.zeros([BLOCK_K], dtype=tl.float32)
    do_p = DO + b * sdb + h * sdh + ov
    r_p = R + b * srb + h * srh + ok
    w_p = W + b * swb + h * swh + ok
    k_p = Kt + b * skb + h * skh + ok
    v_p = Vt + b * svb + h * svh + ov
    a_p = A + b * sab + h * sah + ok
    b_p = Bt + b * sbb + h * sbh + ok
    s_p = STATES + bh * nchunks * K * V + kv
    x_p = SCRATCH + bh * scratch_len * K * V + kv
    part = iv * part_stride + (b * L * H + h) * K + ok  # this column block's partials: (blocks, B, T, H, K)
    dv_p = DV + (b * L * H + h) * V + ov                # dv: contiguous (B, T, H, V)
    for cc in range(0, nchunks):
        c = nchunks - 1 - cc
        t0 = c * chunk
        n = tl.minimum(chunk, L - t0)
        # the state before the chunk (the initial state before the first), then the chunk's states into the
        # scratch buffer (scalar conditions go through tl.where, not into load masks: the interpreter takes only
        # tensor masks)
        S0 = tl.where(c > 0, tl.load(s_p + tl.maximum(c - 1, 0) * K * V, mask=mask, other=0.0), h0)
        S = S0
        for i in range(0, n):
            t = t0 + i
            wt = tl.load(w_p + t * swt, mask=mk, other=0.0).to(tl.float32)
            kt = tl.load(k_p + t * skt, mask=mk, other=0.0).to(tl.float32)
            vt = tl.load(v_p + t * svt, mask=mv, other=0.0).to(tl.float32)
            if V7:
                at = tl.load(a_p + t * sat, mask=mk, other=0.0).to(tl.float32)
                bt = tl.load(b_p + t * sbt, mask=mk, other=0.0).to(tl.float32)
                sa = tl.sum(at[:, None] * S, axis=0)
                S = tl.exp(wt)[:, None] * S + bt[:, None] * sa[None, :] + kt[:, None] * vt[None, :]
            else:
                S = tl.exp(wt)[:, None] * S + kt[:, None] * vt[None, :]
            tl.store(x_p + i * K * V, S, mask=mask)
        tl.debug_barrier()  # the chunk's states are written before any thread reads them back
        for j in range(0, n):
            i = n - 1 - j
            t = t0 + i
            Sp = tl.where(i > 0, tl.load(x_p + tl.maximum(i - 1, 0) * K * V, mask=mask, other=0.0), S0)
            rt = tl.load(r_p + t * srt, mask=mk, other=0.0).to(tl.float32)
            et = tl.exp(tl.load(w_p + t * swt, mask=mk, other=0.0).to(tl.float32))
            kt = tl.load(k_p + t * skt, mask=mk, other=0.0).to(tl.float32)
            vt = tl.load(v_p + t * svt, mask=mv, other=0.0).to(tl.float32)
            dot = tl.load(do_p + t * sdt, mask=mv, other=0.0).to(tl.float32)
            if V7:
                Sc = tl.load(x_p + i * K * V, mask=mask, other=0.0)
                at = tl.load(a_p + t * sat, mask=mk, other=0.0).to(tl.float32)
                bt = tl.load(b_p + t * sbt, mask=mk, other=0.0).to(tl.float32)
                sa = tl.sum(at[:, None] * Sp, axis=0)
                dS += (rt * scale)[:, None] * dot[None, :]
                tl.store(DW_P + part + t * H * K, tl.sum(dS * Sp, axis=1) * et, mask=mk)
                tl.store(DR_P + part + t * H * K, tl.sum(Sc * dot[None, :], axis=1) * scale, mask=mk)
                tl.store(DK_P + part + t * H * K, tl.sum(dS * vt[None, :], axis=1), mask=mk)
                tl.store(DB_P + part + t * H * K, tl.sum(dS * sa[None, :], axis=1), mask=mk)
                dsa = tl.sum(bt[:, None] * dS, axis=0)
                tl.store(dv_p + t * H * V, tl.sum(kt[:, None] * dS, axis=0).to(DV.dtype.element_ty), mask=mv)
                tl.store(DA_P + part + t * H * K, tl.sum(Sp * dsa[None, :], axis=1), mask=mk)
                dS = et[:, None] * dS + at[:, None] * dsa[None, :]
            else:
                vdo = tl.sum(vt * dot, axis=0)
                ru = tl.sum(rt * u * kt, axis=0)
                tl.store(DK_P + part + t * H * K, tl.sum(dS * vt[None, :], axis=1) + scale * u * rt * vdo, mask=mk)
                tl.store(DW_P + part + t * H * K, tl.sum(dS * Sp, axis=1) * et, mask=mk)
                tl.store(DR_P + part + t * H * K, (tl.sum(Sp * dot[None, :], axis=1) + u * kt * vdo) * scale,
                         mask=mk)
                dv = tl.sum(kt[:, None] * dS, axis=0) + scale * ru * dot
                tl.store(dv_p + t * H * V, dv.to(DV.dtype.element_ty), mask=mv)
                du += scale * rt * kt * vdo
                dS = et[:, None] * dS + (rt * scale)[:, None] * dot[None, :]
        tl.debug_barrier()  # every read of the chunk's states is done before the next chunk overwrites them
    tl.store(DH0 + bh * K * V + kv, dS, mask=mask)
    if not V7:
        tl.store(DU_P + iv * (part_stride // (L * K)) * K + bh * K + ok, du, mask=mk)


# ---------------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------------
def _unit_last(t):
    return t if t is None or t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _fwd(v7: bool, r, w, k, v, a, b, u, scale: float, h0, chunk: int):
    """The forward of either version (wkv7_fwd, wkv6_fwd): RWKV-6 passes a = b = None and its u."""
    r, w, k, v, a, b = (_unit_last(t) for t in (r, w, k, v, a, b))
    a, b = (r if t is None else t for t in (a, b))   # RWKV-6: never read
    B, L, H, K = r.shape
    V = v.shape[-1]
    nchunks = triton.cdiv(L, chunk)
    o = torch.empty((B, L, H, V), dtype=v.dtype, device=v.device)
    states = torch.empty((B, H, nchunks, K, V), dtype=torch.float32, device=v.device)
    block_k, block_v, nv = _blocks(K, V, FWD_TILE)
    if B * L * H * K * V > 0:
        _wkv_fwd_kernel[(nv, B * H)](
            r, w, k, v, a, b, r if u is None else u, h0, o, states, *_strides(r), *_strides(w), *_strides(k),
            *_strides(v), *_strides(a), *_strides(b), L, H, K, V, float(scale), chunk, nchunks,
            V7=v7, HAS_H0=h0 is not None, BLOCK_K=block_k, BLOCK_V=block_v, num_warps=NUM_WARPS)
    return o, states


def _bwd(v7: bool, dout, r, w, k, v, a, b, u, scale: float, h0, chunk: int, states, dht):
    """The backward of either version: (dr, dw, dk, dv, da, db, du, dh0), RWKV-6's da = db = None and RWKV-7's
    du = None."""
    dout, r, w, k, v, a, b = (_unit_last(t) for t in (dout, r, w, k, v, a, b))
    a, b = (r if t is None else t for t in (a, b))
    B, L, H, K = r.shape
    V = v.shape[-1]
    nchunks = states.shape[2]
    block_k, block_v, nv = _blocks(K, V, BWD_TILE)
    dev, f32 = v.device, torch.float32
    launch = B * L * H * K * V > 0
    part = torch.empty if launch else torch.zeros
    parts = [part((nv, B, L, H, K), dtype=f32, device=dev) for _ in range(5 if v7 else 3)]
    dr_p, dw_p, dk_p = parts[:3]
    da_p, db_p = parts[3:] if v7 else (dr_p, dr_p)   # RWKV-6: never written
    du_part = torch.zeros((nv, B, H, K), dtype=f32, device=dev) if not v7 else None
    dv = torch.zeros((B, L, H, V), dtype=v.dtype, device=dev)
    dh0 = torch.empty((B, H, K, V), dtype=f32, device=dev)
    if launch:
        scratch_len = min(chunk, L)
        scratch = torch.empty((B, H, scratch_len, K, V), dtype=f32, device=dev)
        _wkv_bwd_kernel[(nv, B * H)](
            dout, r, w, k, v, a, b, r if u is None else u, h0, states, dht, scratch,
            dr_p, dw_p, dk_p, da_p, db_p, dr_p if du_part is None else du_part, dv, dh0,
            *_strides(dout), *_strides(r), *_strides(w), *_strides(k), *_strides(v), *_strides(a), *_strides(b),
            L, H, K, V, float(scale), chunk, nchunks, scratch_len, B * L * H * K,
            V7=v7, HAS_H0=h0 is not None, HAS_DHT=dht is not None, BLOCK_K=block_k, BLOCK_V=block_v,
            num_warps=NUM_WARPS)
    else:  # an empty sequence passes dht through (no K or V: nothing to pass)
        dh0 = dht.clone() if dht is not None and L == 0 else dh0.zero_()
    grads = [(p[0] if nv == 1 else p.sum(0)).to(r.dtype) for p in parts]
    dr, dw, dk = grads[:3]
    da, db = grads[3:] if v7 else (None, None)
    return dr, dw, dk, dv, da, db, None if v7 else du_part.sum((0, 1)), dh0


def wkv7_fwd(r, w, k, v, a, b, scale: float, h0, chunk: int):
    """o, states of the wkv recurrence (module docstring).  r, w, k, a, b (B, T, H, K), v (B, T, H, V) dtype X, any
    strides but the last; h0 (B, H, K, V) float32 contiguous or None -> o (B, T, H, V) X contiguous, states
    (B, H, ceil(T / chunk), K, V) float32 (states[:, :, c] = the state after step min((c + 1) chunk, T) - 1).
    Moves 5 B T H K + 2 B T H V elements of X (r, w, k, a, b read once per column block, from cache after the
    first) and B H ceil(T / chunk) K V * 4 bytes of states."""
    return _fwd(True, r, w, k, v, a, b, None, scale, h0, chunk)


def wkv7_bwd(dout, r, w, k, v, a, b, scale: float, h0, chunk: int, states, dht):
    """Gradients of the wkv recurrence (module docstring).  dout (B, T, H, V) X (any strides but the last), the
    forward's arguments and states, dht (B, H, K, V) float32 or None (the gradient reaching the final state) ->
    dr, dw, dk, dv, da, db (X, contiguous, r's and v's shapes) and dh0 (B, H, K, V) float32.  Moves the inputs twice
    (recompute and reverse walk) per column block, every state written to and read back from the scratch buffer
    (2 B H T K V * 4 bytes; a program's chunk, chunk BLOCK_K BLOCK_V * 4 bytes, mostly from cache), and the five
    per-key partials (5 blocks B T H K * 4 bytes) written and read back by the sum."""
    dr, dw, dk, dv, da, db, _, dh0 = _bwd(True, dout, r, w, k, v, a, b, None, scale, h0, chunk, states, dht)
    return dr, dw, dk, dv, da, db, dh0


def wkv7_step(state, r, w, k, v, a, b, scale: float):
    """One decoding step: state (B, H, K, V) float32 contiguous; r, w, k, a, b (B, H, K), v (B, H, V) X with a unit
    last stride -> o (B, H, V) X, the new state (B, H, K, V) float32 (the forward kernel on a one-step sequence).
    Moves 2 B H K V * 4 bytes of state and B H (5 K + 2 V) elements of X."""
    o, states = _fwd(True, *(t.unsqueeze(1) for t in (r, w, k, v, a, b)), None, scale, state, 1)
    return o[:, 0], states[:, :, 0]


def wkv6_fwd(r, k, v, w, u, scale: float, h0, chunk: int):
    """o, states of RWKV-6's recurrence (the comment above _wkv_fwd_kernel).  r, k, w (B, T, H, K), v (B, T, H, V)
    dtype X, any strides but the last; u (H, K) float32; h0 (B, H, K, V) float32 contiguous or None -> o
    (B, T, H, V) X, states (B, H, ceil(T / chunk), K, V) float32.  Moves 3 B T H K + 2 B T H V elements of X and
    B H ceil(T / chunk) K V * 4 bytes of states."""
    return _fwd(False, r, w, k, v, None, None, u, scale, h0, chunk)


def wkv6_bwd(dout, r, k, v, w, u, scale: float, h0, chunk: int, states, dht):
    """Gradients of RWKV-6's recurrence.  dout (B, T, H, V) X, the forward's arguments and states, dht
    (B, H, K, V) float32 or None -> dr, dk, dv, dw (X, contiguous), du (H, K) float32, dh0 (B, H, K, V) float32.
    Moves the inputs twice per column block (recompute and reverse walk), every state through the scratch buffer
    (2 B H T K V * 4 bytes, mostly from cache), and the per-key partials (3 blocks B T H K * 4 bytes)."""
    dr, dw, dk, dv, _, _, du, dh0 = _bwd(False, dout, r, w, k, v, None, None, u, scale, h0, chunk, states, dht)
    return dr, dk, dv, dw, du, dh0


def wkv6_step(state, r, k, v, w, u, scale: float):
    """One RWKV-6 decoding step: state (B, H, K, V) float32 contiguous; r, k, w (B, H, K), v (B, H, V) X, u (H, K)
    float32 -> o (B, H, V) X, the new state (B, H, K, V) float32 (the forward kernel on a one-step sequence)."""
    o, states = _fwd(False, *(t.unsqueeze(1) for t in (r, w, k, v)), None, None, u, scale, state, 1)
    return o[:, 0], states[:, :, 0]
