"""Benchmark of tritium.moe (a dropless top-k mixture of SwiGLU experts) against the usual eager loop over experts
(tritium.reference.moe: torch.where over the top-k indices per expert, the expert's MLP on its tokens, index_add_
back), at issue 23's shape: shape = tokens x dim x ffn x experts x top_k, softmax router, renormalised, the
load-balancing and z losses computed by both. Gradients of x, the router and both expert weights.

Compute-bound: the experts' three GEMMs over the tokens k rows, 2 R D (2F) + 2 R F D = 6 R D F FLOPs forward
(R = tokens k), twice that more in the backward (each product's input and weight gradients); the router's
2 T D E is negligible.
"""
import torch

import tritium
from tritium import reference
from tritium.bench.case import OpCase, esize


def _args(shape, dtype, device):
    T, D, F, E, k = shape
    x = torch.randn(T, D, device=device).to(dtype)
    rw = (torch.randn(E, D, device=device) / D ** 0.5).to(dtype)
    w13 = (torch.randn(E, 2 * F, D, device=device) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, F, device=device) / F ** 0.5).to(dtype)
    return x, rw, w13, w2, k


def _tritium(x, rw, w13, w2, k):
    return tuple(tritium.moe(x, rw, w13, w2, k))


def _eager(x, rw, w13, w2, k):
    return reference.moe(x, rw, w13, w2, k)


def _flops(fwdbwd):
    def f(s, d):
        T, D, F, E, k = s
        return (3 if fwdbwd else 1) * 6.0 * T * k * D * F
    return f


def _bytes(fwdbwd):
    def f(s, d):   # x read k times, the expert weights once, y written; the backward again, plus the gradients
        T, D, F, E, k = s
        once = T * k * D + 3 * E * D * F + T * D
        return (3 if fwdbwd else 1) * once * esize(d)
    return f


CASES = [
    OpCase("moe", _args, _tritium, _eager, _bytes(False), _bytes(True), flops_fwd=_flops(False),
           flops_fwdbwd=_flops(True), shapes=((4096, 576, 1536, 8, 2),), grad_args=(0, 1, 2, 3),
           note="shape = tokens x dim x ffn x experts x top_k; softmax router, renormalised top-k, with the "
                "load-balancing and z losses; eager: the loop over experts (torch.where, index_add_)"),
]
