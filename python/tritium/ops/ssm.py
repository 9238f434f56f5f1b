"""Mamba's selective scan (forward, backward, the decoding step): the recurrence in one pass, never the
(batch, dim, L, N) tensors an eager implementation builds.

    dt_t = softplus(delta_t + delta_bias)  (softplus and the bias optional)
    x_t  = exp(dt_t A) * x_{t-1} + dt_t u_t B_t       x: (batch, dim, N), x_{-1} = 0
    y_t  = <x_t, C_t> + D u_t;   out_t = y_t * silu(z_t)

with the argument layout of mamba_ssm's ``selective_scan_fn`` (u, delta, z: (batch, dim, L); A (dim, N); B, C
(batch, N, L) or (batch, G, N, L), each group shared by dim // G channels; D, delta_bias (dim,)). The forward keeps
the state in registers and writes it once every ``chunk`` steps (``states``: (batch, dim, ceil(L / chunk), N),
the last of which is the final state); the backward recomputes each chunk's states from the one before it and runs
the adjoint recurrence through the chunk in reverse. Memory: O(batch * dim * N * L / chunk) besides the
inputs and gradients.

The ops take A, B, C, D and delta_bias in the accumulation dtype (float32; float64 for float64 input), B and C
as (batch, G, N, L), all contiguous: the public function converts them (they are small beside u) and converts
their gradients back.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ._library import acc_dtype, call_op, define_op, kernel_ok, unit_last


def scan_chunk(N: int) -> int:
    """Steps between the states the forward saves (the backward recomputes one chunk at a time)."""
    return max(8, min(64, 1024 // max(N, 1)))


# ---- fake kernels: shapes only ----
def _fake_scan_fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk):
    batch, dim, L = u.shape
    return u.new_empty((batch, dim, L)), A.new_empty((batch, dim, -(-L // chunk), A.shape[1]))


def _fake_scan_bwd(dout, u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk, states, dlast):
    def like(t):
        return A.new_empty((0,)) if t is None else t.new_empty(t.shape)

    return (u.new_empty(u.shape), delta.new_empty(delta.shape), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), like(D), u.new_empty((0,)) if z is None else z.new_empty(z.shape),
            like(delta_bias))


def _fake_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus):
    return x.new_empty(x.shape)


# ---- autograd: the forward saves its inputs and the chunk states; the backward op recomputes the rest ----
def _scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, chunk = inputs
    ctx.delta_softplus, ctx.chunk = delta_softplus, chunk
    ctx.has = (D is not None, z is not None, delta_bias is not None)
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])


def _scan_backward(ctx, dout, dstates):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    dlast = None if dstates is None else dstates[:, :, -1].contiguous()
    dout = torch.zeros_like(u) if dout is None else unit_last(dout)
    du, ddelta, dA, dB, dC, dD, dz, dbias = selective_scan_bwd(
        dout, u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.chunk, states, dlast)
    has_d, has_z, has_bias = ctx.has
    return (du, ddelta, dA, dB, dC, dD if has_d else None, dz if has_z else None, dbias if has_bias else None,
            None, None)


selective_scan_bwd = define_op(
    "selective_scan_bwd(Tensor dout, Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, bool delta_softplus, int chunk, Tensor states, Tensor? dlast)"
    " -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_scan_bwd,
    "ssm:selective_scan_bwd")
selective_scan_fwd = define_op(
    "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
    "Tensor? delta_bias, bool delta_softplus, int chunk) -> (Tensor, Tensor)", _fake_scan_fwd,
    "ssm:selective_scan_fwd", backward=_scan_backward, setup_context=_scan_setup)
selective_state_update_op = define_op(
    "selective_state_update(Tensor(a!) state, Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, "
    "Tensor? z, Tensor? dt_bias, bool dt_softplus) -> Tensor", _fake_state_update, "ssm:selective_state_update")


# ---- validation: shapes as mamba_ssm documents them, checked for every call ----
def _shape(t) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def _need(ok: bool, fn: str, msg: str) -> None:
    if not ok:
        raise ValueError(f"{fn}: {msg}")


def _floating(fn: str, **tensors) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{fn}: {name} must be a floating point tensor, got {t.dtype}")


def _check_bc(fn: str, name: str, t: Tensor, batch: int, dim: int, N: int, L: Optional[int]) -> None:
    """B or C: (dim, N) (constant; the scan only), (batch, N[, L]) or (batch, G, N[, L]) with G dividing dim."""
    tail = (N,) if L is None else (N, L)
    want = f"(batch, {', '.join(['N', 'L'][:len(tail)])}) or (batch, G, {', '.join(['N', 'L'][:len(tail)])})"
    if L is not None and t.dim() == 2:
        _need(_shape(t) == (dim, N), fn, f"{name} must be (dim, N) = {(dim, N)} when constant, got {_shape(t)}")
        return
    if t.dim() == 1 + len(tail):
        _need(_shape(t) == (batch, *tail), fn, f"{name} must be {want} = {(batch, *tail)}, got {_shape(t)}")
    elif t.dim() == 2 + len(tail):
        _need(t.shape[0] == batch and tuple(t.shape[2:]) == tail and t.shape[1] > 0 and dim % t.shape[1] == 0, fn,
              f"{name} must be {want} with G dividing {dim}, got {_shape(t)}")
    else:
        raise ValueError(f"{fn}: {name} must be {want}, got {_shape(t)}")


def _check_vec(fn: str, dim, **tensors) -> None:
    for name, t in tensors.items():
        _need(t is None or _shape(t) == dim, fn, f"{name} must be {dim}, got {_shape(t)}")


def _check_scan(u, delta, A, B, C, D, z, delta_bias) -> None:
    fn = "selective_scan"
    _floating(fn, u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)
    _need(u.dim() == 3, fn, f"u must be (batch, dim, L), got {_shape(u)}")
    batch, dim, L = u.shape
    _need(_shape(delta) == _shape(u), fn, f"delta must be u's shape {_shape(u)}, got {_shape(delta)}")
    _need(z is None or _shape(z) == _shape(u), fn, f"z must be u's shape {_shape(u)}, got {_shape(z)}")
    _need(A.dim() == 2 and A.shape[0] == dim and A.shape[1] > 0, fn,
          f"A must be (dim, N) with dim = {dim}, got {_shape(A)}")
    for name, t in (("B", B), ("C", C)):
        _check_bc(fn, name, t, batch, dim, A.shape[1], L)
    _check_vec(fn, (dim,), D=D, delta_bias=delta_bias)


def _groups4(t: Tensor, acc: torch.dtype) -> Tensor:
    """B or C (batch, N, L) / (batch, G, N, L) as the op's contiguous (batch, G, N, L) in acc."""
    return (t.unsqueeze(1) if t.dim() == 3 else t).to(acc).contiguous()


def _acc(t: Optional[Tensor], acc: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(acc).contiguous()


# ---- the public functions ----
def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor] = None,
                   z: Optional[Tensor] = None, delta_bias: Optional[Tensor] = None, delta_softplus: bool = False,
                   return_last_state: bool = False):
    """mamba_ssm's ``selective_scan_fn``: u, delta, z (batch, dim, L); A (dim, N); B, C (batch, N, L) or
    (batch, G, N, L) (or constant (dim, N)); D, delta_bias (dim,). Returns out (u's dtype) and, with
    return_last_state, the final state (batch, dim, N) (float32; float64 for float64 u). Differentiable in every
    tensor. Constant B/C, complex A and inputs the kernels do not cover run tritium.reference.selective_scan."""
    _check_scan(u, delta, A, B, C, D, z, delta_bias)
    if not (kernel_ok(u, delta, *([z] if z is not None else [])) and not A.is_complex()
            and B.dim() >= 3 and C.dim() >= 3 and B.dim() == C.dim() and (B.dim() == 3 or B.shape[1] == C.shape[1])):
        return reference.selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    acc = acc_dtype(u.dtype)
    out, states = call_op(selective_scan_fwd, unit_last(u), unit_last(delta), _acc(A, acc), _groups4(B, acc),
                          _groups4(C, acc), _acc(D, acc), None if z is None else unit_last(z), _acc(delta_bias, acc),
                          bool(delta_softplus), scan_chunk(A.shape[1]))
    return (out, states[:, :, -1]) if return_last_state else out


def selective_state_update(state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
                           D: Optional[Tensor] = None, z: Optional[Tensor] = None, dt_bias: Optional[Tensor] = None,
                           dt_softplus: bool = False) -> Tensor:
    """mamba_ssm's ``selective_state_update``: one decoding step, updating state in place and returning y.
    Without heads: state (batch, dim, N), x, dt, z (batch, dim), A (dim, N), B, C (batch, N) or (batch, G, N),
    D, dt_bias (dim,). With heads: state (batch, nheads, dim, N), x, dt, z (batch, nheads, dim), A (nheads, dim, N),
    B, C (batch, ngroups, N), D, dt_bias (nheads, dim). The kernels take a float32 state (float64 for float64 x)
    that can be viewed flat; others run tritium.reference.selective_state_update."""
    fn = "selective_state_update"
    _floating(fn, state=state, x=x, dt=dt, A=A, B=B, C=C, D=D, z=z, dt_bias=dt_bias)
    heads = state.dim() == 4
    _need(state.dim() in (3, 4), fn, f"state must be (batch, dim, N) or (batch, nheads, dim, N), got {_shape(state)}")
    lead = tuple(state.shape[:-1])
    N = state.shape[-1]
    _need(_shape(x) == lead, fn, f"x must be {lead}, got {_shape(x)}")
    _need(_shape(dt) == lead, fn, f"dt must be {lead}, got {_shape(dt)}")
    _need(z is None or _shape(z) == lead, fn, f"z must be {lead}, got {_shape(z)}")
    _need(_shape(A) == lead[1:] + (N,), fn, f"A must be {lead[1:] + (N,)}, got {_shape(A)}")
    _check_vec(fn, lead[1:], D=D, dt_bias=dt_bias)
    batch, channels = lead[0], (lead[1] * lead[2] if heads else lead[1])
    for name, t in (("B", B), ("C", C)):
        if heads:  # groups over heads
            _need(t.dim() == 3 and t.shape[0] == batch and t.shape[2] == N and t.shape[1] > 0
                  and lead[1] % t.shape[1] == 0, fn,
                  f"{name} must be (batch, ngroups, N) with ngroups dividing nheads {lead[1]}, got {_shape(t)}")
        else:
            _check_bc(fn, name, t, batch, channels, N, None)
    acc = acc_dtype(x.dtype)
    zs = [] if z is None else [z]
    if not (kernel_ok(x, dt, *zs) and state.dtype == acc and state.device == x.device and state.stride(-1) == 1):
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    try:  # the kernel updates the caller's tensor: heads and dim must flatten to one view
        flat = state.view(batch, channels, N)
    except RuntimeError:
        return reference.selective_state_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    y = selective_state_update_op(flat, x.reshape(batch, channels), dt.reshape(batch, channels),
                                  _acc(A.reshape(channels, N), acc), _groups3(B, acc), _groups3(C, acc),
                                  _acc(None if D is None else D.reshape(channels), acc),
                                  None if z is None else z.reshape(batch, channels),
                                  _acc(None if dt_bias is None else dt_bias.reshape(channels), acc), bool(dt_softplus))
    return y.view(lead)


def _groups3(t: Tensor, acc: torch.dtype) -> Tensor:
    return (t.unsqueeze(1) if t.dim() == 2 else t).to(acc).contiguous()


__all__: List[str] = ["selective_scan", "selective_state_update"]
