"""Fused sampling: one program per row (tritium.reference.sampling_distribution is the spec).

Per row of V logits: z = float(x) into a float32 workspace row (the later passes read it from L2) and the raw max,
penalties over the history (each distinct token once) and logit bias as scalar updates, argmax (greedy), then with
e = exp((z - max) / T) computed on the fly: top_k cut = the largest t with count(e >= t) >= k and top_p cut = the
largest t with mass(e >= t) >= top_p * mass(top-k set), both found by bisection over the bit patterns of t in
[0, 1] (positive floats order as their bits; 31 count passes, no sort), min_p cut = min_p, and the draw: the first
index where the running kept mass passes u * kept mass (a cumulative sum per block); last, the raw log-sum-exp
(the chosen token's raw log-probability) from the logits.
Traffic: reads V logits twice, writes and re-reads a V-float workspace row (from L2) a few dozen times at most.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _masked_stats(Z, V, pmax, inv_t, cut, BLOCK: tl.constexpr):
    """(count, mass) of the tokens with e = exp((z - pmax) * inv_t) >= cut."""
    cols = tl.arange(0, BLOCK)
    cnt = tl.zeros([BLOCK], tl.int32)
    mass = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        c = off + cols
        z = tl.load(Z + c, mask=c < V, other=float("-inf"))
        e = tl.exp((z - pmax) * inv_t)
        keep = (e >= cut) & (c < V)
        cnt += keep.to(tl.int32)
        mass += tl.where(keep, e, 0.0)
    return tl.sum(cnt, axis=0), tl.sum(mass, axis=0)


@triton.jit
def _sample_kernel(
    X, U, P, HIST, BIAS_IDX, BIAS_VAL, Z, TOK, LP,
    stride_x, V, L, NB,
    BLOCK: tl.constexpr, BLOCK_H: tl.constexpr,
    HAS_HIST: tl.constexpr,  # penalties need the history; without one the scalar update loop is not compiled
    HAS_BIAS: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    X += r * stride_x
    Z += r * V
    cols = tl.arange(0, BLOCK)
    # Raw values into the workspace, and their max with NaN counted as +inf: rmax is +inf for a row with a NaN or
    # +inf logit and -inf for a row of -inf (both invalid), so rmax alone carries the row's validity. It is the one
    # value kept from here to the raw log-sum-exp at the end; parameters are loaded where their pass begins. Few
    # scalars live across the long passes below, so ptxas has none to spill.
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    for off in range(0, V, BLOCK):
        c = off + cols
        x = tl.load(X + c, mask=c < V, other=float("-inf")).to(tl.float32)
        tl.store(Z + c, x, mask=c < V)
        mx = tl.maximum(mx, tl.where(x == x, x, float("inf")))
    rmax = tl.max(mx, axis=0)
    tl.debug_barrier()  # the workspace row is complete before the scalar updates read it
    if HAS_HIST:
        rep = tl.load(P + r * 7 + 4)
        pres = tl.load(P + r * 7 + 5)
        freq = tl.load(P + r * 7 + 6)
        hs = tl.arange(0, BLOCK_H)
        for j in range(0, L):
            t = tl.load(HIST + r * L + j)
            cnt = tl.zeros([], tl.int32)
            earlier = tl.zeros([], tl.int32)
            for h0 in range(0, L, BLOCK_H):
                hh = h0 + hs
                ht = tl.load(HIST + r * L + hh, mask=hh < L, other=-1)
                eq = (ht == t) & (hh < L)
                cnt += tl.sum(eq.to(tl.int32), axis=0)
                earlier += tl.sum((eq & (hh < j)).to(tl.int32), axis=0)
            if (t >= 0) & (t < V) & (earlier == 0):  # each distinct token once, with its count
                zt = tl.load(Z + t)
                zt = tl.where(zt > 0, zt / rep, zt * rep) - freq * cnt - pres
                tl.store(Z + t, zt)
            tl.debug_barrier()
    if HAS_BIAS:
        for j in range(0, NB):
            t = tl.load(BIAS_IDX + r * NB + j)
            if (t >= 0) & (t < V):
                tl.store(Z + t, tl.load(Z + t) + tl.load(BIAS_VAL + r * NB + j))
            tl.debug_barrier()
    # argmax of the processed logits (greedy, and the max for e)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_i = tl.zeros([BLOCK], tl.int32)
    for off in range(0, V, BLOCK):
        c = off + cols
        z = tl.load(Z + c, mask=c < V, other=float("-inf"))
        take = z > best  # strict: the first maximal index per lane
        best = tl.where(take, z, best)
        best_i = tl.where(take, c, best_i)
    pmax = tl.max(best, axis=0)
    token = tl.min(tl.where(best == pmax, best_i, V), axis=0)
    temperature = tl.load(P + r * 7 + 0)
    if temperature > 0:
        top_k = tl.load(P + r * 7 + 1).to(tl.int32)
        top_p = tl.load(P + r * 7 + 2)
        min_p = tl.load(P + r * 7 + 3)
        inv_t = 1.0 / temperature
        cut = tl.zeros([], tl.float32)
        if (top_k > 0) & (top_k < V):
            lo = tl.full([], 0, tl.int32)
            hi = tl.full([], 0x3F800000, tl.int32)  # the bits of 1.0 = e of the most likely token
            for _ in range(31):
                mid = lo + (hi - lo + 1) // 2
                n, _m = _masked_stats(Z, V, pmax, inv_t, mid.to(tl.float32, bitcast=True), BLOCK)
                ok = n >= top_k
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
            cut = lo.to(tl.float32, bitcast=True)
        if top_p < 1.0:
            _n, mass = _masked_stats(Z, V, pmax, inv_t, cut, BLOCK)
            target = top_p * mass
            lo = cut.to(tl.int32, bitcast=True)
            hi = tl.full([], 0x3F800000, tl.int32)
            for _ in range(31):
                mid = lo + (hi - lo + 1) // 2
                _n, m = _masked_stats(Z, V, pmax, inv_t, mid.to(tl.float32, bitcast=True), BLOCK)
                ok = m >= target
                lo = tl.where(ok, mid, lo)
                hi = tl.where(ok, hi, mid - 1)
            cut = lo.to(tl.float32, bitcast=True)
        cut = tl.maximum(cut, min_p)
        _n, mass = _masked_stats(Z, V, pmax, inv_t, cut, BLOCK)
        target = tl.load(U + r) * mass
        cum = tl.zeros([], tl.float32)
        token = tl.full([], V, tl.int32)
        last = tl.full([], -1, tl.int32)
        for off in range(0, V, BLOCK):
            c = off + cols
            z = tl.load(Z + c, mask=c < V, other=float("-inf"))
            e = tl.exp((z - pmax) * inv_t)
            keep = (e >= cut) & (e > 0) & (c < V)
            ek = tl.where(keep, e, 0.0)
            cs = tl.cumsum(ek, axis=0) + cum
            token = tl.minimum(token, tl.min(tl.where(keep & (cs > target), c, V), axis=0))
            last = tl.maximum(last, tl.max(tl.where(keep, c, -1), axis=0))
            cum += tl.sum(ek, axis=0)
        token = tl.where(token == V, last, token)  # u * mass rounded up to the whole mass: the last kept token
    # the raw log-sum-exp (for the chosen token's raw log-probability), from the logits themselves
    row_invalid = tl.abs(rmax) == float("inf")
    rmax_safe = tl.where(row_invalid, 0.0, rmax)
    rs = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        c = off + cols
        x = tl.load(X + c, mask=c < V, other=float("-inf")).to(tl.float32)
        rs += tl.where(c < V, tl.exp(x - rmax_safe), 0.0)
    raw_lse = rmax_safe + tl.log(tl.sum(rs, axis=0))
    invalid = row_invalid | (pmax == float("-inf")) | (pmax != pmax) | (pmax == float("inf"))
    invalid = invalid | (token < 0) | (token >= V)
    token = tl.where(invalid, -1, token)
    lp = tl.load(X + tl.where(invalid, 0, token)).to(tl.float32) - raw_lse
    tl.store(TOK + r, token.to(tl.int64))
    tl.store(LP + r, tl.where(invalid, float("nan"), lp))


def sample_fwd(logits, uniform, params, history, bias_idx, bias_val):
    """tokens[r] ~ sampling_distribution(logits[r], params[r], history[r]) by inverse CDF at uniform[r];
    logprobs[r] = log_softmax(logits[r])[tokens[r]] (token -1, logprob NaN for an invalid row).
    logits (B, V) unit column stride; uniform float32 (B,); params float32 (B, 7) = temperature, top_k, top_p,
    min_p, repetition, presence, frequency; history int64 (B, L) padded with -1 or None; bias_idx int64 /
    bias_val float32 (B, NB) or None.  Moves BV logits + a BV float32 workspace (re-read from L2)."""
    B, V = logits.shape
    tokens = torch.empty((B,), device=logits.device, dtype=torch.int64)
    logprobs = torch.empty((B,), device=logits.device, dtype=torch.float32)
    if B == 0:
        return tokens, logprobs
    work = torch.empty((B, V), device=logits.device, dtype=torch.float32)
    L = history.shape[1] if history is not None else 0
    NB = bias_idx.shape[1] if bias_idx is not None else 0
    block = min(triton.next_power_of_2(V), 4096)
    _sample_kernel[(B,)](
        logits, uniform, params, history, bias_idx, bias_val, work, tokens, logprobs,
        logits.stride(0), V, L, NB,
        BLOCK=block, BLOCK_H=min(triton.next_power_of_2(max(L, 1)), 1024),
        HAS_HIST=history is not None, HAS_BIAS=bias_idx is not None, num_warps=8,
    )
    return tokens, logprobs
