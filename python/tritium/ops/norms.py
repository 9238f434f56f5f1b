"""RMSNorm, LayerNorm, fused add + RMSNorm and GroupNorm (+ SiLU): schemas, fake kernels, autograd and the public
functions.

``rms_norm``, ``layer_norm`` and ``group_norm`` are drop-ins for their torch.nn.functional twins: whatever the
kernels do not cover (a dtype outside float32/bfloat16/float16/float64, weight and input of different dtypes or devices,
empty or 0-d inputs, and any invalid argument) goes explicitly to ``tritium.reference``, i.e. to torch's own
op, so results and error messages are torch's.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import reference
from ._library import acc_dtype, call_op, define_op, grad_route, kernel_ok, routed, rows, shaped, unit_last


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


def _fake_gn_fwd(x, weight, bias, num_groups, eps, silu):
    return x.new_empty(x.shape), _fake_stat(x), _fake_stat(x)


def _fake_gn_bwd(dy, x, weight, bias, mean, rstd, num_groups, silu, need_dw, need_db):
    c = x.shape[1] * num_groups
    return (x.new_empty(x.shape), x.new_empty((c if need_dw and weight is not None else 0,)),
            x.new_empty((c if need_db else 0,)))


# ---- backward ops (no autograd of their own: double backward is not supported) ----
rms_norm_bwd = define_op(
    "rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? grad_residual, bool need_dw)"
    " -> (Tensor, Tensor)", _fake_rms_bwd, "norms:rms_norm_bwd")
layer_norm_bwd = define_op(
    "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dw, bool need_db)"
    " -> (Tensor, Tensor, Tensor)", _fake_ln_bwd, "norms:layer_norm_bwd")
group_norm_bwd = define_op(
    "group_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd, int num_groups,"
    " bool silu, bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)", _fake_gn_bwd, "norms:group_norm_bwd")


# ---- autograd formulas ----
# The statistics (mean, rstd) are outputs for the backward, not for the result: non-differentiable (the formulas
# take no gradient through them), and with no zero gradients materialised for them (one allocation per output and
# call): a gradient that reaches no output comes as None.
def _stats_only(ctx, *stats):
    ctx.mark_non_differentiable(*stats)
    ctx.set_materialize_grads(False)


def _rms_setup(ctx, inputs, output):
    x, weight, _ = inputs
    _stats_only(ctx, output[1])
    ctx.save_for_backward(x, weight, output[1])


def _rms_backward(ctx, dy, _drstd):
    if dy is None:  # (an undefined gradient, as gradcheck passes one)
        return None, None, None
    x, weight, rstd = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = rms_norm_bwd(unit_last(dy), x, weight, rstd, None, need_dw)
    return dx, (dw if need_dw else None), None


def _add_rms_setup(ctx, inputs, output):
    _, _, weight, _ = inputs
    _stats_only(ctx, output[2])
    ctx.save_for_backward(output[1], weight, output[2])


def _add_rms_backward(ctx, dy, dh, _drstd):
    h, weight, rstd = ctx.saved_tensors
    if dy is None:  # only h reached the loss (or neither: dh None too): dh is the gradient of input and residual
        return dh, dh, None, None
    if dh is not None:
        dh = unit_last(dh)
    need_dw = ctx.needs_input_grad[2]
    dx, dw = rms_norm_bwd(unit_last(dy), h, weight, rstd, dh, need_dw)
    return dx, dx, (dw if need_dw else None), None


def _ln_setup(ctx, inputs, output):
    x, weight, _, _ = inputs
    _stats_only(ctx, output[1], output[2])
    ctx.save_for_backward(x, weight, output[1], output[2])


def _ln_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None
    x, weight, mean, rstd = ctx.saved_tensors
    need_dw, need_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dw, db = layer_norm_bwd(unit_last(dy), x, weight, mean, rstd, need_dw, need_db)
    return dx, (dw if need_dw else None), (db if need_db else None), None


def _gn_setup(ctx, inputs, output):
    x, weight, bias, num_groups, _, silu = inputs
    _stats_only(ctx, output[1], output[2])
    ctx.save_for_backward(x, weight, bias, output[1], output[2])
    ctx.args = (num_groups, silu)


def _blocks(t: Tensor) -> Tensor:
    """t (N * groups, channels per group, spatial) with each block contiguous, the layout the group_norm kernels
    read (any stride between blocks): t itself when it has it, else a contiguous copy (e.g. an expanded gradient
    from a sum)."""
    _, d, s = t.shape
    if (t.stride(2) == 1 or s <= 1) and (t.stride(1) == s or d <= 1):
        return t
    return t.contiguous()


def _gn_backward(ctx, dy, _dmean, _drstd):
    if dy is None:
        return None, None, None, None, None, None
    x, weight, bias, mean, rstd = ctx.saved_tensors
    need_dw, need_db = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    dx, dw, db = group_norm_bwd(_blocks(dy), x, weight, bias, mean, rstd, *ctx.args, need_dw, need_db)
    return dx, (dw if need_dw else None), (db if need_db else None), None, None, None


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
# x: (N * num_groups, C / num_groups, spatial) blocks; mean, rstd: one per block
group_norm_fwd = define_op(
    "group_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, int num_groups, float eps, bool silu)"
    " -> (Tensor, Tensor, Tensor)", _fake_gn_fwd, "norms:group_norm_fwd", backward=_gn_backward,
    setup_context=_gn_setup)


# ---- public API ----
def _as_shape(normalized_shape: _ShapeT) -> tuple:
    if isinstance(normalized_shape, int):
        return (normalized_shape,)
    return tuple(normalized_shape)


def _norm_ok(op: str, x: Tensor, shape: tuple, *params: Optional[Tensor]) -> bool:
    """True when the kernels cover this call of `op` (kernel_ok, x ends in `shape`, the parameters that are given
    have that shape, no route to torch's own op); everything else goes to the reference (torch), which also
    raises torch's own errors for invalid arguments. The route is asked first: it is the cheapest check, and a
    routed call (a small one) is where the checks' time is a visible share of the call's."""
    if not isinstance(x, Tensor) or routed(op, x):
        return False
    given = [p for p in params if p is not None]
    nd = len(shape)
    return (kernel_ok(x, *given) and 0 < nd <= x.dim() and tuple(x.shape[x.dim() - nd:]) == shape
            and all(tuple(p.shape) == shape for p in given))


def _flat(p: Optional[Tensor]) -> Optional[Tensor]:
    return p if p is None or p.dim() == 1 else p.reshape(-1)


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
    y, _ = call_op(rms_norm_fwd, rows(input, n), _flat(weight), eps)
    return shaped(y, input.shape)


def layer_norm(input: Tensor, normalized_shape: _ShapeT, weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5) -> Tensor:
    """Drop-in for ``torch.nn.functional.layer_norm``: y = (x - mean) / sqrt(var + eps) * weight + bias over
    the trailing ``normalized_shape`` dims (biased variance)."""
    shape = _as_shape(normalized_shape)
    if not _norm_ok("layer_norm", input, shape, weight, bias):
        return reference.layer_norm(input, list(shape), weight, bias, eps)
    n = math.prod(shape)
    y, _, _ = call_op(layer_norm_fwd, rows(input, n), _flat(weight), _flat(bias), eps)
    return shaped(y, input.shape)


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
    y, h, _ = call_op(fused_add_rms_norm_fwd, rows(input, n), rows(residual, n), weight, eps)
    return shaped(y, input.shape), shaped(h, input.shape)


GROUP_NORM_ACTIVATIONS = (None, "silu")


def _group_norm_ok(x: Tensor, num_groups, weight: Optional[Tensor], bias: Optional[Tensor]) -> bool:
    """True when the kernels cover this group_norm call: kernel_ok, x (N, C, *spatial) with C a multiple of an
    integer num_groups > 0, weight and bias (C,) where given, more than one value per channel group of the
    batch (torch's _verify_batch_size), no route to torch's own op. Everything else goes to the reference, which
    raises torch's errors."""
    given = [p for p in (weight, bias) if p is not None]
    if not (kernel_ok(x, *given) and x.dim() >= 2 and not routed(grad_route("group_norm", x, *given), x)):
        return False
    c = x.shape[1]
    return (type(num_groups) is int and num_groups > 0 and c % num_groups == 0
            and x.shape[0] * (c // num_groups) * math.prod(x.shape[2:]) != 1
            and all(tuple(p.shape) == (c,) for p in given))


def group_norm(input: Tensor, num_groups: int, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, activation: Optional[str] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.group_norm``: the C channels of input (N, C, *spatial) split into
    ``num_groups`` groups, each (sample, group) normalised over its channels and spatial positions (biased
    variance), then y = xhat * weight[c] + bias[c]; ``activation="silu"`` applies SiLU to that in the same pass
    (the U-Net block's GroupNorm + SiLU)."""
    if activation not in GROUP_NORM_ACTIVATIONS:
        raise ValueError(f"group_norm: activation must be None or 'silu', got {activation!r}")
    if not _group_norm_ok(input, num_groups, weight, bias):
        return reference.group_norm(input, num_groups, weight, bias, eps, activation)
    n, c = input.shape[:2]
    d = c // num_groups
    s = input.numel() // (n * c)
    x = rows(input, d * s).view(n * num_groups, d, s)
    y, _, _ = call_op(group_norm_fwd, x, weight, bias, num_groups, eps, activation == "silu")
    return shaped(y, input.shape)


__all__: List[str] = ["rms_norm", "layer_norm", "fused_add_rms_norm", "group_norm"]
