"""Benchmarks of the losses: the elementwise table (mse, bce_with_logits, sigmoid focal, huber), the row kernel
(triplet) and the blocked InfoNCE.

Bytes: an elementwise loss's forward reads input and target (2N) and reduces in the same pass; forward + backward
also writes the input's gradient (3N: what an implementation must move; tritium's forward writes it in the pass
that reads input and target when a gradient will follow, and the backward of loss.backward() hands it on).
Triplet reads three (N, D) inputs (forward), and forward + backward also writes three gradient rows and scales them
once (the rows in float32: counted as the input dtype, the minimum an implementation must move). InfoNCE is
compute-bound: 2 N^2 D FLOPs for the similarities forward, 6 N^2 D forward + backward (eager's three matmuls; the
blocked backward recomputes the similarities, a fourth), and it tracks peak memory (eager holds the (N, N) logits
and their softmax).
"""
import torch

import tritium
import torch.nn.functional as F
from tritium import reference
from tritium.bench.case import OpCase, elems, esize


def _x_y(shape, dtype, device):
    return torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device)


def _logits_bits(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device),
            torch.randint(0, 2, shape, device=device).to(dtype))


def _triplet(shape, dtype, device):
    return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))


def _pair(shape, dtype, device):
    n, d = shape
    return torch.randn(n, d, dtype=dtype, device=device), torch.randn(n, d, dtype=dtype, device=device)


def _per_elem(k):
    return lambda s, d: k * elems(s) * esize(d)


def _nce_flops(k):
    return lambda s, d: k * 2.0 * s[0] * s[0] * s[1]


_EW_SHAPES = ((8192, 4096), (4096, 781), (1, 65537))
_ROW_SHAPES = ((8192, 1024), (4096, 781))
_NOTE_EW = "shape = rows x cols; reduction='mean'; gradient of the input"

CASES = [
    OpCase("mse_loss", _x_y, lambda x, y: tritium.mse_loss(x, y), lambda x, y: F.mse_loss(x, y), _per_elem(2),
           _per_elem(3), shapes=_EW_SHAPES, grad_args=(0,), note=_NOTE_EW),
    OpCase("huber_loss", _x_y, lambda x, y: tritium.huber_loss(x, y, delta=0.5),
           lambda x, y: F.huber_loss(x, y, delta=0.5), _per_elem(2), _per_elem(3), shapes=_EW_SHAPES,
           grad_args=(0,), note=_NOTE_EW + "; delta = 0.5"),
    OpCase("binary_cross_entropy_with_logits", _logits_bits,
           lambda x, t: tritium.binary_cross_entropy_with_logits(x, t),
           lambda x, t: F.binary_cross_entropy_with_logits(x, t), _per_elem(2), _per_elem(3), shapes=_EW_SHAPES,
           grad_args=(0,), note=_NOTE_EW),
    OpCase("sigmoid_focal_loss", _logits_bits, lambda x, t: tritium.sigmoid_focal_loss(x, t, reduction="mean"),
           lambda x, t: reference.sigmoid_focal_loss(x, t, reduction="mean"), _per_elem(2), _per_elem(3),
           shapes=_EW_SHAPES, grad_args=(0,),
           note=_NOTE_EW + "; alpha 0.25, gamma 2; eager: torchvision's formula in torch ops"),
    OpCase("triplet_margin_loss", _triplet, lambda a, p, n: tritium.triplet_margin_loss(a, p, n),
           lambda a, p, n: F.triplet_margin_loss(a, p, n), _per_elem(3), _per_elem(9), shapes=_ROW_SHAPES,
           note="shape = triplets x dim; p = 2, margin 1; gradients of all three inputs"),
    OpCase("info_nce", _pair, lambda q, k: tritium.info_nce(q, k, 0.07), lambda q, k: reference.info_nce(q, k, 0.07),
           lambda s, d: 2 * elems(s) * esize(d), lambda s, d: 4 * elems(s) * esize(d), flops_fwd=_nce_flops(1),
           flops_fwdbwd=_nce_flops(3), shapes=((8192, 512),), grad_args=(0, 1), track_memory=True,
           note="shape = N x dim; symmetric, normalised, T = 0.07; eager materialises the (N, N) logits"),
]
