"""2-D max pooling: ``max_pool2d``, a drop-in for torch.nn.functional.max_pool2d.

The kernels cover the common case of a CNN's pooling layer: non-overlapping windows (stride equal to the window,
the default), no padding, no dilation, floor mode, a contiguous (N, C, H, W) or (C, H, W) input, no indices
returned. They read the input once and write the output with a one-byte window offset per output (torch keeps an
int64 index), and the backward writes the input's gradient in one pass. torch's CPU kernel for a channels-first
input walks each small plane with per-element index arithmetic, many times slower than the bytes it moves at the
image sizes of the zoo's CNNs (8x8 digits). Every other call goes to torch's own function (tritium.reference).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok


def _fake_fwd(x, kh, kw):
    P, H, W = x.shape
    return x.new_empty((P, H // kh, W // kw)), x.new_empty((P, H // kh, W // kw), dtype=torch.uint8)


def _fake_bwd(dy, idx, kh, kw, H, W):
    return dy.new_empty((dy.shape[0], H, W))


max_pool2d_bwd = define_op("max_pool2d_bwd(Tensor dy, Tensor idx, int kh, int kw, int H, int W) -> Tensor",
                           _fake_bwd, "pooling:max_pool2d_bwd")


def _setup(ctx, inputs, output):
    x, kh, kw = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1])
    ctx.kh, ctx.kw, ctx.H, ctx.W = kh, kw, x.shape[1], x.shape[2]


def _backward(ctx, dy, _didx):
    (idx,) = ctx.saved_tensors
    return max_pool2d_bwd(dy.contiguous(), idx, ctx.kh, ctx.kw, ctx.H, ctx.W), None, None


max_pool2d_fwd = define_op("max_pool2d_fwd(Tensor x, int kh, int kw) -> (Tensor, Tensor)", _fake_fwd,
                           "pooling:max_pool2d_fwd", backward=_backward, setup_context=_setup)


def _pair(v) -> Optional[Tuple[int, int]]:
    """(a, b) from an int or a sequence of one or two ints; None for anything else (torch then judges it)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(e, int) and not isinstance(e, bool)
                                                                  for e in v):
        return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])
    return None


def _window(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices) -> Optional[Tuple[int, int]]:
    """(kh, kw) when the kernels cover the call, else None."""
    k = _pair(kernel_size)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else _pair(stride)
    if (k is None or s != k or _pair(padding) != (0, 0) or _pair(dilation) != (1, 1) or ceil_mode
            or return_indices or not kernel_ok(input) or input.dim() not in (3, 4) or not input.is_contiguous()):
        return None
    kh, kw = k
    if not (1 <= kh <= input.shape[-2] and 1 <= kw <= input.shape[-1] and kh * kw <= 256):
        return None
    return kh, kw


def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """torch.nn.functional.max_pool2d: the maximum over each kernel_size window of the last two dims of a
    (N, C, H, W) or (C, H, W) input; the same signature, defaults, results and errors."""
    win = _window(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if win is None:
        return reference.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode,
                                    return_indices=return_indices)
    kh, kw = win
    H, W = input.shape[-2:]
    y, _ = call_op(max_pool2d_fwd, input.reshape(-1, H, W), kh, kw)
    return y.view(*input.shape[:-2], H // kh, W // kw)


__all__: List[str] = ["max_pool2d"]
