"""RWKV-7's wkv recurrence (forward, backward, the decoding step) as flash-linear-attention defines it
(``fla.ops.rwkv7.fused_recurrent_rwkv7`` / ``chunk_rwkv7``, whose naive reference is
``fla.ops.generalized_delta_rule.dplr.naive.dplr_recurrence`` with q = r, gk = w, alpha = a, beta = b):

    S_t = diag(exp(w_t)) S_{t-1} + b_t (a_t^T S_{t-1}) + k_t v_t^T        S: (K, V) per (batch, head)
    o_t = scale S_t^T r_t

(in RWKV-7's own row-vector notation, S^T_t = S^T_{t-1} (diag(exp w_t) + a_t^T b_t) + v_t^T k_t). w is the log of
the decay (the kernels take exp(w)); RWKV-7 feeds a = -kappa, b = kappa * iclr so the a-b term removes part of the
old value at key kappa. Layout as fla's (head_first=False): r, w, k, a, b (B, T, H, K); v and o (B, T, H, V);
the state (B, H, K, V). scale defaults to K ** -0.5, as fused_recurrent_rwkv7 and the naive reference.

The forward keeps the state in registers / L1 and writes it once every ``chunk`` steps (``states``:
(B, H, ceil(T / chunk), K, V), the last of which is the final state; without gradients, the final state only); the
backward recomputes each chunk's states from the saved one before it and runs the adjoint through the chunk in
reverse. Memory: O(B H K V T / chunk) besides the inputs and gradients. The state and initial_state are float32
(float64 for float64 input).

RWKV-6 (``wkv6``, fla's ``fused_recurrent_rwkv6``; its naive reference is ``fla.ops.rwkv6.recurrent_naive.
naive_recurrent_rwkv6``) has a diagonal decay and a bonus u (H, K) for the current token:

    o_t = scale (S_{t-1} + diag(u) k_t v_t^T)^T r_t;   S_t = diag(exp(w_t)) S_{t-1} + k_t v_t^T

with the same layouts (r, k, w (B, T, H, K), v (B, T, H, V)), chunked states and decoding step.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._library import acc_dtype, call_op, define_op, kernel_ok, unit_last


def wkv_chunk(K: int, V: int) -> int:
    """Steps between the states the forward saves: the backward's buffer of one chunk's states (chunk K V
    floats) stays within about 512 KB (L2), and the saved states are 1 / chunk of a state per step."""
    return max(4, min(64, 131072 // max(K * V, 1)))


def _saved_chunk(K: int, V: int, T: int, tensors) -> int:
    """The forward's chunk: wkv_chunk where a backward may follow, else the whole sequence (only the final state
    is written, not one every chunk steps)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return wkv_chunk(K, V)
    return max(T, 1)


# ---- the specification: plain torch, a loop over time (fla's naive recurrence, any scale) ----
def wkv7_reference(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: Optional[float] = None,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """The recurrence in r's dtype, step by step; the final state in the accumulation dtype (float32; float64
    for float64 input), or None without output_final_state."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(r.dtype)
    outs = []
    for t in range(T):
        S, o = wkv7_reference_step(S, *(x[:, t] for x in (r, w, k, v, a, b)), scale)
        outs.append(o)
    o = torch.stack(outs, 1) if outs else v.new_empty(B, 0, H, V)
    return o, (S.to(acc_dtype(r.dtype)) if output_final_state else None)


def wkv7_reference_step(S: Tensor, r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: float
                        ) -> Tuple[Tensor, Tensor]:
    """One step of wkv7_reference: S (B, H, K, V), r, w, k, a, b (B, H, K), v (B, H, V) -> (the new S, o (B, H, V))."""
    sa = (a[..., None] * S).sum(-2)  # a^T S: (B, H, V)
    S = S * w.exp()[..., None] + b[..., None] * sa[..., None, :] + k[..., None] * v[..., None, :]
    return S, ((r * scale)[..., None] * S).sum(-2)


def wkv6_reference(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, scale: Optional[float] = None,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False
                   ) -> Tuple[Tensor, Optional[Tensor]]:
    """RWKV-6's recurrence in r's dtype, step by step (fla's naive_recurrent_rwkv6 in the (B, T, H, K) layout); the
    final state in the accumulation dtype, or None without output_final_state."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    S = r.new_zeros(B, H, K, V) if initial_state is None else initial_state.to(r.dtype)
    u = u.to(r.dtype)
    outs = []
    for t in range(T):
        rt, kt, vt, wt = (x[:, t] for x in (r, k, v, w))
        kv = kt[..., None] * vt[..., None, :]
        outs.append(((rt * scale)[..., None] * (S + u[..., None] * kv)).sum(-2))
        S = S * wt.exp()[..., None] + kv
    o = torch.stack(outs, 1) if outs else v.new_empty(B, 0, H, V)
    return o, (S.to(acc_dtype(r.dtype)) if output_final_state else None)


# ---- fake kernels: shapes only ----
def _fake_fwd(r, w, k, v, a, b, scale, h0, chunk):
    B, T, H, K = r.shape
    return (v.new_empty((B, T, H, v.shape[-1])),
            r.new_empty((B, H, -(-T // chunk), K, v.shape[-1]), dtype=acc_dtype(r.dtype)))


def _fake_bwd(dout, r, w, k, v, a, b, scale, h0, chunk, states, dht):
    B, T, H, K = r.shape
    return (r.new_empty(r.shape), r.new_empty(r.shape), r.new_empty(r.shape), v.new_empty(v.shape),
            r.new_empty(r.shape), r.new_empty(r.shape), r.new_empty((B, H, K, v.shape[-1]), dtype=acc_dtype(r.dtype)))


def _fake_step(state, r, w, k, v, a, b, scale):
    return v.new_empty(v.shape), state.new_empty(state.shape)


def _fake_fwd6(r, k, v, w, u, scale, h0, chunk):
    return _fake_fwd(r, w, k, v, r, r, scale, h0, chunk)


def _fake_bwd6(dout, r, k, v, w, u, scale, h0, chunk, states, dht):
    B, T, H, K = r.shape
    return (r.new_empty(r.shape), r.new_empty(r.shape), v.new_empty(v.shape), r.new_empty(r.shape),
            u.new_empty(u.shape), r.new_empty((B, H, K, v.shape[-1]), dtype=acc_dtype(r.dtype)))


def _fake_step6(state, r, k, v, w, u, scale):
    return v.new_empty(v.shape), state.new_empty(state.shape)


# ---- autograd: the forward saves its inputs and the chunk states; the backward op recomputes the rest ----
def _wkv_setup(ctx, inputs, output):
    r, w, k, v, a, b, scale, h0, chunk = inputs
    ctx.scale, ctx.chunk, ctx.has_h0 = scale, chunk, h0 is not None
    ctx.save_for_backward(r, w, k, v, a, b, h0, output[1])


def _wkv_backward(ctx, dout, dstates):
    r, w, k, v, a, b, h0, states = ctx.saved_tensors
    dht = None if dstates is None else dstates[:, :, -1].contiguous()
    dout = torch.zeros_like(v) if dout is None else unit_last(dout)
    dr, dw, dk, dv, da, db, dh0 = wkv7_bwd(dout, r, w, k, v, a, b, ctx.scale, h0, ctx.chunk, states, dht)
    return dr, dw, dk, dv, da, db, None, dh0 if ctx.has_h0 else None, None


def _wkv6_setup(ctx, inputs, output):
    r, k, v, w, u, scale, h0, chunk = inputs
    ctx.scale, ctx.chunk, ctx.has_h0 = scale, chunk, h0 is not None
    ctx.save_for_backward(r, k, v, w, u, h0, output[1])


def _wkv6_backward(ctx, dout, dstates):
    r, k, v, w, u, h0, states = ctx.saved_tensors
    dht = None if dstates is None else dstates[:, :, -1].contiguous()
    dout = torch.zeros_like(v) if dout is None else unit_last(dout)
    dr, dk, dv, dw, du, dh0 = wkv6_bwd(dout, r, k, v, w, u, ctx.scale, h0, ctx.chunk, states, dht)
    return dr, dk, dv, dw, du, None, dh0 if ctx.has_h0 else None, None


wkv7_bwd = define_op(
    "wkv7_bwd(Tensor dout, Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, float scale, Tensor? h0, "
    "int chunk, Tensor states, Tensor? dht) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fake_bwd, "wkv:wkv7_bwd")
wkv7_fwd = define_op(
    "wkv7_fwd(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, float scale, Tensor? h0, int chunk)"
    " -> (Tensor, Tensor)", _fake_fwd, "wkv:wkv7_fwd", backward=_wkv_backward, setup_context=_wkv_setup)
wkv7_step_op = define_op(
    "wkv7_step(Tensor state, Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, float scale)"
    " -> (Tensor, Tensor)", _fake_step, "wkv:wkv7_step")


wkv6_bwd = define_op(
    "wkv6_bwd(Tensor dout, Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, float scale, Tensor? h0, int chunk, "
    "Tensor states, Tensor? dht) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_bwd6, "wkv:wkv6_bwd")
wkv6_fwd = define_op(
    "wkv6_fwd(Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, float scale, Tensor? h0, int chunk)"
    " -> (Tensor, Tensor)", _fake_fwd6, "wkv:wkv6_fwd", backward=_wkv6_backward, setup_context=_wkv6_setup)
wkv6_step_op = define_op(
    "wkv6_step(Tensor state, Tensor r, Tensor k, Tensor v, Tensor w, Tensor u, float scale) -> (Tensor, Tensor)",
    _fake_step6, "wkv:wkv6_step")


# ---- validation: a ValueError / TypeError naming the argument, what was expected and what came ----
def _shape(t) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def _check(fn: str, r, w, k, v, a, b, state, state_name: str, lead: int, u="absent") -> None:
    """r, w, k, a, b (*lead, K) alike (a, b None for RWKV-6); v (*lead, V) with r's leading dims; state
    (B, H, K, V) or None; RWKV-6's u (H, K)."""
    dims = "(B, T, H, K)" if lead == 3 else "(B, H, K)"
    keyed = [("w", w), ("k", k)] + ([] if a is None else [("a", a), ("b", b)])
    extra = [] if isinstance(u, str) else [("u", u)]
    for name, t in [("r", r), ("v", v)] + keyed + extra + [(state_name, state)]:
        if t is None and name == state_name:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating point tensor, got {t.dtype}")
    if r.dim() != lead + 1:
        raise ValueError(f"{fn}: r must be {dims}, got {_shape(r)}")
    if extra and tuple(u.shape) != (r.shape[-2], r.shape[-1]):
        raise ValueError(f"{fn}: u must be (H, K) = {(r.shape[-2], r.shape[-1])}, got {_shape(u)}")
    for name, t in keyed:
        if t.shape != r.shape:
            raise ValueError(f"{fn}: {name} must be r's shape {_shape(r)}, got {_shape(t)}")
    if v.dim() != lead + 1 or v.shape[:-1] != r.shape[:-1]:
        want = "(B, T, H, V)" if lead == 3 else "(B, H, V)"
        raise ValueError(f"{fn}: v must be {want} with r's {_shape(r)[:-1]}, got {_shape(v)}")
    if state is not None:
        want = (r.shape[0], r.shape[-2], r.shape[-1], v.shape[-1])
        if tuple(state.shape) != want:
            raise ValueError(f"{fn}: {state_name} must be (B, H, K, V) = {want}, got {_shape(state)}")


# ---- the public functions ----
def wkv7(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, scale: Optional[float] = None,
         initial_state: Optional[Tensor] = None, output_final_state: bool = False
         ) -> Tuple[Tensor, Optional[Tensor]]:
    """fla's ``fused_recurrent_rwkv7`` (head_first=False, no cu_seqlens): r, w (log decay), k, a, b (B, T, H, K);
    v (B, T, H, V); initial_state (B, H, K, V). Returns (o (B, T, H, V) in r's dtype, the final state (B, H, K, V)
    in float32 (float64 for float64 input) or None without output_final_state). Differentiable in every tensor.
    Inputs the kernels do not cover (mixed dtypes or devices, empty) run the plain-torch reference."""
    fn = "wkv7"
    _check(fn, r, w, k, v, a, b, initial_state, "initial_state", 3)
    K = r.shape[-1]
    scale = float(K ** -0.5 if scale is None else scale)
    if not kernel_ok(r, w, k, v, a, b) or (initial_state is not None and initial_state.device != r.device):
        return wkv7_reference(r, w, k, v, a, b, scale, initial_state, output_final_state)
    acc = acc_dtype(r.dtype)
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    o, states = call_op(wkv7_fwd, unit_last(r), unit_last(w), unit_last(k), unit_last(v), unit_last(a), unit_last(b),
                        scale, h0, _saved_chunk(K, v.shape[-1], r.shape[1], (r, w, k, v, a, b, initial_state)))
    return o, (states[:, :, -1] if output_final_state else None)


def wkv7_step(r: Tensor, w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor,
              scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """One decoding step: r, w, k, a, b (B, H, K), v (B, H, V) of one token and the carried state (B, H, K, V).
    Returns (o (B, H, V), the new state (B, H, K, V) in float32 (float64 for float64 input)); equals wkv7 on the
    sequence one token at a time. With gradients required it runs wkv7 on the one-step sequence (differentiable)."""
    fn = "wkv7_step"
    _check(fn, r, w, k, v, a, b, state, "state", 2)
    scale = float(r.shape[-1] ** -0.5 if scale is None else scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (r, w, k, v, a, b, state)) \
            or not kernel_ok(r, w, k, v, a, b) or state.device != r.device:
        o, new = wkv7(*(t.unsqueeze(1) for t in (r, w, k, v, a, b)), scale=scale, initial_state=state,
                      output_final_state=True)
        return o[:, 0], new
    return wkv7_step_op(state.to(acc_dtype(r.dtype)).contiguous(), unit_last(r), unit_last(w), unit_last(k),
                        unit_last(v), unit_last(a), unit_last(b), scale)


def wkv6(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, scale: Optional[float] = None,
         initial_state: Optional[Tensor] = None, output_final_state: bool = False
         ) -> Tuple[Tensor, Optional[Tensor]]:
    """fla's ``fused_recurrent_rwkv6`` (no reverse, no cu_seqlens): r, k, w (log decay) (B, T, H, K); v
    (B, T, H, V); u (H, K); initial_state (B, H, K, V). Returns (o (B, T, H, V) in r's dtype, the final state
    (B, H, K, V) in float32 (float64 for float64 input) or None without output_final_state). Differentiable in
    every tensor. Inputs the kernels do not cover (mixed dtypes or devices, empty) run the plain-torch reference."""
    _check("wkv6", r, w, k, v, None, None, initial_state, "initial_state", 3, u)
    K = r.shape[-1]
    scale = float(K ** -0.5 if scale is None else scale)
    if not kernel_ok(r, k, v, w) or u.device != r.device or (
            initial_state is not None and initial_state.device != r.device):
        return wkv6_reference(r, k, v, w, u, scale, initial_state, output_final_state)
    acc = acc_dtype(r.dtype)
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    o, states = call_op(wkv6_fwd, unit_last(r), unit_last(k), unit_last(v), unit_last(w), u.to(acc).contiguous(),
                        scale, h0, _saved_chunk(K, v.shape[-1], r.shape[1], (r, k, v, w, u, initial_state)))
    return o, (states[:, :, -1] if output_final_state else None)


def wkv6_step(r: Tensor, k: Tensor, v: Tensor, w: Tensor, u: Tensor, state: Tensor,
              scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """One RWKV-6 decoding step: r, k, w (B, H, K), v (B, H, V), u (H, K) and the carried state (B, H, K, V).
    Returns (o (B, H, V), the new state (B, H, K, V) in float32 (float64 for float64 input)); equals wkv6 on the
    sequence one token at a time. With gradients required it runs wkv6 on the one-step sequence (differentiable)."""
    _check("wkv6_step", r, w, k, v, None, None, state, "state", 2, u)
    scale = float(r.shape[-1] ** -0.5 if scale is None else scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (r, k, v, w, u, state)) \
            or not kernel_ok(r, k, v, w) or state.device != r.device or u.device != r.device:
        o, new = wkv6(*(t.unsqueeze(1) for t in (r, k, v, w)), u, scale=scale, initial_state=state,
                      output_final_state=True)
        return o[:, 0], new
    acc = acc_dtype(r.dtype)
    return wkv6_step_op(state.to(acc).contiguous(), unit_last(r), unit_last(k), unit_last(v), unit_last(w),
                        u.to(acc).contiguous(), scale)


__all__: List[str] = ["wkv7", "wkv7_step", "wkv6", "wkv6_step"]
