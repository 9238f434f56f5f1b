"""LoRA linear layers: ``lora_linear``, a frozen base layer x W^T + bias plus a trained low-rank adapter (PEFT's
LoRA Linear; docs/lora.md):

    y = x W^T + bias + s (drop(x) A^T) B^T,    W (out, in), A (r, in), B (out, r), s = scaling (alpha / r)

drop: dropout of probability dropout_p on the adapter's input while training, drawn as a 0/1 mask
(reference.lora_dropout_mask) whose 1 / (1 - p) is folded into s, so x times the mask is exact in any dtype.

The forward op returns y and xs = s drop(x) A^T (tokens, r), which the backward reuses; the backward computes dx,
dA and dB only (the base weight and bias are frozen). The low-rank term takes no pass of its own over the (tokens,
out) output: on CPU (csrc/lora.cpp) it joins the base GEMM through concatenated operands or a beta = 1 GEMM into the
output, on GPU (kernels/lora.py) it is the matmul's epilogue.

The kernels take x, weight, bias, lora_A and lora_B of one floating dtype on one device, a base weight and bias
that need no gradient; anything else (mixed dtypes, as PEFT's float32 adapters on a bfloat16 base; a trainable base;
empty x; TRITIUM_BACKEND=reference) goes explicitly to ``tritium.reference``. Quantized (int8/int4) base weights
are not supported yet.

QLoRA: an NF4 base (``weight`` a tritium.ops.nf4.NF4Weight, bitsandbytes' layout) takes ``_qlora``: the base
product is the nf4_linear op (W dequantised in the kernel, dx = dy W), the adapter ATen's products, added into the
base output by one addmm (beta = 1), the gradients of x, A and B by autograd.
"""
from __future__ import annotations

import numbers
from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ._library import define_op, kernel_ok, unit_last


# ---- fake kernels: shapes only ----
def _fake_fwd(x, weight, bias, lora_A, lora_B, mask, scaling):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


def _fake_bwd(dy, x, weight, lora_A, lora_B, mask, xs, scaling, need_dx):
    return (x.new_empty(x.shape if need_dx else (0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape))


# ---- the backward op, the autograd formula, the forward op ----
lora_linear_bwd = define_op(
    "lora_linear_bwd(Tensor dy, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? mask, Tensor xs,"
    " float scaling, bool need_dx) -> (Tensor, Tensor, Tensor)", _fake_bwd, "lora:lora_linear_bwd")


def _setup(ctx, inputs, output):
    x, weight, _, lora_A, lora_B, mask, scaling = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, mask, output[1])
    ctx.scaling = scaling


def _backward(ctx, dy, _dxs):
    x, weight, lora_A, lora_B, mask, xs = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB = lora_linear_bwd(unit_last(dy), x, weight, lora_A, lora_B, mask, xs, ctx.scaling, need[0])
    return dx if need[0] else None, None, None, dA if need[3] else None, dB if need[4] else None, None, None


lora_linear_fwd = define_op(
    "lora_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? mask,"
    " float scaling) -> (Tensor, Tensor)", _fake_fwd, "lora:lora_linear_fwd", backward=_backward,
    setup_context=_setup)


# ---- validation ----
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _qlora(fn: str, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training) -> Tensor:
    """lora_linear on an NF4 base (module docstring): nf4_linear(x, W, bias) + s (drop(x) A^T) B^T, the adapter in
    its own dtype (x cast to lora_A's first, as PEFT's), the sum in x's dtype."""
    from .nf4 import nf4_linear

    out_f, in_f = weight.shape
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"{fn}: lora_A must be (r, in_features) = (r >= 1, {in_f}), got shape {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"{fn}: lora_B must be (out_features, r) = ({out_f}, {r}), got shape {_shape(lora_B)}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"{fn}: lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{fn}: scaling must be a real number, got {type(scaling).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")
    y = nf4_linear(x, weight, bias)            # checks x and bias against the weight
    s = float(scaling)
    xa = x
    if training and dropout_p > 0.0:
        xa = x * reference.lora_dropout_mask(x, dropout_p)
        s /= 1.0 - dropout_p
    xs = torch.nn.functional.linear(xa.to(lora_A.dtype), lora_A) * s
    if lora_A.dtype != x.dtype:
        return y + torch.nn.functional.linear(xs, lora_B).to(x.dtype)
    y2 = torch.addmm(y.reshape(-1, out_f), xs.reshape(-1, r), lora_B.t())
    return y2.view(y.shape)


def _check(fn: str, x, weight, bias, lora_A, lora_B, scaling, dropout_p) -> None:
    from .quant import QuantizedWeight

    if isinstance(weight, QuantizedWeight) or (isinstance(weight, Tensor) and not weight.is_floating_point()):
        what = repr(weight) if isinstance(weight, QuantizedWeight) else f"a {weight.dtype} tensor"
        raise NotImplementedError(f"{fn}: weight: a quantized (int8/int4) base weight is not supported yet, got "
                                  f"{what}; pass the float (float32/bfloat16/float16) weight or an NF4 one "
                                  f"(tritium.quantize_nf4)")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be (out_features, in_features), got shape {_shape(weight)}")
    out_f, in_f = weight.shape
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"{fn}: x must be (*, in_features) = (*, {in_f}), got shape {_shape(x)}")
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"{fn}: lora_A must be (r, in_features) = (r >= 1, {in_f}), got shape {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"{fn}: lora_B must be (out_features, r) = ({out_f}, {r}), got shape {_shape(lora_B)}")
    if bias is not None and not (isinstance(bias, Tensor) and tuple(bias.shape) == (out_f,)):
        raise ValueError(f"{fn}: bias must be (out_features,) = ({out_f},) or None, got shape {_shape(bias)}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{fn}: scaling must be a real number, got {type(scaling).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                dropout_p: float = 0.0, training: bool = True) -> Tensor:
    """PEFT's LoRA Linear as a function: x (*, in) W^T + bias + scaling (dropout(x) A^T) B^T -> (*, out) in x's
    dtype. weight (out, in) and bias (out,) or None: the frozen base layer; lora_A (r, in), lora_B (out, r): the
    adapter; scaling: alpha / r (PEFT's); dropout_p: the dropout on the adapter's input, applied while training
    (the mask drawn from torch's generator by reference.lora_dropout_mask). Differentiable w.r.t. x, lora_A and
    lora_B through the fused kernels; a weight or bias that requires grad goes to tritium.reference (which
    differentiates everything). An NF4 base (tritium.quantize_nf4: QLoRA) goes through nf4_linear; int8/int4
base weights raise NotImplementedError."""
    fn = "lora_linear"
    from .nf4 import NF4Weight

    if isinstance(weight, NF4Weight):
        return _qlora(fn, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    _check(fn, x, weight, bias, lora_A, lora_B, scaling, dropout_p)
    present = [bias] if bias is not None else []
    frozen = not (torch.is_grad_enabled() and any(t.requires_grad for t in (weight, *present)))
    if not kernel_ok(x, weight, lora_A, lora_B, *present) or not frozen:
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
    mask = None
    s = float(scaling)
    if training and dropout_p > 0.0:
        mask = reference.lora_dropout_mask(x, dropout_p).reshape(-1, x.shape[-1])
        s /= 1.0 - dropout_p
    y, _ = lora_linear_fwd(unit_last(x.reshape(-1, x.shape[-1])), weight, bias, lora_A, lora_B, mask, s)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__: List[str] = ["lora_linear"]
