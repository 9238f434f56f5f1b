"""``linear_small``: x (M, K) @ w (N, K)^T for the few rows of a decode step, the serving path's projections.

At a handful of rows a linear layer is a stream over its weights, so its speed is the memory bandwidth it
reaches; the CPU kernel (csrc/linear.cpp) streams the weight rows at close to the machine's read bandwidth, about
twice what BLAS's GEMV reaches here. No autograd (serving only) and no Triton kernel: on GPU the product at small
M is cuBLAS's job, so the CUDA key runs torch.matmul.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ._library import NAMESPACE, _lib

# Up to this many rows linear_small beats BLAS on every SmolLM2 projection shape (measured on 2 cores: float32
# 1.3-4x at 1-3 rows; bfloat16 1.9-3.3x at 1 row, where each further row costs it a conversion-bound pass);
# above, the product turns compute-bound and BLAS/oneDNN win.
MAX_ROWS = {torch.float32: 3, torch.float64: 3, torch.bfloat16: 1, torch.float16: 1}

_lib.define("linear_small(Tensor x, Tensor weight) -> Tensor")


@torch.library.register_fake(f"{NAMESPACE}::linear_small", lib=_lib)
def _fake(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


_lib.impl("linear_small", lambda x, weight: torch.matmul(x, weight.t()), "CUDA")
linear_small = torch.ops.tritium.linear_small


def small_rows_ok(x: Tensor, w: Tensor) -> bool:
    """True when linear_small is the faster way to compute x @ w.T (CPU, few rows, same dtype, w contiguous)."""
    return (x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS.get(x.dtype, 0)
            and w.dtype == x.dtype and w.device == x.device and w.dim() == 2 and w.is_contiguous())

__all__: List[str] = []
