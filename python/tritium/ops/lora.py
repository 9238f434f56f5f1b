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
empty x; TRITIUM_BACKEND=reference) goes explicitly to ``tritium.reference``.

A quantized frozen base takes ``_on_frozen_base``, one path for every kind (``FROZEN_BASES``): an NF4 weight
(tritium.ops.nf4.NF4Weight, bitsandbytes' layout: QLoRA) through the nf4_linear op, an int8/int4 one
(tritium.ops.quant.QuantizedWeight) through the quantized linear op with float activations (quantized_linear);
both read the stored bytes in the kernel and give dx = dy W. The adapter is ATen's products, added into the base
output by one addmm (beta = 1), the gradients of x, A and B by autograd. From the row count where the base's own
product would dequantise the weight anyway (the weight's ``gemm_rows``: a training step's or a prefill's tokens,
where the product is compute-bound), the base is instead dequantised once per call into a scratch weight in x's
dtype and the fused ops above run on it (``lora_dequant_fwd`` / ``lora_dequant_bwd``; the backward dequantises
again rather than keeping the float weight). ``quantize_frozen`` makes such a base from a float weight.
"""
from __future__ import annotations

import numbers
from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ..utils import register_cpu_path
from ._library import CPU, call_op, define_op, kernel_ok, unit_last


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


# ---- a quantized frozen base dequantised per call (the fused ops above on it) ----
# The base's tensors q0, q1, q2 (q2 optional) and ints meta = [kind, *the kind's ints]: NF4 (NF4Weight.lora_parts:
# the bytes, the float32 absmax; n, k, blocksize), int8/int4 (QuantizedWeight.lora_parts: qdata, scales, mins; bits,
# group, n, k). The backward dequantises again rather than keeping the float weight from the forward, so a model on
# quantized bases holds no float copy of its weights between the passes (QLoRA's point; bitsandbytes does the same).
_NF4, _QUANT = 0, 1


def _dequantized(q0, q1, q2, meta, dtype) -> Tensor:
    if meta[0] == _NF4:
        n, k, blocksize = meta[1:]
        return torch.ops.tritium.nf4_dequantize(q0, q1, n, k, blocksize, dtype)
    bits, group, n, k = meta[1:]
    return torch.ops.tritium.quant_dequantize(q0, q1, q2, bits, group, n, k, dtype)


def _dequant_fwd(x, q0, q1, q2, meta, bias, lora_A, lora_B, mask, scaling):
    return lora_linear_fwd(x, _dequantized(q0, q1, q2, meta, x.dtype), bias, lora_A, lora_B, mask, scaling)


def _dequant_bwd(dy, x, q0, q1, q2, meta, lora_A, lora_B, mask, xs, scaling, need_dx):
    return lora_linear_bwd(dy, x, _dequantized(q0, q1, q2, meta, x.dtype), lora_A, lora_B, mask, xs, scaling,
                           need_dx)


def _fake_dequant_fwd(x, q0, q1, q2, meta, bias, lora_A, lora_B, mask, scaling):
    return x.new_empty((x.shape[0], lora_B.shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]))


def _fake_dequant_bwd(dy, x, q0, q1, q2, meta, lora_A, lora_B, mask, xs, scaling, need_dx):
    return (x.new_empty(x.shape if need_dx else (0,)), lora_A.new_empty(lora_A.shape),
            lora_B.new_empty(lora_B.shape))


_Q = "Tensor q0, Tensor q1, Tensor? q2, int[] meta"
lora_dequant_bwd = define_op(
    f"lora_dequant_bwd(Tensor dy, Tensor x, {_Q}, Tensor lora_A, Tensor lora_B, Tensor? mask, Tensor xs,"
    " float scaling, bool need_dx) -> (Tensor, Tensor, Tensor)", _fake_dequant_bwd, composite=_dequant_bwd)


def _dequant_setup(ctx, inputs, output):
    x, q0, q1, q2, meta, _, lora_A, lora_B, mask, scaling = inputs
    ctx.save_for_backward(x, q0, q1, q2, lora_A, lora_B, mask, output[1])
    ctx.meta, ctx.scaling = meta, scaling


def _dequant_backward(ctx, dy, _dxs):
    x, q0, q1, q2, lora_A, lora_B, mask, xs = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB = lora_dequant_bwd(unit_last(dy), x, q0, q1, q2, ctx.meta, lora_A, lora_B, mask, xs, ctx.scaling,
                                  need[0])
    return (dx if need[0] else None, None, None, None, None, None, dA if need[6] else None, dB if need[7] else None,
            None, None)


lora_dequant_fwd = define_op(
    f"lora_dequant_fwd(Tensor x, {_Q}, Tensor? bias, Tensor lora_A, Tensor lora_B, Tensor? mask, float scaling)"
    " -> (Tensor, Tensor)", _fake_dequant_fwd, composite=_dequant_fwd, backward=_dequant_backward,
    setup_context=_dequant_setup)


def _dequant_path() -> str:
    from .quant import bf16_tiles

    tiles = bf16_tiles(torch.bfloat16, 4, 32, 0)
    return ("the base's quantized product below its gemm_rows (32 rows" +
            ("; 384 for bfloat16 x on 4-bit weights, the exact bfloat16 tiles" if tiles else "") +
            "), the fused ops on the weight dequantised per call from there")


register_cpu_path("lora_linear.quantized_base", _dequant_path)


# ---- validation ----
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _frozen_bases() -> dict:
    """The quantized frozen bases lora_linear takes, by the weight's type: the base product (x, weight, bias) ->
    x W^T + bias, differentiable in x (and bias), the weight frozen; its argument checks (x, weight, bias) -> (n, k)
    (errors naming the base product); the kind's code in the dequantised route's meta."""
    from .nf4 import NF4Weight, check_nf4_linear, nf4_linear
    from .quant import QuantizedWeight, check_quantized_linear, quantized_linear

    return {NF4Weight: (nf4_linear, check_nf4_linear, _NF4),
            QuantizedWeight: (quantized_linear, check_quantized_linear, _QUANT)}


FROZEN_BASES = ("nf4", "int8", "int4")   # quantize_frozen's kinds


def frozen_linear(x: Tensor, weight, bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + bias for a quantized frozen base (an NF4Weight or QuantizedWeight: its linear op) or a float weight
    (torch): the base layer alone, e.g. a projection whose adapters are not there."""
    base = _frozen_bases().get(type(weight))
    return torch.nn.functional.linear(x, weight, bias) if base is None else base[0](x, weight, bias)


def quantize_frozen(fn: str, weight: Tensor, quantize: str, blocksize: int = 64, double_quant: bool = False,
                    group_size: Optional[int] = None):
    """A float base weight (out, in) quantized for LoRA on a frozen base: "nf4" an NF4Weight (tritium.quantize_nf4:
    blocksize, double_quant), "int8" a QuantizedWeight per output channel (group_size None) or per group, "int4"
    one per group of group_size (default 32) (QuantizedWeight.quantize). ValueError naming ``fn`` for a kind not
    in FROZEN_BASES or a group_size that is not a positive multiple of 32 dividing in_features."""
    from .nf4 import quantize_nf4
    from .quant import BLOCK, QuantizedWeight

    if quantize not in FROZEN_BASES:
        raise ValueError(f"{fn}: quantize must be one of {FROZEN_BASES}, got {quantize!r}")
    if quantize == "nf4":
        return quantize_nf4(weight, blocksize, double_quant)
    in_f = weight.shape[-1]
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % BLOCK:
            raise ValueError(f"{fn}: group_size must be a positive multiple of {BLOCK} (or None), got {group_size!r}")
        if in_f % group_size:
            raise ValueError(f"{fn}: group_size {group_size} does not divide in_features {in_f} (each row must be "
                             f"whole groups)")
    elif quantize == "int4" and in_f % BLOCK:
        raise ValueError(f"{fn}: int4 groups {BLOCK} elements by default, which does not divide in_features {in_f}; "
                         f"int8 (per channel) takes any in_features")
    return QuantizedWeight.quantize(weight.detach(), quantize, group_size)


def _on_frozen_base(fn: str, kind, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training) -> Tensor:
    """lora_linear on a quantized frozen base (module docstring): base(x, W, bias) + s (drop(x) A^T) B^T, the
    adapter in its own dtype (x cast to lora_A's first, as PEFT's), the sum in x's dtype. From the row count where
    the base's own product dequantises the weight (its gemm_rows: the product is compute-bound there), the fused
    float-base ops on the weight dequantised per call (lora_dequant_fwd), when x, the adapter and the bias share one
    dtype on the CPU; below it the base's product reads the stored bytes in the kernel."""
    base, check, code = kind
    for name, t in (("x", x), ("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got "
                            f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
    if lora_B.dtype != lora_A.dtype:
        raise TypeError(f"{fn}: lora_B must have lora_A's dtype {lora_A.dtype}, got {lora_B.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"{fn}: scaling must be a real number, got {type(scaling).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p!r}")
    out_f, in_f = check(x, weight, bias)     # the weight, and x and bias against it
    if lora_A.dim() != 2 or lora_A.shape[1] != in_f or lora_A.shape[0] < 1:
        raise ValueError(f"{fn}: lora_A must be (r, in_features) = (r >= 1, {in_f}), got shape {_shape(lora_A)}")
    r = lora_A.shape[0]
    if lora_B.dim() != 2 or tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"{fn}: lora_B must be (out_features, r) = ({out_f}, {r}), got shape {_shape(lora_B)}")
    s = float(scaling)
    present = [bias] if bias is not None else []
    rows = x.numel() // in_f
    frozen_bias = not (torch.is_grad_enabled() and bias is not None and bias.requires_grad)
    if (x.device == CPU and x.dtype != torch.float64 and kernel_ok(x, lora_A, lora_B, *present)
            and frozen_bias and rows >= weight.gemm_rows(x.dtype)):
        x2 = unit_last(x.reshape(-1, in_f))
        mask = None
        if training and dropout_p > 0.0:
            mask = reference.lora_dropout_mask(x, dropout_p).reshape(-1, in_f)
            s /= 1.0 - dropout_p
        q0, q1, q2, meta = weight.lora_parts()
        y, _ = call_op(lora_dequant_fwd, x2, q0, q1, q2, [code, *meta], bias, lora_A, lora_B, mask, s)
        return y.view(*x.shape[:-1], out_f)
    y = base(x, weight, bias)
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
    if isinstance(weight, Tensor) and not weight.is_floating_point():
        raise TypeError(f"{fn}: weight must be a floating-point tensor or a quantized weight, got a {weight.dtype} "
                        f"tensor; pass the float (float32/bfloat16/float16) weight, an NF4 one "
                        f"(tritium.quantize_nf4) or an int8/int4 one (tritium.ops.quant.QuantizedWeight.quantize)")
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
    differentiates everything). A quantized frozen base (module docstring) goes through its own linear op: an NF4
    weight (tritium.quantize_nf4: QLoRA) through nf4_linear, an int8/int4 tritium.ops.quant.QuantizedWeight through
    the quantized linear op with float activations."""
    fn = "lora_linear"
    kind = _frozen_bases().get(type(weight))
    if kind is not None:
        return _on_frozen_base(fn, kind, x, weight, bias, lora_A, lora_B, scaling, dropout_p, training)
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
    y, _ = call_op(lora_linear_fwd, unit_last(x.reshape(-1, x.shape[-1])), weight, bias, lora_A, lora_B, mask, s)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__: List[str] = ["lora_linear"]
