"""Benchmark of tritium.linear (the drop-in for F.linear) against F.linear itself, eager and torch.compile'd, over a
grid of training-size products: shape = rows x in x out, bias on, gradients of the input, weight and bias.

The grid spans the cases tritium.linear's rule (ops/linear.py: linear_plan, the "linear" route of ops/_library.py)
decides between: small or narrow products that go to F.linear whole (a few rows, a width of 2 or 4, 32 x 96: the
panels' padding), mid-size ones, and the many-row products whose forward and input gradient run on the panel GEMM
(csrc/panel.h). bfloat16 runs F.linear on both sides (tritium.linear's panels are float32 / float64): those rows
show the drop-in's own call overhead.

Compute-bound: 2 M K N FLOPs forward, 6 M K N forward + backward (the input and weight gradients).
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, esize


def _args(shape, dtype, device):
    M, K, N = shape
    x = torch.randn(M, K, device=device).to(dtype)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    return x, w, b


def _flops(fwdbwd):
    def f(s, d):
        M, K, N = s
        return (3 if fwdbwd else 1) * 2.0 * M * K * N
    return f


def _bytes(fwdbwd):
    def f(s, d):   # x, W read and y written; the backward reads dy, x and W again and writes dx and dW
        M, K, N = s
        return ((3 * M * K + 3 * N * K + 2 * M * N) if fwdbwd else (M * K + N * K + M * N)) * esize(d)
    return f


# the first (headline) shape: many rows at a mid width, where the panels' forward and input gradient win
SHAPES = ((4096, 256, 128), (64, 64, 64), (256, 2, 128), (256, 128, 4), (256, 128, 128), (512, 256, 256),
          (512, 512, 1024), (2048, 256, 256), (2048, 512, 512), (4096, 64, 64), (4096, 32, 96), (4096, 1024, 1024),
          (8192, 576, 1536))

CASES = [
    OpCase("linear", _args, tritium.linear, F.linear, _bytes(False), _bytes(True), flops_fwd=_flops(False),
           flops_fwdbwd=_flops(True), shapes=SHAPES,
           note="shape = rows x in x out, bias; tritium.linear vs F.linear (bfloat16: F.linear on both sides)"),
]
