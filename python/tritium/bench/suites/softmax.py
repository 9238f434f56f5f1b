"""Benchmarks of softmax / log_softmax, cross_entropy and fused linear + cross-entropy.

Bytes: softmax reads MN and writes MN (backward: reads dy, y, writes dx); cross_entropy's forward reads MN (its
fwd+bwd also writes the gradient rows once and scales them once: 4MN in all); fused linear cross-entropy is
compute-bound (2THV FLOPs forward, 6THV forward + backward) and tracks peak memory.
"""
import torch
import torch.nn.functional as F

import tritium
from tritium import reference
from tritium.bench.case import OpCase, elems, esize


def _x(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device),)


def _logits_target(shape, dtype, device):
    tokens, vocab = shape
    return (torch.randn(shape, dtype=dtype, device=device), torch.randint(0, vocab, (tokens,), device=device))


def _lm_head(shape, dtype, device):
    tokens, hidden, vocab = shape
    h = torch.randn(tokens, hidden, dtype=dtype, device=device)
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype)
    return h, w, torch.randint(0, vocab, (tokens,), device=device)


def _rowwise(k_fwd, k_fwdbwd):
    return (lambda s, d: k_fwd * elems(s) * esize(d)), (lambda s, d: k_fwdbwd * elems(s) * esize(d))


_sm_fwd, _sm_fwdbwd = _rowwise(2, 5)
_ce_fwd, _ce_fwdbwd = _rowwise(1, 4)
_SOFTMAX_SHAPES = ((4096, 32768), (8192, 4096), (64, 262144))
_CE_SHAPES = ((4096, 49152), (8192, 32000), (256, 262144))


def _flce_flops(k):
    return lambda s, d: k * 2.0 * s[0] * s[1] * s[2]


def _flce_bytes(s, d):  # hidden and weight read once (the logits never reach memory)
    return (s[0] * s[1] + s[1] * s[2]) * esize(d)


def _kl_inputs(shape, dtype, device):
    x = torch.log_softmax(torch.randn(shape, device=device), -1).to(dtype)
    return x, torch.softmax(torch.randn(shape, device=device), -1).to(dtype)


def _distill_inputs(shape, dtype, device):
    return (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device),
            torch.randint(0, shape[1], (shape[0],), device=device))


_kl_fwd, _kl_fwdbwd = _rowwise(2, 4)          # reads x, t; backward reads t, writes dx
_distill_fwd, _distill_fwdbwd = _rowwise(2, 5)  # reads s, u (both terms in one pass); + fp32 gradient row, scaled


def _eager_lm_loss(h, w, t):
    return F.cross_entropy(F.linear(h, w), t)


CASES = [
    OpCase("softmax", _x, lambda x: tritium.softmax(x, -1), lambda x: F.softmax(x, -1), _sm_fwd, _sm_fwdbwd,
           shapes=_SOFTMAX_SHAPES),
    OpCase("log_softmax", _x, lambda x: tritium.log_softmax(x, -1), lambda x: F.log_softmax(x, -1), _sm_fwd,
           _sm_fwdbwd, shapes=_SOFTMAX_SHAPES),
    OpCase("cross_entropy", _logits_target, lambda x, t: tritium.cross_entropy(x, t),
           lambda x, t: F.cross_entropy(x, t), _ce_fwd, _ce_fwdbwd, shapes=_CE_SHAPES, grad_args=(0,),
           note="shape = tokens x vocab"),
    OpCase("cross_entropy_zloss_softcap", _logits_target,
           lambda x, t: tritium.cross_entropy(x, t, z_loss=1e-4, softcap=30.0),
           lambda x, t: reference.cross_entropy(x, t, z_loss=1e-4, softcap=30.0), _ce_fwd, _ce_fwdbwd,
           shapes=_CE_SHAPES, grad_args=(0,),
           note="shape = tokens x vocab; z_loss 1e-4, softcap 30; eager: tanh cap, cross_entropy, logsumexp^2"),
    OpCase("kl_div", _kl_inputs, lambda x, t: tritium.kl_div(x, t, reduction="batchmean"),
           lambda x, t: F.kl_div(x, t, reduction="batchmean"), _kl_fwd, _kl_fwdbwd, shapes=_SOFTMAX_SHAPES,
           grad_args=(0,), note="reduction='batchmean', probability targets"),
    OpCase("distillation_loss", _distill_inputs,
           lambda s, u, t: tritium.distillation_loss(s, u, 2.0, 0.5, t),
           lambda s, u, t: reference.distillation_loss(s, u, 2.0, 0.5, t), _distill_fwd, _distill_fwdbwd,
           shapes=_CE_SHAPES, grad_args=(0,),
           note="shape = tokens x vocab; T = 2, alpha = 0.5, with hard labels; eager: log_softmax x 2 + kl_div + CE"),
    OpCase("fused_linear_cross_entropy", _lm_head, lambda h, w, t: tritium.fused_linear_cross_entropy(h, w, t),
           _eager_lm_loss, _flce_bytes, _flce_bytes, flops_fwd=_flce_flops(1), flops_fwdbwd=_flce_flops(3),
           shapes=((8192, 576, 49152),), dtypes=(torch.float32, torch.bfloat16), grad_args=(0, 1),
           track_memory=True, note="shape = tokens x hidden x vocab; eager: linear then cross_entropy"),
]
