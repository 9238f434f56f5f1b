"""xLSTM's sLSTM cell (Beck et al. 2024): scalar memory, exponential gating with a normaliser and a stabiliser
state, and block-diagonal recurrent weights (one (Dh, Dh) block per head and gate), as NX-AI's vanilla sLSTM
(``xlstm.blocks.slstm.src.vanilla.slstm``: ``slstm_forward_pointwise``) defines it. Per step, D = H Dh:

    raw_g = wx_g + h_{t-1} R_g            g in (i, f, z, o); wx (B, T, 4 D) the input projection [i | f | z | o]
    m_t = max(i, logsigmoid(f) + m_{t-1})
    c_t = exp(logsigmoid(f) + m_{t-1} - m_t) c_{t-1} + exp(i - m_t) tanh(z)
    n_t = exp(logsigmoid(f) + m_{t-1} - m_t) n_{t-1} + exp(i - m_t)
    h_t = sigmoid(o) c_t / n_t

R (4, H, Dh, Dh): (h_{t-1} R_g) on head k's columns is h_{t-1}[k's slice] @ R[g, k]. The state (h, c, n, m) is
(B, D) each, float32 (float64 for float64 input); by default h = c = n = 0 and m = -inf (the first step's m is then
its input gate, NX-AI's rule for a zero normaliser). m is the stabiliser: h does not depend on it, and no gradient
flows through it (the reference detaches it), so a gradient reaching the final state's c and n is that of the
unstabilised exp(m) c, exp(m) n. The kernels run the scan fused per step, like the LSTM cell scan
(tritium.ops.rnn): heads are independent, so one task is one (batch, head) and its four (Dh, Dh) blocks: C++ on
the CPU (csrc/slstm.cpp), Triton on CUDA (kernels/slstm.py).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ._library import acc_dtype, call_op, define_op, kernel_ok

State = Tuple[Tensor, Tensor, Tensor, Tensor]


# ---- the specification: plain torch, a loop over time ----
def slstm_reference(wx: Tensor, R: Tensor, initial_state: Optional[State] = None, output_final_state: bool = False
                    ) -> Tuple[Tensor, Optional[State]]:
    """The recurrence in wx's dtype, step by step (m detached); the final state (h, c, n, m) in the accumulation
    dtype, or None without output_final_state."""
    B, T, D4 = wx.shape
    _, H, Dh, _ = R.shape
    D = H * Dh
    R = R.to(wx.dtype)
    if initial_state is None:
        h, c, n = (wx.new_zeros(B, D) for _ in range(3))
        m = wx.new_full((B, D), float("-inf"))
    else:
        h, c, n, m = (x.to(wx.dtype) for x in initial_state)
    m = m.detach()
    outs = []
    for t in range(T):
        rec = torch.einsum("bhk,ghkj->bghj", h.view(B, H, Dh), R).reshape(B, 4 * D)
        iv, fv, zv, ov = (wx[:, t] + rec).chunk(4, -1)
        lf = F.logsigmoid(fv)
        m_new = torch.maximum(iv, lf + m).detach()
        ig, fg = torch.exp(iv - m_new), torch.exp(lf + m - m_new)
        c = fg * c + ig * torch.tanh(zv)
        n = fg * n + ig
        h = torch.sigmoid(ov) * c / n
        m = m_new
        outs.append(h)
    y = torch.stack(outs, 1) if outs else wx.new_empty(B, 0, D)
    acc = acc_dtype(wx.dtype)
    return y, ((h.to(acc), c.to(acc), n.to(acc), m.to(acc)) if output_final_state else None)


# ---- fake kernels: shapes only ----
def _fake_fwd(wx, R, h0, c0, n0, m0):
    B, T, D4 = wx.shape
    acc = acc_dtype(wx.dtype)
    return (wx.new_empty((B, T, D4 // 4)), wx.new_empty((B, T, 4, D4 // 4), dtype=acc),
            wx.new_empty((B, T, 5, D4 // 4), dtype=acc))


def _fake_bwd(dy, wx, R, h0, c0, n0, m0, states, gates, dhT, dcT, dnT):
    B, T, D4 = wx.shape
    acc = acc_dtype(wx.dtype)
    s = wx.new_empty((B, D4 // 4), dtype=acc)
    return wx.new_empty(wx.shape), R.new_empty(R.shape), s, s.new_empty(s.shape), s.new_empty(s.shape)


def _setup(ctx, inputs, output):
    wx, R, h0, c0, n0, m0 = inputs
    ctx.has_h0 = h0 is not None
    ctx.save_for_backward(wx, R, h0, c0, n0, m0, output[1], output[2])
    ctx.mark_non_differentiable(output[2])


def _backward(ctx, dy, dstates, dgates):
    wx, R, h0, c0, n0, m0, states, gates = ctx.saved_tensors
    dhT = dcT = dnT = None
    if dstates is not None:
        dhT, dcT, dnT = (dstates[:, -1, j].contiguous() for j in range(3))
    dy = wx.new_zeros(states.shape[:2] + states.shape[3:]) if dy is None else dy.contiguous()
    dwx, dR, dh0, dc0, dn0 = slstm_bwd(dy, wx, R, h0, c0, n0, m0, states, gates, dhT, dcT, dnT)
    init = (dh0, dc0, dn0, None) if ctx.has_h0 else (None,) * 4
    return dwx, dR, *init


slstm_bwd = define_op(
    "slstm_bwd(Tensor dy, Tensor wx, Tensor R, Tensor? h0, Tensor? c0, Tensor? n0, Tensor? m0, Tensor states, "
    "Tensor gates, Tensor? dhT, Tensor? dcT, Tensor? dnT) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_bwd,
    "slstm:slstm_bwd")
slstm_fwd = define_op(
    "slstm_fwd(Tensor wx, Tensor R, Tensor? h0, Tensor? c0, Tensor? n0, Tensor? m0) -> (Tensor, Tensor, Tensor)",
    _fake_fwd, "slstm:slstm_fwd", backward=_backward, setup_context=_setup)


# ---- validation ----
def _check(fn: str, wx, R, state, state_name: str) -> None:
    for name, t in (("wx", wx), ("R", R)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating point tensor, got {t.dtype}")
    if R.dim() != 4 or R.shape[0] != 4 or R.shape[2] != R.shape[3]:
        raise ValueError(f"{fn}: R must be (4, H, Dh, Dh), got {tuple(R.shape)}")
    D = R.shape[1] * R.shape[2]
    if wx.dim() != 3 or wx.shape[-1] != 4 * D:
        raise ValueError(f"{fn}: wx must be (B, T, 4 H Dh) = (B, T, {4 * D}), got {tuple(wx.shape)}")
    if state is None:
        return
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        raise TypeError(f"{fn}: {state_name} must be a tuple (h, c, n, m), got {type(state).__name__}")
    for name, t in zip("hcnm", state):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {state_name}'s {name} must be a floating point tensor, got {type(t).__name__}")
        if tuple(t.shape) != (wx.shape[0], D):
            raise ValueError(f"{fn}: {state_name}'s {name} must be (B, D) = {(wx.shape[0], D)}, got {tuple(t.shape)}")


def slstm(wx: Tensor, R: Tensor, initial_state: Optional[State] = None, output_final_state: bool = False
          ) -> Tuple[Tensor, Optional[State]]:
    """The sLSTM cell over a sequence: wx (B, T, 4 D) the gates' input preactivations [i | f | z | o] (bias
    included), R (4, H, Dh, Dh) the per-head recurrent blocks, initial_state (h, c, n, m) (B, D) each. Returns
    (h (B, T, D) in wx's dtype, the final state (h, c, n, m) in float32 (float64 for float64 input) or None).
    Differentiable in wx, R and the initial state's h, c, n. Inputs the kernels do not cover (mixed devices, empty,
    float64 on CUDA) run the reference."""
    _check("slstm", wx, R, initial_state, "initial_state")
    if not kernel_ok(wx) or R.device != wx.device or (
            initial_state is not None and any(x.device != wx.device for x in initial_state)):
        return slstm_reference(wx, R, initial_state, output_final_state)
    acc = acc_dtype(wx.dtype)
    init = (None,) * 4 if initial_state is None else tuple(x.to(acc).contiguous() for x in initial_state)
    y, states, _ = call_op(slstm_fwd, wx.contiguous(), R.to(acc).contiguous(), *init)
    return y, (tuple(states[:, -1, j] for j in range(4)) if output_final_state else None)


def slstm_step(wx: Tensor, R: Tensor, state: Optional[State] = None) -> Tuple[Tensor, State]:
    """One decoding step: wx (B, 4 D) of one token and the carried state (h, c, n, m) (the default when None).
    Returns (h (B, D), the new state); equals slstm on the sequence one token at a time (it is the scan kernel on
    a one-step sequence)."""
    if not isinstance(wx, Tensor) or wx.dim() != 2:
        raise ValueError(f"slstm_step: wx must be (B, 4 D), got {tuple(wx.shape) if isinstance(wx, Tensor) else wx}")
    y, new = slstm(wx.unsqueeze(1), R, state, output_final_state=True)
    return y[:, 0], new


__all__: List[str] = ["slstm", "slstm_step"]
