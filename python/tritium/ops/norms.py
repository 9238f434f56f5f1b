"""RMSNorm, LayerNorm and fused add + RMSNorm: schemas, fake kernels, autograd and the public functions.

``rms_norm`` and ``layer_norm`` are drop-ins for their torch.nn.functional twins: whatever the kernels do not
cover (a dtype outside float32/bfloat16/float16/float64, weight and input of different dtypes or devices,
empty or 0-d inputs, and any invalid argument) goes explicitly to ``tritium.reference``, i.e. to torch's own
op, so results and error messages are torch's.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import reference
from ._library import acc_dtype, define_op, kernel_ok, routed, rows, unit_last

_ShapeT = Union[int, Sequence[int], torch.Size]


# ---- fake kernels: shapes only ----
def _fake_stat(x):
    return x.new_empty((x.shape[0],), dtype=acc_dtype(x.dtype))


def _fake_rms_fwd(x, weight, eps):
    return x.new_empty(x.shape), _fake_stat(x)


def _fake_add_rms_fwd(x, residual, weight, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape), _fake_stat(x)


def _fake_ln_fwd(x, weight, bias, eps):
    return x.new_empty(x.shape), _fake_stat(x), _fake_stat(x)


def _fake_rms_bwd(dy, x, weight, rstd, grad_residual, need_dw):
    return x.new_empty(x.shape), x.new_empty((x.shape[1] if need_dw and weight is not None else 0,))


def _fake_ln_bwd(dy, x, weight, mean, rstd, need_dw, need_db):
    n = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((n if need_dw and weight is not None else 0,)),
            x.new_empty((n if need_db else 0,)))


# ---- backward ops (no autograd of their own: double backward is not supported) ----
rms_norm_bwd = define_op(
    "rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? grad_residual, bool need_dw)"
    " -> (Tensor, Tensor)", _fake_rms_bwd, "norms:rms_norm_bwd")
layer_norm_bwd = define_op(
    "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dw, bool need_db)"
    " -> (Tensor, Tensor, Tensor)", _fake_ln_bwd, "norms:layer_norm_bwd")


# ---- autograd formulas ----
def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd(unit_last(dy), x, weight, rstd, None, need_dw)
    return dx, (dw if need_dw else None), None


def _add_rms_setup(ctx, inputs, output):
    _, _, weight, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])


def _add_rms_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[2]
    dx, dw = rms_norm_bwd(unit_last(dy), h, weight, rstd, unit_last(dh), need_dw)
    return dx, dx, (dw if need_dw else None), None


def _ln_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    need_dw, need_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dw, db = layer_norm_bwd(unit_last(dy), x, weight, mean, rstd, need_dw, need_db)
    return dx, (dw if need_dw else None), (db if need_db else None), None


rms_norm_fwd = define_op("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor, Tensor)",
                         _fake_rms_fwd, "norms:rms_norm_fwd", backward=_rms_backward,
                         setup_context=_rms_setup)
fused_add_rms_norm_fwd = define_op(
    "fused_add_rms_norm_fwd(Tensor x, Tensor residual, Tensor? weight, float eps) -> (Tensor, Tensor, Tensor)",
    _fake_add_rms_fwd, "norms:fused_add_rms_norm_fwd", backward=_add_rms_backward,
    setup_context=_add_rms_setup)
layer_norm_fwd = define_op(
    "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    _fake_ln_fwd, "norms:layer_norm_fwd", backward=_ln_backward, setup_context=_ln_setup)


# ---- public API ----
def _as_shape(normalized_shape: _ShapeT) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _norm_ok(op: str, x: Tensor, shape: tuple, *params: Optional[Tensor]) -> bool:
    """True when the kernels cover this call of `op` (kernel_ok, x ends in `shape`, the parameters that are given
    have that shape, no route to torch's own op); everything else goes to the reference (torch), which also
    raises torch's own errors for invalid arguments."""
    given = [p for p in params if p is not None]
    nd = len(shape)
    return (kernel_ok(x, *given) and 0 < nd <= x.dim() and tuple(x.shape[x.dim() - nd:]) == shape
            and all(tuple(p.shape) == shape for p in given) and not routed(op, x))


def _flat(p: Optional[Tensor]) -> Optional[Tensor]:
    return None if p is None else p.reshape(-1)


def rms_norm(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
             eps: Optional[float] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.rms_norm``: y = x / sqrt(mean(x^2) + eps) * weight over the
    trailing ``normalized_shape`` dims; eps defaults to the machine epsilon of the computation dtype (float32 for
    16-bit inputs), as in torch."""
    shape = _as_shape(normalized_shape)
    if not _norm_ok("rms_norm", input, shape, weight):
        return reference.rms_norm(input, list(shape), weight, eps)
    if eps is None:  # torch's default: the eps of the computation dtype (float32 for 16-bit inputs)
        eps = torch.finfo(acc_dtype(input.dtype)).eps
    n = math.prod(shape)
    y, _ = rms_norm_fwd(rows(input, n), _flat(weight), eps)
    return y.view(input.shape)


def layer_norm(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm``: y = (x - mean) / sqrt(var + eps) * weight + bias over
    the trailing ``normalized_shape`` dims (biased variance)."""
    shape = _as_shape(normalized_shape)
    if not _norm_ok("layer_norm", input, shape, weight, bias):
        return reference.layer_norm(input, list(shape), weight, bias, eps)
    n = math.prod(shape)
    y, _, _ = layer_norm_fwd(rows(input, n), _flat(weight), _flat(bias), eps)
    return y.view(input.shape)


def fused_add_rms_norm(input: Tensor, residual: Tensor, weight: Optional[Tensor] = None,
                       eps: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """(rms_norm(input + residual) * weight, input + residual) in one pass over the last dim: the
    pre-norm decoder's residual add and norm. input and residual have the same shape and dtype."""
    if input.shape != residual.shape:
        raise ValueError(f"fused_add_rms_norm: residual must have the shape of input {tuple(input.shape)}, "
                         f"got {tuple(residual.shape)}")
    if input.dim() == 0:
        raise ValueError("fused_add_rms_norm: input must have at least one dimension, got a 0-d tensor")
    n = input.shape[-1]
    if not (kernel_ok(input, residual) and _norm_ok("fused_add_rms_norm", input, (n,), weight)):
        return reference.fused_add_rms_norm(input, residual, weight, eps)
    if eps is None:  # torch's default: the eps of the computation dtype (float32 for 16-bit inputs)
        eps = torch.finfo(acc_dtype(input.dtype)).eps
    y, h, _ = fused_add_rms_norm_fwd(rows(input, n), rows(residual, n), weight, eps)
    return y.view(input.shape), h.view(input.shape)


__all__: List[str] = ["rms_norm", "layer_norm", "fused_add_rms_norm"]
