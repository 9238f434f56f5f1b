"""Benchmarks of RMSNorm, LayerNorm and fused add + RMSNorm (bytes: read MN (+N params), write MN)."""
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


CASES = [
    OpCase("rms_norm", _x_w, lambda x, w: tritium.rms_norm(x, (x.shape[-1],), w),
           lambda x, w: F.rms_norm(x, (x.shape[-1],), w), _rms_fwd, _rms_bwd),
    OpCase("layer_norm", _x_w_b, lambda x, w, b: tritium.layer_norm(x, (x.shape[-1],), w, b),
           lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b), _ln_fwd, _ln_bwd),
    OpCase("fused_add_rms_norm", _x_r_w, lambda x, r, w: tritium.fused_add_rms_norm(x, r, w),
           _eager_add_rms, _add_fwd, _add_bwd, note="eager: add then rms_norm (two ops)"),
]
