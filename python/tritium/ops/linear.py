"""``linear_small``: x (M, K) @ w (N, K)^T on CPU without BLAS, the serving path's projections.

A decode step's product is a stream over the weights, and on this shape BLAS repacks the whole weight matrix on
every call; the CPU kernel (csrc/linear.cpp) reads the weights in their own (N, K) layout in register tiles of
4 x 4 rows with the next tiles prefetched, so the weight stream and the FMAs overlap. Measured on the 2-core CPU
(SmolLM2-135M's projections and head, float32, weights cold as in a real step) it is 2.9x / 2.6x / 1.8x faster
than MKL at 1 / 16 / 64 rows and still 1.1x at a 512-token prompt, so float32 uses it at every row count.
16-bit weights use it for one row only: from two rows on, oneDNN's packed AVX512-BF16 kernels win (they
multiply in bf16; this kernel converts every weight vector to float). No autograd (serving only) and no Triton
kernel: on GPU the product is cuBLAS's job, so the CUDA key runs torch.matmul.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ._library import NAMESPACE, _lib

# Row counts up to which linear_small is the faster way on CPU (None: any; measured as above).
MAX_ROWS = {torch.float32: None, torch.float64: 3, torch.bfloat16: 1, torch.float16: 1}

_lib.define("linear_small(Tensor x, Tensor weight) -> Tensor")


@torch.library.register_fake(f"{NAMESPACE}::linear_small", lib=_lib)
def _fake(x, weight):
    return x.new_empty((x.shape[0], weight.shape[0]))


_lib.impl("linear_small", lambda x, weight: torch.matmul(x, weight.t()), "CUDA")
linear_small = torch.ops.tritium.linear_small


_lib.define("mm_pooled(Tensor a, Tensor b, Tensor? bias=None) -> Tensor")


@torch.library.register_fake(f"{NAMESPACE}::mm_pooled", lib=_lib)
def _fake_mm(a, b, bias=None):
    return a.new_empty((a.shape[0], b.shape[1]))


# CUDA: torch's caching allocator already reuses blocks
_lib.impl("mm_pooled", lambda a, b, bias=None: torch.mm(a, b) if bias is None else torch.addmm(bias, a, b), "CUDA")
mm_pooled = torch.ops.tritium.mm_pooled
"""a @ b (+ bias) into an output from tritium's CPU pool (no fresh pages per call); no autograd of its own."""


# Packed weights (csrc/panel.h): pack_linear(w) once, then linear_packed(x, packed, N) per call. CPU only (the
# serving path packs at load; on GPU there is nothing to pack for).
_lib.define("pack_linear(Tensor weight) -> Tensor")
_lib.define("linear_packed(Tensor x, Tensor packed, int n, Tensor? bias=None) -> Tensor")


@torch.library.register_fake(f"{NAMESPACE}::pack_linear", lib=_lib)
def _fake_pack(weight):
    p = 64 if weight.dtype == torch.float32 else 32
    return weight.new_empty((-(-weight.shape[0] // p), weight.shape[1], p))


@torch.library.register_fake(f"{NAMESPACE}::linear_packed", lib=_lib)
def _fake_linear_packed(x, packed, n, bias=None):
    return x.new_empty((x.shape[0], n))


pack_linear = torch.ops.tritium.pack_linear
linear_packed = torch.ops.tritium.linear_packed


def small_rows_ok(x: Tensor, w: Tensor) -> bool:
    """True when linear_small is the faster way to compute x @ w.T (CPU, few rows, same dtype, w contiguous)."""
    if x.dtype not in MAX_ROWS:
        return False
    limit = MAX_ROWS[x.dtype]
    return (x.device.type == "cpu" and x.dim() == 2 and 0 < x.shape[0] and (limit is None or x.shape[0] <= limit)
            and w.dtype == x.dtype and w.device == x.device and w.dim() == 2 and w.is_contiguous())

__all__: List[str] = []
