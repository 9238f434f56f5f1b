"""Kolmogorov-Arnold network spline term: ``kan_spline`` (efficient-kan's KANLinear spline branch with the B-spline
basis evaluation fused into the spline-weight product, forward and backward).

y[..., o] = sum_i sum_c B_c(x[..., i]; grid[i]) weight[o, i, c]: grid (in, grid_size + 2 order + 1) knots per input
feature (efficient-kan's extended grid, uniform or as ``update_grid`` left it), weight (out, in, grid_size + order)
(efficient-kan's ``scaled_spline_weight``). The kernels take the weight permuted to (in, bases, out), a basis row
along the outputs: a view (a torch op, so the weight's gradient flows back through it) whose copy for the products
the kernels make themselves, and whose gradient they return in the same layout, so it becomes the weight's
``.grad`` without a copy.

The knots are a constant (efficient-kan's ``grid`` buffer): when grid requires grad, or the call is outside the
kernels (dtype, device, empty input), it goes to ``tritium.reference.kan_spline``.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok

MAX_ORDER = 7  # the kernels' bound on the spline order (csrc/kan.cpp kMaxOrder)


def _fake_fwd(x, grid, weight_t, order):
    return x.new_empty((x.shape[0], weight_t.shape[2]))


def _fake_bwd(dy, x, grid, weight_t, order, need_dx, need_dw):
    # dW in weight_t's layout where that is dense, else contiguous (empty_like's rule, as the kernels)
    return (x.new_empty(x.shape if need_dx else (0,)),
            torch.empty_like(weight_t) if need_dw else x.new_empty((0,)))


kan_spline_bwd = define_op(
    "kan_spline_bwd(Tensor dy, Tensor x, Tensor grid, Tensor weight_t, int order, bool need_dx, bool need_dw)"
    " -> (Tensor, Tensor)", _fake_bwd, "kan:kan_spline_bwd")


def _setup(ctx, inputs, output):
    x, grid, weight_t, order = inputs
    ctx.save_for_backward(x, grid, weight_t)
    ctx.order = order


def _backward(ctx, dy):
    x, grid, weight_t = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_dx or need_dw):
        return None, None, None, None
    dx, dw = kan_spline_bwd(dy.contiguous(), x, grid, weight_t, ctx.order, need_dx, need_dw)
    return (dx if need_dx else None), None, (dw if need_dw else None), None


kan_spline_fwd = define_op("kan_spline_fwd(Tensor x, Tensor grid, Tensor weight_t, int order) -> Tensor", _fake_fwd,
                           "kan:kan_spline_fwd", backward=_backward, setup_context=_setup)


def _check(x, grid, weight, spline_order) -> None:
    for name, t in (("x", x), ("grid", grid), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"kan_spline: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"kan_spline: {name} must be floating point, got {t.dtype}")
    if isinstance(spline_order, bool) or not isinstance(spline_order, int) or not 0 <= spline_order <= MAX_ORDER:
        raise ValueError(f"kan_spline: spline_order must be an int in [0, {MAX_ORDER}], got {spline_order!r}")
    if x.dim() < 1:
        raise ValueError("kan_spline: x must have at least one dim (..., in), got a 0-d tensor")
    n_in = x.shape[-1]
    if grid.dim() != 2 or grid.shape[0] != n_in:
        raise ValueError(f"kan_spline: grid must be (in={n_in}, knots), got {tuple(grid.shape)}")
    bases = grid.shape[1] - 1 - spline_order
    if bases < 1:
        raise ValueError(f"kan_spline: grid has {grid.shape[1]} knots per feature: no basis of order {spline_order} "
                         f"(need at least {spline_order + 2})")
    if weight.dim() != 3 or weight.shape[1] != n_in or weight.shape[2] != bases:
        raise ValueError(f"kan_spline: weight must be (out, in={n_in}, knots - 1 - order={bases}), got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"kan_spline: weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if grid.device != x.device or weight.device != x.device:
        raise ValueError(f"kan_spline: x, grid and weight must be on one device, got {x.device}, {grid.device} and "
                         f"{weight.device}")


def kan_spline(x: Tensor, grid: Tensor, weight: Tensor, spline_order: int = 3) -> Tensor:
    """The spline term of a KAN layer: (..., in) -> (..., out), y = sum_{i,c} B_c(x_i) weight[o, i, c] with the
    order-``spline_order`` B-spline bases on each feature's knots grid[i] (efficient-kan's ``b_splines`` followed
    by its linear map, without holding the whole (batch, in, bases) basis tensor: the CPU kernels take it a block
    of rows at a time into a GEMM, the GPU kernels keep it in registers). Differentiable in x and weight."""
    _check(x, grid, weight, spline_order)
    n_in, n_out = x.shape[-1], weight.shape[0]
    if not kernel_ok(x, weight) or grid.requires_grad or x.numel() == 0 or n_out == 0 or \
            (x.device.type == "cuda" and grid.dtype == torch.float64):
        return reference.kan_spline(x, grid, weight, spline_order)
    x2 = x.reshape(-1, n_in)
    y = call_op(kan_spline_fwd, x2, grid, weight.permute(1, 2, 0), int(spline_order))
    return y.view(*x.shape[:-1], n_out)


__all__: List[str] = ["kan_spline"]
