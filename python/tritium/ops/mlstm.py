"""xLSTM's mLSTM cell (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory"): a matrix memory with
stabilised exponential gating, as NX-AI's ``mlstm_kernels`` define it (the recurrent step
``mlstm_recurrent_step__native_fw``; ``mlstm_chunkwise`` the chunked form of the same function). Per (batch, head),
with q scaled by ``scale`` (default DK ** -0.5) and logf = logsigmoid(f):

    m_t = max(logf_t + m_{t-1}, i_t)
    C_t = exp(logf_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T          C: (DK, DV)
    n_t = exp(logf_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t                n: (DK,)
    h_t = C_t^T q_t / (max(|n_t . q_t|, exp(-m_t)) + eps)

m is the stabiliser: the true (unstabilised) state is exp(m) C, and h does not depend on m but through eps. No
gradient flows through m (as in mlstm_kernels' chunkwise kernels; the reference below detaches it), so the initial
state's m takes none, and a gradient reaching the final state's C and n is that of the unstabilised state
exp(m) C, exp(m) n (the stabilised C and n also move with m, which that gradient leaves out).

Layout: q, k (B, H, T, DK), v (B, H, T, DV), i and f (B, H, T) (the gates' preactivations); the state
(C (B, H, DK, DV), n (B, H, DK), m (B, H)) in float32 (float64 for float64 input), zeros by default.

The kernels run the chunkwise-parallel form: within a chunk of ``mlstm_chunk`` steps the outputs are a masked,
gated (L, L) product of q and k against v plus the state before the chunk, and the state moves chunk to chunk.
The forward saves the state before every chunk (O(B H DK DV T / chunk)); the backward recomputes each chunk from
it and carries the state's adjoint between chunks.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._library import acc_dtype, call_op, define_op, kernel_ok

State = Tuple[Tensor, Tensor, Tensor]


def mlstm_chunk(T: int, device_type: str = "cpu") -> int:
    """Steps per chunk: the (L, L) gate and score matrices stay small (L1), and the state is saved T / L times; a
    power of two >= 16 (the Triton kernels' tl.dot tiles). On CUDA always 16: a Triton program holds about ten
    (L, DK) tiles in registers, and at xLSTM's head size 64 wider chunks spill."""
    if device_type == "cuda":
        return 16
    return 64 if T >= 64 else max(16, 1 << max(T - 1, 0).bit_length())


# ---- the specification: plain torch, a loop over time ----
def mlstm_reference(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, scale: Optional[float] = None,
                    eps: float = 1e-6, initial_state: Optional[State] = None, output_final_state: bool = False
                    ) -> Tuple[Tensor, Optional[State]]:
    """The recurrence in q's dtype, step by step (m detached: the stabiliser); the final state (C, n, m) in the
    accumulation dtype (float32; float64 for float64 input), or None without output_final_state."""
    B, H, T, DK = q.shape
    DV = v.shape[-1]
    scale = DK ** -0.5 if scale is None else scale
    if initial_state is None:
        C, n, m = q.new_zeros(B, H, DK, DV), q.new_zeros(B, H, DK), q.new_zeros(B, H)
    else:
        C, n, m = (x.to(q.dtype) for x in initial_state)
    m = m.detach()
    logf = F.logsigmoid(f)
    outs = []
    for t in range(T):
        C, n, m, h_t = mlstm_reference_step(C, n, m, q[:, :, t] * scale, k[:, :, t], v[:, :, t], logf[:, :, t],
                                            i[:, :, t], eps)
        outs.append(h_t)
    h = torch.stack(outs, 2) if outs else v.new_empty(B, H, 0, DV)
    acc = acc_dtype(q.dtype)
    return h, ((C.to(acc), n.to(acc), m.to(acc)) if output_final_state else None)


def mlstm_reference_step(C: Tensor, n: Tensor, m: Tensor, qt: Tensor, kt: Tensor, vt: Tensor, lf: Tensor, it: Tensor,
                         eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of mlstm_reference's recurrence: the state (C, n, m) after step t and its output h_t, from the scaled
    query qt, kt, vt (B, H, D), the log forget gate lf and the input gate it (B, H)."""
    m_new = torch.maximum(lf + m, it).detach()
    fg, ig = torch.exp(lf + m - m_new), torch.exp(it - m_new)
    C = fg[..., None, None] * C + ig[..., None, None] * (kt[..., :, None] * vt[..., None, :])
    n = fg[..., None] * n + ig[..., None] * kt
    num = (qt[..., :, None] * C).sum(-2)
    den = (qt * n).sum(-1)
    return C, n, m_new, num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps)[..., None]


# ---- fake kernels: shapes only ----
def _fake_fwd(q, k, v, i, f, scale, eps, C0, n0, m0, chunk):
    B, H, T, DK = q.shape
    nc = -(-T // chunk)
    acc = acc_dtype(q.dtype)
    return (v.new_empty(v.shape), q.new_empty((B, H, nc + 1, DK, v.shape[-1]), dtype=acc),
            q.new_empty((B, H, nc + 1, DK), dtype=acc), q.new_empty((B, H, nc + 1), dtype=acc))


def _fake_bwd(dh, q, k, v, i, f, scale, eps, Cs, ns, ms, chunk, dCT, dnT):
    B, H, T, DK = q.shape
    acc = acc_dtype(q.dtype)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), i.new_empty(i.shape),
            f.new_empty(f.shape), q.new_empty((B, H, DK, v.shape[-1]), dtype=acc), q.new_empty((B, H, DK), dtype=acc))


def _fake_step(q, k, v, i, f, C, n, m, scale, eps):
    return v.new_empty(v.shape), C.new_empty(C.shape), n.new_empty(n.shape), m.new_empty(m.shape)


# ---- autograd: the forward saves its inputs and the chunk states; the backward op recomputes the rest ----
def _setup(ctx, inputs, output):
    q, k, v, i, f, scale, eps, C0, n0, m0, chunk = inputs
    ctx.scale, ctx.eps, ctx.chunk, ctx.has_h0 = scale, eps, chunk, C0 is not None
    ctx.save_for_backward(q, k, v, i, f, *output[1:])
    ctx.mark_non_differentiable(output[3])


def _backward(ctx, dh, dCs, dns, dms):
    q, k, v, i, f, Cs, ns, ms = ctx.saved_tensors
    dCT = None if dCs is None else dCs[:, :, -1].contiguous()
    dnT = None if dns is None else dns[:, :, -1].contiguous()
    dh = torch.zeros_like(v) if dh is None else dh.contiguous()
    dq, dk, dv, di, df, dC0, dn0 = mlstm_bwd(dh, q, k, v, i, f, ctx.scale, ctx.eps, Cs, ns, ms, ctx.chunk, dCT, dnT)
    h0 = (dC0, dn0, None) if ctx.has_h0 else (None, None, None)
    return dq, dk, dv, di, df, None, None, *h0, None


mlstm_bwd = define_op(
    "mlstm_bwd(Tensor dh, Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, float scale, float eps, Tensor Cs, "
    "Tensor ns, Tensor ms, int chunk, Tensor? dCT, Tensor? dnT) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor)", _fake_bwd, "mlstm:mlstm_bwd")
mlstm_fwd = define_op(
    "mlstm_fwd(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, float scale, float eps, Tensor? C0, Tensor? n0, "
    "Tensor? m0, int chunk) -> (Tensor, Tensor, Tensor, Tensor)", _fake_fwd, "mlstm:mlstm_fwd",
    backward=_backward, setup_context=_setup)
mlstm_step_op = define_op(
    "mlstm_step(Tensor q, Tensor k, Tensor v, Tensor i, Tensor f, Tensor C, Tensor n, Tensor m, float scale, "
    "float eps) -> (Tensor, Tensor, Tensor, Tensor)", _fake_step, "mlstm:mlstm_step")


# ---- validation: a ValueError / TypeError naming the argument, what was expected and what came ----
def _shape(t) -> Optional[tuple]:
    return None if t is None else tuple(t.shape)


def _check(fn: str, q, k, v, i, f, state, state_name: str, lead: int) -> None:
    """q, k (*lead, DK); v (*lead, DV); i, f (*lead) with lead = (B, H, T) or (B, H); the state (C, n, m) or None."""
    dims = "(B, H, T, DK)" if lead == 3 else "(B, H, DK)"
    for name, t in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating point tensor, got {t.dtype}")
    if q.dim() != lead + 1:
        raise ValueError(f"{fn}: q must be {dims}, got {_shape(q)}")
    if k.shape != q.shape:
        raise ValueError(f"{fn}: k must be q's shape {_shape(q)}, got {_shape(k)}")
    if v.dim() != lead + 1 or v.shape[:-1] != q.shape[:-1]:
        want = "(B, H, T, DV)" if lead == 3 else "(B, H, DV)"
        raise ValueError(f"{fn}: v must be {want} with q's {_shape(q)[:-1]}, got {_shape(v)}")
    for name, t in (("i", i), ("f", f)):
        if t.shape != q.shape[:-1]:
            raise ValueError(f"{fn}: {name} must be {_shape(q)[:-1]} (q's shape without DK), got {_shape(t)}")
    if state is None:
        return
    if not isinstance(state, (tuple, list)) or len(state) != 3:
        raise TypeError(f"{fn}: {state_name} must be a tuple (C, n, m), got {type(state).__name__}")
    B, H, DK, DV = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    for name, t, want in (("C", state[0], (B, H, DK, DV)), ("n", state[1], (B, H, DK)), ("m", state[2], (B, H))):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {state_name}'s {name} must be a floating point tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"{fn}: {state_name}'s {name} must be {want}, got {_shape(t)}")


def _acc_state(state: State, q: Tensor) -> State:
    acc = acc_dtype(q.dtype)
    return tuple(x.to(acc).contiguous() for x in state)


# ---- the public functions ----
def mlstm(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, scale: Optional[float] = None, eps: float = 1e-6,
          initial_state: Optional[State] = None, output_final_state: bool = False
          ) -> Tuple[Tensor, Optional[State]]:
    """The mLSTM cell over a sequence: q, k (B, H, T, DK), v (B, H, T, DV), i, f (B, H, T) gate preactivations;
    initial_state (C, n, m). Returns (h (B, H, T, DV) in q's dtype, the final state (C, n, m) in float32 (float64
    for float64 input) or None without output_final_state). Differentiable in q, k, v, i, f and the state's C and n
    (m is the stabiliser). Inputs the kernels do not cover (mixed dtypes or devices, empty) run the reference."""
    _check("mlstm", q, k, v, i, f, initial_state, "initial_state", 3)
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    if not kernel_ok(q, k, v, i, f) or (initial_state is not None and any(
            x.device != q.device for x in initial_state)):
        return mlstm_reference(q, k, v, i, f, scale, eps, initial_state, output_final_state)
    C0, n0, m0 = (None, None, None) if initial_state is None else _acc_state(initial_state, q)
    h, Cs, ns, ms = call_op(mlstm_fwd, q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(),
                            scale, float(eps), C0, n0, m0, mlstm_chunk(q.shape[2], q.device.type))
    return h, ((Cs[:, :, -1], ns[:, :, -1], ms[:, :, -1]) if output_final_state else None)


def mlstm_step(q: Tensor, k: Tensor, v: Tensor, i: Tensor, f: Tensor, state: Optional[State] = None,
               scale: Optional[float] = None, eps: float = 1e-6) -> Tuple[Tensor, State]:
    """One decoding step: q, k (B, H, DK), v (B, H, DV), i, f (B, H) of one token and the carried state (C, n, m)
    (zeros when None). Returns (h (B, H, DV), the new state); equals mlstm on the sequence one token at a time.
    With gradients required it runs mlstm on the one-step sequence (differentiable)."""
    _check("mlstm_step", q, k, v, i, f, state, "state", 2)
    B, H, DK = q.shape
    if state is None:
        acc = acc_dtype(q.dtype)
        state = (q.new_zeros(B, H, DK, v.shape[-1], dtype=acc), q.new_zeros(B, H, DK, dtype=acc),
                 q.new_zeros(B, H, dtype=acc))
    scale = float(DK ** -0.5 if scale is None else scale)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, i, f, *state)) \
            or not kernel_ok(q, k, v, i, f) or any(x.device != q.device for x in state):
        h, new = mlstm(*(t.unsqueeze(2) for t in (q, k, v, i, f)), scale=scale, eps=eps, initial_state=state,
                       output_final_state=True)
        return h[:, :, 0], new
    h, C, n, m = mlstm_step_op(q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(),
                               *_acc_state(state, q), scale, float(eps))
    return h, (C, n, m)


__all__: List[str] = ["mlstm", "mlstm_step"]
