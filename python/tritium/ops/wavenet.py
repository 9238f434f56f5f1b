"""WaveNet's gated residual unit: ``wavenet_gate`` (z = tanh(a) * sigmoid(g) over the two channel halves of a dilated
convolution's output, optional conditioning added to both, forward and backward in one kernel each) and
``wavenet_residual_skip`` (the gate, then the 1x1 residual and skip projections and the residual add).

The projections are one GEMM over the concatenated [W_res; W_skip] (a 1x1 convolution is a matrix product over
channels, which MKL and cuBLAS do better than a hand-written kernel would); the gate's kernel writes z once for it,
and z is what the weights' gradient needs anyway. The dilated causal convolution before the unit stays torch's
conv1d (a dense convolution over channels is a GEMM too: oneDNN and cuDNN own it).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok


def _fake_fwd(h, cond):
    return h.new_empty((h.shape[0], h.shape[1] // 2, h.shape[2]))


def _fake_bwd(dz, h, cond):
    return h.new_empty(h.shape)


wavenet_gate_bwd = define_op("wavenet_gate_bwd(Tensor dz, Tensor h, Tensor? cond) -> Tensor", _fake_bwd,
                             "wavenet:wavenet_gate_bwd")


def _setup(ctx, inputs, output):
    h, cond = inputs
    ctx.save_for_backward(h, cond)
    ctx.has_cond = cond is not None


def _backward(ctx, dz):
    h, cond = ctx.saved_tensors
    dh = wavenet_gate_bwd(dz.contiguous(), h, cond if ctx.has_cond else None)
    return dh, (dh if ctx.has_cond and ctx.needs_input_grad[1] else None)


wavenet_gate_fwd = define_op("wavenet_gate_fwd(Tensor h, Tensor? cond) -> Tensor", _fake_fwd,
                             "wavenet:wavenet_gate_fwd", backward=_backward, setup_context=_setup)


def _check_h(h, cond) -> None:
    if not isinstance(h, Tensor):
        raise TypeError(f"wavenet_gate: h must be a Tensor, got {type(h).__name__}")
    if not h.is_floating_point():
        raise TypeError(f"wavenet_gate: h must be floating point, got {h.dtype}")
    if h.dim() != 3 or h.shape[1] % 2:
        raise ValueError(f"wavenet_gate: h must be (batch, 2 C, time) with an even channel count, got {tuple(h.shape)}")
    if cond is not None:
        if not isinstance(cond, Tensor):
            raise TypeError(f"wavenet_gate: cond must be a Tensor or None, got {type(cond).__name__}")
        if cond.dim() != 3 or cond.shape[0] != h.shape[0] or cond.shape[1] != h.shape[1] or \
                cond.shape[2] not in (1, h.shape[2]):
            raise ValueError(f"wavenet_gate: cond must be (batch, 2 C, time) = {tuple(h.shape)} or (batch, 2 C, 1), "
                             f"got {tuple(cond.shape)}")
        if cond.dtype != h.dtype or cond.device != h.device:
            raise TypeError(f"wavenet_gate: cond must have h's dtype and device ({h.dtype}, {h.device}), got "
                            f"{cond.dtype}, {cond.device}")


def wavenet_gate(h: Tensor, cond: Optional[Tensor] = None) -> Tensor:
    """(batch, 2C, T) -> (batch, C, T): tanh(h[:, :C] + cond[:, :C]) * sigmoid(h[:, C:] + cond[:, C:]). cond: None,
    local conditioning of h's shape, or global conditioning (batch, 2C, 1) broadcast over time (its gradient is
    summed over time)."""
    _check_h(h, cond)
    if not kernel_ok(h) or (cond is not None and not kernel_ok(h, cond)):
        return reference.wavenet_gate(h, cond)
    if cond is not None and cond.shape[2] != h.shape[2]:
        cond = cond.expand(h.shape)  # the expand's backward sums the gradient over time
    return call_op(wavenet_gate_fwd, h.contiguous(), None if cond is None else cond.contiguous())


def wavenet_residual_skip(x: Tensor, h: Tensor, w_res: Tensor, b_res: Optional[Tensor], w_skip: Tensor,
                          b_skip: Optional[Tensor], cond: Optional[Tensor] = None,
                          channels_last: bool = False) -> Tuple[Tensor, Tensor]:
    """One WaveNet residual unit after its dilated convolution: z = wavenet_gate(h, cond) (batch, C, T); returns
    (x + w_res z + b_res, w_skip z + b_skip) with w_res (R, C) (R = x's channels), w_skip (S, C) the 1x1
    convolutions' weights (conv1d weights (R, C, 1) are accepted too). ``channels_last``: x (batch, T, R), h and cond
    (batch, T, 2C), outputs (batch, T, R) and (batch, T, S): the projections are then plain matrix products over
    the rows (the layout a CPU GEMM prefers)."""
    if w_res.dim() == 3:
        w_res = w_res.squeeze(-1)
    if w_skip.dim() == 3:
        w_skip = w_skip.squeeze(-1)
    R = w_res.shape[0]
    if channels_last:
        if h.dim() != 3 or x.dim() != 3 or x.shape[:2] != h.shape[:2] or x.shape[2] != R:
            raise ValueError(f"wavenet_residual_skip: channels_last x must be (batch, time, {R}) with h's batch and "
                             f"time, h (batch, time, 2 C); got x {tuple(x.shape)}, h {tuple(h.shape)}")
        B, T, C2 = h.shape
        c = None if cond is None else cond.expand(h.shape).reshape(B * T, C2, 1)
        z = wavenet_gate(h.reshape(B * T, C2, 1), c).view(B, T, C2 // 2)
    else:
        z = wavenet_gate(h, cond)
        if x.dim() != 3 or x.shape[1] != R or x.shape[0] != h.shape[0] or x.shape[2] != h.shape[2]:
            raise ValueError(f"wavenet_residual_skip: x must be (batch, {R}, {h.shape[2]}) (w_res's outputs, h's batch "
                             f"and time), got {tuple(x.shape)}")
    w = torch.cat([w_res, w_skip])
    b = None if b_res is None and b_skip is None else torch.cat([
        b_res if b_res is not None else w_res.new_zeros(R), b_skip if b_skip is not None else w_skip.new_zeros(
            w_skip.shape[0])])
    # split, not two slices: its backward writes the two gradients into one tensor (two slices' would each fill a
    # zero tensor of the projections' size, copy into it, and add the two)
    if channels_last:
        res, skip = F.linear(z, w, b).split([R, w.shape[0] - R], -1)   # both 1x1 projections in one GEMM
    else:
        res, skip = F.conv1d(z, w.unsqueeze(-1), b).split([R, w.shape[0] - R], 1)
    return x + res, skip


__all__: List[str] = ["wavenet_gate", "wavenet_residual_skip"]
