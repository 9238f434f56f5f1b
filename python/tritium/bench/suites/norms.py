"""Benchmarks of RMSNorm, LayerNorm and fused add + RMSNorm (bytes: read MN (+N params), write MN), and BatchNorm
in inference + residual + ReLU (batch_norm_act, on NCHW activations), and GroupNorm with and without its fused SiLU
(group_norm, NCHW)."""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, elems, esize


def _x_w(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape[-1], dtype=dtype, device=device))


def _x_w_b(shape, dtype, device):
    return _x_w(shape, dtype, device) + (torch.randn(shape[-1], dtype=dtype, device=device),)


def _x_r_w(shape, dtype, device):
    x, w = _x_w(shape, dtype, device)
    return x, torch.randn(shape, dtype=dtype, device=device), w


def _io(k_fwd, k_bwd, params):
    """bytes formulas: k_fwd / k_bwd row-sized tensors moved, plus `params` weight-sized ones."""
    fwd = lambda s, d: (k_fwd * elems(s) + params * s[-1]) * esize(d)  # noqa: E731
    bwd = lambda s, d: ((k_fwd + k_bwd) * elems(s) + 3 * params * s[-1]) * esize(d)  # noqa: E731
    return fwd, bwd


_rms_fwd, _rms_bwd = _io(2, 3, 1)          # fwd: read x, write y; bwd: read dy, x, write dx
_ln_fwd, _ln_bwd = _io(2, 3, 2)
_add_fwd, _add_bwd = _io(4, 4, 1)          # fwd: read x, r, write y, h; bwd: read dy, dh, h, write dx


def _eager_add_rms(x, r, w):
    h = x + r
    return F.rms_norm(h, (h.shape[-1],), w), h


def _bn_inputs(shape, dtype, device):
    """x and residual (N, C, H, W) in dtype; running statistics, weight and bias (C) in float32 for 16-bit x (as
    a bfloat16 ResNet under autocast keeps its BatchNorm parameters), else in dtype."""
    c, sd = shape[1], (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    x, res = (torch.randn(shape, dtype=dtype, device=device) for _ in range(2))
    mean, w, b = (torch.randn(c, dtype=sd, device=device) for _ in range(3))
    return x, mean, torch.rand(c, dtype=sd, device=device) + 0.5, w, b, res


def _eager_bn_act(x, mean, var, w, b, res):
    return F.relu(F.batch_norm(x, mean, var, w, b, False, 0.0, 1e-5) + res)


# fwd: read x, residual, write y; bwd: read dy, x, y (the ReLU's mask), write dx, d residual
_bn_fwd = lambda s, d: 3 * elems(s) * esize(d)  # noqa: E731
_bn_bwd = lambda s, d: 8 * elems(s) * esize(d)  # noqa: E731

def _gn_inputs(shape, dtype, device):
    """x (N, C, H, W), weight and bias (C)."""
    return (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape[1], dtype=dtype, device=device),
            torch.randn(shape[1], dtype=dtype, device=device))


# 32 groups, as a U-Net's GroupNorm. fwd: read x, write y; bwd: read dy, x, write dx (and 3 weight-sized)
_gn_fwd = lambda s, d: (2 * elems(s) + 2 * s[1]) * esize(d)  # noqa: E731
_gn_bwd = lambda s, d: (5 * elems(s) + 6 * s[1]) * esize(d)  # noqa: E731
_GN_SHAPES = ((32, 256, 32, 32), (8, 512, 16, 16), (1, 128, 64, 64))

CASES = [
    OpCase("rms_norm", _x_w, lambda x, w: tritium.rms_norm(x, (x.shape[-1],), w),
           lambda x, w: F.rms_norm(x, (x.shape[-1],), w), _rms_fwd, _rms_bwd),
    OpCase("layer_norm", _x_w_b, lambda x, w, b: tritium.layer_norm(x, (x.shape[-1],), w, b),
           lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b), _ln_fwd, _ln_bwd),
    OpCase("fused_add_rms_norm", _x_r_w, lambda x, r, w: tritium.fused_add_rms_norm(x, r, w),
           _eager_add_rms, _add_fwd, _add_bwd, note="eager: add then rms_norm (two ops)"),
    OpCase("batch_norm_act", _bn_inputs,
           lambda x, m, v, w, b, r: tritium.batch_norm_act(x, m, v, w, b, 1e-5, "relu", r),
           _eager_bn_act, _bn_fwd, _bn_bwd, shapes=((32, 64, 56, 56), (32, 256, 14, 14), (1, 64, 56, 56)),
           grad_args=(0, 3, 4, 5), note="inference statistics; eager: batch_norm, add, relu (three ops)"),
    OpCase("group_norm", _gn_inputs, lambda x, w, b: tritium.group_norm(x, 32, w, b),
           lambda x, w, b: F.group_norm(x, 32, w, b), _gn_fwd, _gn_bwd, shapes=_GN_SHAPES, note="32 groups"),
    OpCase("group_norm_silu", _gn_inputs, lambda x, w, b: tritium.group_norm(x, 32, w, b, activation="silu"),
           lambda x, w, b: F.silu(F.group_norm(x, 32, w, b)), _gn_fwd, _gn_bwd, shapes=_GN_SHAPES,
           note="32 groups; eager: group_norm then silu (two ops)"),
]
