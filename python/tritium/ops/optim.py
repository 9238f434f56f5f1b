"""Fused optimizer steps: ``adamw_step_`` and ``sgd_step_``, each one kernel over a list of tensors of one dtype.

The ops update params and optimizer state in place (declared in the schemas: ``Tensor(a!)[] params``, ...); their
arguments are torch.optim's (torch/optim/adam.py, sgd.py: the lists its optimizers build per param group) plus
``params16``: with master weights, params are float32 copies, grads the 16-bit model's gradients and params16 the
16-bit model params, which receive each updated value rounded to nearest. ``tritium.optim.AdamW`` / ``SGD`` are
the optimizers built on them; ``adamw_group_`` / ``sgd_group_`` below are their one entry point, which sends a
group the kernels do not cover (a dtype, a device, a layout, the reference backend) to ``tritium.reference``.

Kernels: C++ (csrc/optim.cpp) on CPU, Triton (kernels/optim.py) on CUDA. The step counters are tensors (as in
torch.optim's state); the ops increment them, and read them on the host on CPU, in the kernel on CUDA.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from .._backend import use_reference
from ._library import HALF_DTYPES, SUPPORTED_DTYPES, define_op



def _fake_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, params16, lr_tensor, lr, beta1,
                beta2, weight_decay, eps, maximize):
    return None


def _fake_sgd(params, grads, momentum_buffers, params16, lr_tensor, lr, weight_decay, momentum, dampening, nesterov,
              maximize, is_first_step):
    return None


adamw_step_ = define_op(
    "adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs,"
    " Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, Tensor(f!)[] params16, Tensor? lr_tensor, float lr,"
    " float beta1, float beta2, float weight_decay, float eps, bool maximize) -> ()",
    _fake_adamw, "optim:adamw_step_")
sgd_step_ = define_op(
    "sgd_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] params16,"
    " Tensor? lr_tensor, float lr, float weight_decay, float momentum, float dampening, bool nesterov,"
    " bool maximize, bool is_first_step) -> ()",
    _fake_sgd, "optim:sgd_step_")


def _dense(t: Tensor) -> bool:
    """t's elements fill its storage span with no gaps or overlaps, in some order of its dims (contiguous,
    channels-last, a transposed matrix): then a flat index over the span addresses each element once."""
    if t.is_contiguous():
        return True
    expected = 1
    for d in sorted(range(t.dim()), key=lambda d: (t.stride(d), t.shape[d])):
        if t.shape[d] != 1 and t.stride(d) != expected:
            return False
        expected *= t.shape[d]
    return True


def _covered(params: List[Tensor], grads: List[Tensor], same_layout: List[List[Tensor]], params16: List[Tensor],
             lr_tensor: Optional[Tensor]) -> bool:
    """True when the kernels take the group: the backend is not the reference, params share a dtype the kernels
    implement (float64 on CPU only) and a cpu/cuda device, grads are params' dtype (or, with params16, float32
    params with 16-bit grads and params16 of the grads' dtype), and every tensor is densely stored with its
    param's shape and strides (one flat index addresses the same element of each)."""
    if use_reference() or not params:
        return False
    p0, g0 = params[0], grads[0]
    dev, dt = p0.device, p0.dtype
    if dev.type not in ("cpu", "cuda") or dt not in SUPPORTED_DTYPES or (dev.type == "cuda" and dt == torch.float64):
        return False
    if params16:
        if dt != torch.float32 or g0.dtype not in HALF_DTYPES:
            return False
    elif g0.dtype != dt:
        return False
    if lr_tensor is not None and (lr_tensor.numel() != 1 or lr_tensor.device != dev):
        return False
    for i, p in enumerate(params):
        if p.dtype != dt or p.device != dev or not _dense(p):
            return False
        for lst in [grads] + same_layout + ([params16] if params16 else []):
            t = lst[i]
            if t.device != dev or t.shape != p.shape or t.stride() != p.stride():
                return False
        if grads[i].dtype != g0.dtype or (params16 and params16[i].dtype != g0.dtype):
            return False
        if any(lst[i].dtype != dt for lst in same_layout):
            return False
    return True


def adamw_group_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
                 max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], params16: List[Tensor],
                 lr, beta1: float, beta2: float, weight_decay: float, eps: float, maximize: bool) -> None:
    """One AdamW step over a group of params of one dtype and device, in place (torch.optim.AdamW's math). lr: a
    float or a one-element tensor (read when the step runs). max_exp_avg_sqs: empty unless amsgrad. params16:
    empty, or the 16-bit model params of float32 master params (see the module doc)."""
    lr_tensor, lr_f = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
    if _covered(params, grads, [exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs else []), params16,
                lr_tensor) and all(s.device == params[0].device or params[0].device.type == "cpu"
                                   for s in state_steps):
        adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, params16, lr_tensor, lr_f,
                    float(beta1), float(beta2), float(weight_decay), float(eps), bool(maximize))
    else:
        reference.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, params16, lr_tensor,
                              lr_f, float(beta1), float(beta2), float(weight_decay), float(eps), bool(maximize))


def sgd_group_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], params16: List[Tensor],
               lr, weight_decay: float, momentum: float, dampening: float, nesterov: bool, maximize: bool,
               is_first_step: bool) -> None:
    """One SGD step over a group of params of one dtype and device, in place (torch.optim.SGD's math).
    momentum_buffers: one per param when momentum != 0 (else empty); is_first_step: the buffers are new and get
    the gradient (torch.optim's first step). lr, params16: as in adamw_group_."""
    lr_tensor, lr_f = (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))
    if _covered(params, grads, [momentum_buffers] if momentum_buffers else [], params16, lr_tensor):
        sgd_step_(params, grads, momentum_buffers, params16, lr_tensor, lr_f, float(weight_decay), float(momentum),
                  float(dampening), bool(nesterov), bool(maximize), bool(is_first_step))
    else:
        reference.sgd_step_(params, grads, momentum_buffers, params16, lr_tensor, lr_f, float(weight_decay),
                            float(momentum), float(dampening), bool(nesterov), bool(maximize), bool(is_first_step))


# The optimizers (tritium.optim) are the public API; the functional group steps are not drop-ins of a
# torch.nn.functional call, so they stay out of tritium's namespace.
__all__: List[str] = []
