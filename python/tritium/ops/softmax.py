"""Softmax, log-softmax and softmin: schemas, fake kernels, autograd and the public drop-in functions.

One forward and one backward op cover the three functions: ``softmax_fwd(x, scale, log)`` computes
(log_)softmax(scale * x) over dim 1 of a 3-D view (outer, N, inner) of the input (scale -1 is softmin, 1/T a
temperature). Whatever the kernels do not cover (a dtype outside float32/bfloat16/float16/float64, float64 on
CUDA, empty or 0-d inputs, an invalid dim) goes explicitly to ``tritium.reference``, i.e. to torch's own function,
so results, warnings and error messages are torch's.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok, routed


# ---- fake kernels: shapes only ----
def _fake_fwd(x, scale, log):
    return x.new_empty(x.shape)


def _fake_bwd(dy, y, scale, log):
    return y.new_empty(y.shape)


softmax_bwd = define_op("softmax_bwd(Tensor dy, Tensor y, float scale, bool log) -> Tensor", _fake_bwd,
                        "softmax:softmax_bwd")


def _as3(t: Tensor) -> Tensor:
    """The kernels' layout for a 3-D (outer, N, inner) tensor: unit stride along N when inner == 1 (any outer
    stride), else contiguous (N, inner) blocks. Copies only when the tensor has neither (e.g. an expanded
    grad_output)."""
    if t.shape[2] == 1:
        return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()
    return t if t.stride(2) == 1 and t.stride(1) == t.shape[2] else t.contiguous()


def _setup(ctx, inputs, output):
    _, scale, log = inputs
    ctx.scale, ctx.log = scale, log
    ctx.save_for_backward(output)


def _backward(ctx, dy):
    (y,) = ctx.saved_tensors
    return softmax_bwd(_as3(dy), y, ctx.scale, ctx.log), None, None


softmax_fwd = define_op("softmax_fwd(Tensor x, float scale, bool log) -> Tensor", _fake_fwd,
                        "softmax:softmax_fwd", backward=_backward, setup_context=_setup)


# ---- public API ----
def _softmax_ok(op: str, x: Tensor, dim: int) -> bool:
    """True when the kernels cover this call (kernel_ok, a valid dim of a tensor with dims, and no route to torch's
    own op); everything else goes to the reference (torch), which also raises torch's own errors for invalid
    arguments."""
    return kernel_ok(x) and x.dim() > 0 and -x.dim() <= dim < x.dim() and not routed(op, x)


def view3(x: Tensor, dim: int) -> Tensor:
    """x as (outer, N, inner) with N = x.shape[dim], in the kernels' layout (see _as3): a view whenever one
    exists (any leading strides when dim is the last dim), else one copy."""
    dim = dim % x.dim()
    n = x.shape[dim]
    outer, inner = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1:])
    if inner == 1:
        x2 = x.reshape(outer, n)
        return _as3(x2.unsqueeze(-1))
    return _as3(x.reshape(outer, n, inner))


def _run(x: Tensor, dim: int, scale: float, log: bool) -> Tensor:
    return call_op(softmax_fwd, view3(x, dim), scale, log).view(x.shape)


def softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.softmax``: exp(x) / sum(exp(x)) along ``dim`` (dim=None: torch's
    deprecated implicit choice, with its warning); ``dtype`` casts the input first, as in torch."""
    if dim is None:
        dim = F._get_softmax_dim("softmax", input.dim(), _stacklevel)
    x = input if dtype is None else input.to(dtype)
    if not _softmax_ok("softmax", x, dim):
        return reference.softmax(input, dim, dtype=dtype)
    return _run(x, dim, 1.0, False)


def log_softmax(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
                dtype: Optional[torch.dtype] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.log_softmax``: x - log(sum(exp(x))) along ``dim``."""
    if dim is None:
        dim = F._get_softmax_dim("log_softmax", input.dim(), _stacklevel)
    x = input if dtype is None else input.to(dtype)
    if not _softmax_ok("log_softmax", x, dim):
        return reference.log_softmax(input, dim, dtype=dtype)
    return _run(x, dim, 1.0, True)


def softmin(input: Tensor, dim: Optional[int] = None, _stacklevel: int = 3,
            dtype: Optional[torch.dtype] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.softmin``: softmax(-x) along ``dim`` (the negation is fused)."""
    if dim is None:
        dim = F._get_softmax_dim("softmin", input.dim(), _stacklevel)
    x = input if dtype is None else input.to(dtype)
    if not _softmax_ok("softmin", x, dim):
        return reference.softmin(input, dim, dtype=dtype)
    return _run(x, dim, -1.0, False)


__all__: List[str] = ["softmax", "log_softmax", "softmin"]
