"""Benchmarks of the activations, gated units and DyT (memory-bound: bytes = elements read + written).

Elementwise: forward reads x and writes y (2 MN); backward reads dy, x and writes dx (3 MN).
Gated, separate gate/up (M, H): forward 3 MH; backward reads dy, gate, up, writes dgate, dup (5 MH).
Gated, fused [gate | up] (M, 2H) (the shape given is the input's): forward 3 MH, backward 5 MH.
DyT: as elementwise, plus the (N,) parameters.
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, elems, esize

SHAPES = ((8192, 4096),)
FUSED_SHAPES = ((8192, 8192),)  # one [gate | up] input of a 4096-wide gated unit


def _x(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device),)


def _gate_up(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def _dyt_args(shape, dtype, device):
    n = shape[-1]
    return (torch.randn(shape, dtype=dtype, device=device), torch.full((1,), 0.5, dtype=dtype, device=device),
            torch.randn(n, dtype=dtype, device=device), torch.randn(n, dtype=dtype, device=device))


def _bytes(k):
    return lambda s, d: k * elems(s) * esize(d)


def _unary(name, fn, eager):
    return OpCase(name, _x, fn, eager, _bytes(2), _bytes(5), shapes=SHAPES)


def _halves(x):
    h = x.shape[-1] // 2
    return x[..., :h], x[..., h:]


CASES = [
    _unary("relu", tritium.relu, F.relu),
    _unary("leaky_relu", tritium.leaky_relu, F.leaky_relu),
    _unary("sigmoid", tritium.sigmoid, torch.sigmoid),
    _unary("tanh", tritium.tanh, torch.tanh),
    _unary("gelu", tritium.gelu, F.gelu),
    _unary("gelu_tanh", lambda x: tritium.gelu(x, approximate="tanh"), lambda x: F.gelu(x, approximate="tanh")),
    _unary("silu", tritium.silu, F.silu),
    _unary("mish", tritium.mish, F.mish),
    _unary("elu", tritium.elu, F.elu),
    _unary("selu", tritium.selu, F.selu),
    _unary("celu", lambda x: tritium.celu(x, alpha=0.5), lambda x: F.celu(x, alpha=0.5)),
    _unary("softplus", tritium.softplus, F.softplus),
    _unary("logsigmoid", tritium.logsigmoid, F.logsigmoid),
    _unary("hardswish", tritium.hardswish, F.hardswish),
    OpCase("swiglu", _gate_up, tritium.swiglu, lambda g, u: F.silu(g) * u, _bytes(3), _bytes(8), shapes=SHAPES,
           note="eager: silu then mul"),
    OpCase("geglu", _gate_up, tritium.geglu, lambda g, u: F.gelu(g) * u, _bytes(3), _bytes(8), shapes=SHAPES,
           note="eager: gelu then mul"),
    OpCase("swiglu_fused", _x, tritium.swiglu, lambda x: F.silu(_halves(x)[0]) * _halves(x)[1],
           _bytes(1.5), _bytes(4), shapes=FUSED_SHAPES, note="one [gate|up] input; eager: slice, silu, mul"),
    OpCase("geglu_fused", _x, tritium.geglu, lambda x: F.gelu(_halves(x)[0]) * _halves(x)[1],
           _bytes(1.5), _bytes(4), shapes=FUSED_SHAPES, note="one [gate|up] input; eager: slice, gelu, mul"),
    OpCase("dyt", _dyt_args, tritium.dyt, lambda x, a, w, b: w * torch.tanh(a * x) + b, _bytes(2), _bytes(5),
           shapes=SHAPES, note="eager: mul, tanh, mul, add"),
]
