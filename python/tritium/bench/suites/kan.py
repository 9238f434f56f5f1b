"""Benchmarks of the KAN spline term (tritium.kan_spline) against efficient-kan's formulation in eager torch (the
(batch, in, bases) basis tensor by the Cox-de Boor recursion, then one GEMM; tritium.reference.kan_spline) and
torch.compile of it. Shapes (batch, in, out) with efficient-kan's defaults: grid 5, cubic splines (8 bases per
input); the first is a hidden layer of a KAN at a training batch."""
import torch

import tritium
from tritium import reference
from tritium.bench.case import OpCase, esize

GRID, ORDER = 5, 3


def _inputs(shape, dtype, device):
    B, I, O = shape
    h = 2.0 / GRID
    grid = (torch.arange(-ORDER, GRID + ORDER + 1, device=device) * h - 1.0).expand(I, -1).contiguous()
    x = (torch.rand(B, I, device=device) * 2 - 1).to(dtype)
    w = (torch.randn(O, I, GRID + ORDER, device=device) / (I * (ORDER + 1)) ** 0.5).to(dtype)
    return x, grid, w


def _tritium(x, grid, w):
    return tritium.kan_spline(x, grid, w, ORDER)


def _eager(x, grid, w):
    return reference.kan_spline(x, grid, w, ORDER)


def _bytes_fwd(s, d):  # read x and the weights, write y
    B, I, O = s
    return (B * I + O * I * (GRID + ORDER) + B * O) * esize(d)


def _bytes_fwdbwd(s, d):  # + read dy, x and the weights again; write dx and dW
    B, I, O = s
    return _bytes_fwd(s, d) + (B * O + 2 * B * I + 2 * O * I * (GRID + ORDER)) * esize(d)


def _flops_fwd(s, d):  # the (k + 1) nonzero bases per (row, input) times out
    B, I, O = s
    return 2 * B * I * (ORDER + 1) * O


def _flops_fwdbwd(s, d):
    return 3 * _flops_fwd(s, d)


CASES = [
    OpCase("kan_spline", _inputs, _tritium, _eager, _bytes_fwd, _bytes_fwdbwd, flops_fwd=_flops_fwd,
           flops_fwdbwd=_flops_fwdbwd, shapes=((1024, 256, 256), (256, 64, 64), (4096, 64, 10)),
           grad_args=(0, 2),
           note="KAN spline term vs efficient-kan's b_splines + linear (tritium.reference.kan_spline)"),
]
