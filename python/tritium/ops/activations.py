"""Activations, gated units (GLU, SwiGLU, GeGLU), DyT and PReLU: schemas, fake kernels, autograd and the
public functions.

One table drives: ``ACTIVATIONS`` lists every elementwise activation once (its op name, the torch function
it is a drop-in for, how the public arguments map to the kernel's three float parameters, whether torch has
an ``inplace=`` variant). A single loop defines, for each row, ``tritium::<name>_fwd(x, a, b, c)``,
the in-place ``<name>_fwd_`` and ``<name>_bwd(dy, x, a, b, c)``; the C++ kernels (csrc/activations.cpp, one
templated loop over a functor per row) and the Triton kernels (kernels/activations.py, one kernel with an
``ACT`` selector) register for the same names. ``GATES`` does the same for the gated units.

Whatever the kernels do not cover (integer or complex dtypes, empty tensors, broadcasting between gate and
up, a layout that would need a hidden copy, in-place calls whose input requires grad) goes explicitly to
``tritium.reference``, i.e. to torch itself, so results, autograd semantics and error messages are torch's.
"""
from __future__ import annotations

import functools

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import Tensor

from .. import reference
from ._library import HALF_DTYPES, acc_dtype, call_op, define_op, kernel_ok, routed, rows, unit_last

# SELU's constants (torch's)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class Activation:
    name: str        # op name: tritium::<name>_fwd / _fwd_ / _bwd; the C++ functor and Triton ACT id share it
    inplace: bool    # torch has an inplace= variant (the in-place op writes into the input)
    doc: str


# The elementwise table. Parameters (a, b, c) per row: see each public function below.
ACTIVATIONS: List[Activation] = [
    Activation("relu", True, "max(x, 0)"),
    Activation("leaky_relu", True, "x > 0 ? x : a x   (a = negative_slope)"),
    Activation("elu", True, "x > 0 ? b x : a expm1(c x)   (elu, selu, celu: a = alpha*scale, b = scale, "
                            "c = input_scale)"),
    Activation("sigmoid", False, "1 / (1 + exp(-x))"),
    Activation("tanh", False, "tanh(x)"),
    Activation("softplus", False, "a x > b ? x : log1p(exp(a x)) / a   (a = beta, b = threshold)"),
    Activation("gelu", False, "x Phi(x) = x/2 (1 + erf(x / sqrt 2))"),
    Activation("gelu_tanh", False, "x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"),
    Activation("silu", True, "x sigmoid(x)"),
    Activation("mish", True, "x tanh(softplus(x))"),
    Activation("logsigmoid", False, "min(x, 0) - log1p(exp(-|x|))"),
    Activation("hardswish", True, "x relu6(x + 3) / 6"),
    Activation("swish", False, "x sigmoid(a x)   (a = beta)"),
]
ACT_NAMES = [a.name for a in ACTIVATIONS]

# Gated units y = f(gate) * up: op name -> the gate function's activation.
GATES: Dict[str, str] = {"glu": "sigmoid", "swiglu": "silu", "geglu": "gelu", "geglu_tanh": "gelu_tanh"}

# Layouts of the gated ops: x is the gate and `up` a separate tensor, or x holds both halves along its last
# dim: [gate | up] (a fused gate+up projection) or [up | gate] (F.glu gates the second half).
LAYOUT_SEPARATE, LAYOUT_GATE_UP, LAYOUT_UP_GATE = 0, 1, 2


# ---- fake kernels: shapes only ----
def _fake_fwd(x, a, b, c):
    return x.new_empty(x.shape)


def _fake_fwd_(x, a, b, c):
    return None


def _fake_bwd(dy, x, a, b, c):
    return x.new_empty(x.shape)


def _gated_out_cols(x, layout):
    return x.shape[1] if layout == LAYOUT_SEPARATE else x.shape[1] // 2


def _fake_gated_fwd(x, up, layout):
    return x.new_empty((x.shape[0], _gated_out_cols(x, layout)))


def _fake_gated_bwd(dy, x, up, layout):
    if layout == LAYOUT_SEPARATE:
        return x.new_empty(x.shape), x.new_empty(x.shape)
    return x.new_empty(x.shape), x.new_empty((0,))


def _fake_dyt_fwd(x, alpha, weight, bias):
    return x.new_empty(x.shape)


def _fake_dyt_bwd(dy, x, alpha, weight, need_dalpha, need_dw, need_db):
    n = x.shape[1]
    return (x.new_empty(x.shape), x.new_empty((1 if need_dalpha else 0,)), x.new_empty((n if need_dw else 0,)),
            x.new_empty((n if need_db else 0,)))


def _fake_prelu_fwd(x, weight, per_row):
    return x.new_empty(x.shape)


def _fake_prelu_bwd(dy, x, weight, per_row, need_dw):
    return x.new_empty(x.shape), x.new_empty((weight.numel() if need_dw else 0,))


# Activations whose derivative is a function of their output, with torch's backward from it (dy y (1 - y),
# dy (1 - y^2)). A 16-bit input on the CPU saves the output and takes that backward: there recomputing f from x
# costs more vector work than the bytes the backward reads (the conversions of two 16-bit inputs and the
# exponential), while the output's backward reads the same bytes and does three products. Its error is torch's own
# (the 2x rule's reference point); float32 and float64, bound by memory either way, recompute from x.
FROM_OUTPUT = {"sigmoid": torch.ops.aten.sigmoid_backward, "tanh": torch.ops.aten.tanh_backward}


def _from_output(name: str, x: Tensor) -> bool:
    return name in FROM_OUTPUT and x.device.type == "cpu" and x.dtype in HALF_DTYPES


# ---- the elementwise ops, one loop over the table ----
def _define_activation(act: Activation):
    bwd = define_op(f"{act.name}_bwd(Tensor dy, Tensor x, float a, float b, float c) -> Tensor", _fake_bwd,
                    f"activations:{act.name}_bwd")

    def setup(ctx, inputs, output):
        x, a, b, c = inputs
        ctx.from_output = _from_output(act.name, x)
        ctx.save_for_backward(output if ctx.from_output else x)
        ctx.params = (a, b, c)

    def backward(ctx, dy):
        (saved,) = ctx.saved_tensors
        if ctx.from_output:
            return FROM_OUTPUT[act.name](dy, saved), None, None, None
        return bwd(unit_last(dy), saved, *ctx.params), None, None, None

    fwd = define_op(f"{act.name}_fwd(Tensor x, float a, float b, float c) -> Tensor", _fake_fwd,
                    f"activations:{act.name}_fwd", backward=backward, setup_context=setup)
    fwd_ = define_op(f"{act.name}_fwd_(Tensor(a!) x, float a, float b, float c) -> ()", _fake_fwd_,
                     f"activations:{act.name}_fwd_")
    return fwd, fwd_, bwd


ACT_OPS = {act.name: _define_activation(act) for act in ACTIVATIONS}


def _define_gate(name: str):
    bwd = define_op(f"{name}_bwd(Tensor dy, Tensor x, Tensor? up, int layout) -> (Tensor, Tensor)",
                    _fake_gated_bwd, f"activations:{name}_bwd")

    def setup(ctx, inputs, output):
        x, up, layout = inputs
        ctx.save_for_backward(x, up)
        ctx.layout = layout

    def backward(ctx, dy):
        x, up = ctx.saved_tensors
        dx, dup = bwd(unit_last(dy), x, up, ctx.layout)
        return dx, (dup if ctx.layout == LAYOUT_SEPARATE else None), None

    return define_op(f"{name}_fwd(Tensor x, Tensor? up, int layout) -> Tensor", _fake_gated_fwd,
                     f"activations:{name}_fwd", backward=backward, setup_context=setup), bwd


GATE_OPS = {name: _define_gate(name) for name in GATES}

dyt_bwd = define_op("dyt_bwd(Tensor dy, Tensor x, Tensor alpha, Tensor weight, bool need_dalpha, bool need_dw, "
                    "bool need_db) -> (Tensor, Tensor, Tensor, Tensor)", _fake_dyt_bwd, "activations:dyt_bwd")


def _dyt_setup(ctx, inputs, output):
    x, alpha, weight, _ = inputs
    ctx.save_for_backward(x, alpha, weight)


def _dyt_backward(ctx, dy):
    x, alpha, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, da, dw, db = dyt_bwd(unit_last(dy), x, alpha, weight, need[1], need[2], need[3])
    return dx, (da if need[1] else None), (dw if need[2] else None), (db if need[3] else None)


dyt_fwd = define_op("dyt_fwd(Tensor x, Tensor alpha, Tensor weight, Tensor bias) -> Tensor", _fake_dyt_fwd,
                    "activations:dyt_fwd", backward=_dyt_backward, setup_context=_dyt_setup)

def _fake_swish_beta_bwd(dy, x, beta, need_dbeta):
    return x.new_empty(x.shape), x.new_empty((1 if need_dbeta else 0,))


swish_beta_bwd = define_op("swish_beta_bwd(Tensor dy, Tensor x, Tensor beta, bool need_dbeta) -> (Tensor, Tensor)",
                           _fake_swish_beta_bwd, "activations:swish_beta_bwd")


def _swish_beta_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swish_beta_backward(ctx, dy):
    x, beta = ctx.saved_tensors
    dx, db = swish_beta_bwd(unit_last(dy), x, beta, ctx.needs_input_grad[1])
    return dx, (db if ctx.needs_input_grad[1] else None)


swish_beta_fwd = define_op("swish_beta_fwd(Tensor x, Tensor beta) -> Tensor", lambda x, beta: x.new_empty(x.shape),
                           "activations:swish_beta_fwd",
                           backward=_swish_beta_backward, setup_context=_swish_beta_setup)

prelu_bwd = define_op("prelu_bwd(Tensor dy, Tensor x, Tensor weight, bool per_row, bool need_dw) -> (Tensor, Tensor)",
                      _fake_prelu_bwd, "activations:prelu_bwd")


def _prelu_setup(ctx, inputs, output):
    x, weight, per_row = inputs
    ctx.save_for_backward(x, weight)
    ctx.per_row = per_row


def _prelu_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dw = ctx.needs_input_grad[1]
    dx, dw = prelu_bwd(unit_last(dy), x, weight, ctx.per_row, need_dw)
    return dx, (dw if need_dw else None), None


prelu_fwd = define_op("prelu_fwd(Tensor x, Tensor weight, bool per_row) -> Tensor", _fake_prelu_fwd,
                      "activations:prelu_fwd", backward=_prelu_backward, setup_context=_prelu_setup)


# BatchNorm in inference + residual + activation (batch_norm_act): x (M, N) rows, scale / shift (C,) in the
# accumulation type, channel = row % C (per_row) or the column; act -1 identity, else ACT_NAMES' index.
def _fake_bn_bwd(dy, x, scale, shift, residual, per_row, act, a, b, c, need_affine):
    nc = scale.shape[0] if need_affine else 0
    return (x.new_empty(x.shape), x.new_empty(x.shape if residual is not None else (0,)), scale.new_empty((nc,)),
            scale.new_empty((nc,)))


batch_norm_act_bwd = define_op(
    "batch_norm_act_bwd(Tensor dy, Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool per_row, int act,"
    " float a, float b, float c, bool need_affine) -> (Tensor, Tensor, Tensor, Tensor)",
    _fake_bn_bwd, "activations:batch_norm_act_bwd")


def _bn_setup(ctx, inputs, output):
    x, scale, shift, residual, per_row, act, a, b, c = inputs
    ctx.save_for_backward(x, scale, shift, residual)
    ctx.args = (per_row, act, a, b, c)


def _bn_backward(ctx, dy):
    x, scale, shift, residual = ctx.saved_tensors
    need_affine = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dres, dscale, dshift = batch_norm_act_bwd(unit_last(dy), x, scale, shift, residual, *ctx.args, need_affine)
    return (dx, dscale if ctx.needs_input_grad[1] else None, dshift if ctx.needs_input_grad[2] else None,
            dres if residual is not None and ctx.needs_input_grad[3] else None) + (None,) * 5


batch_norm_act_fwd = define_op(
    "batch_norm_act_fwd(Tensor x, Tensor scale, Tensor shift, Tensor? residual, bool per_row, int act, float a,"
    " float b, float c) -> Tensor",
    lambda x, scale, shift, residual, per_row, act, a, b, c: x.new_empty(x.shape),
    "activations:batch_norm_act_fwd", backward=_bn_backward, setup_context=_bn_setup)


# ---- dispatch helpers ----
def _as_rows(x: Tensor) -> Tensor:
    """x as a 2-D (rows, cols) view for the elementwise kernels: one long row when contiguous (so narrow last
    dims do not cost a short loop each), else (rows, last dim) with any row stride (a copy only when the last
    dim itself is strided)."""
    if x.is_contiguous():
        return x.view(1, -1)
    return rows(x, x.shape[-1]) if x.dim() > 0 else x.reshape(1, 1)


def _unary(name: str, x: Tensor, params, inplace: bool, ref: Callable[[], Tensor]) -> Tensor:
    if not kernel_ok(x) or routed(name, x):
        return ref()
    fwd, fwd_, _ = ACT_OPS[name]
    a, b, c = (float(p) for p in params)
    if inplace:
        # torch's in-place semantics under autograd (the error on a leaf that requires grad, the version
        # counter, saving the result): torch itself. Without autograd the kernel writes into x.
        if torch.is_grad_enabled() and x.requires_grad:
            return ref()
        x2 = _as_rows(x)
        if x2.data_ptr() != x.data_ptr():  # no 2-D view of x exists (a strided last dim): torch does it
            return ref()
        fwd_(x2, a, b, c)
        return x
    return call_op(fwd, _as_rows(x), a, b, c).view(x.shape)


# ---- public API: drop-ins for torch.nn.functional ----
def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.relu``: max(x, 0); gradient 0 at x = 0, NaN propagates."""
    return _unary("relu", input, (0, 0, 0), inplace, lambda: reference.relu(input, inplace=inplace))


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.leaky_relu``: x > 0 ? x : negative_slope * x."""
    if isinstance(negative_slope, Tensor):
        return reference.leaky_relu(input, negative_slope, inplace)
    return _unary("leaky_relu", input, (negative_slope, 0, 0), inplace,
                  lambda: reference.leaky_relu(input, negative_slope, inplace))


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.elu``: x > 0 ? x : alpha * (exp(x) - 1)."""
    return _unary("elu", input, (alpha, 1.0, 1.0), inplace, lambda: reference.elu(input, alpha, inplace))


def selu(input: Tensor, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.selu``: scale * elu(x, alpha) with SELU's fixed constants."""
    return _unary("elu", input, (SELU_ALPHA * SELU_SCALE, SELU_SCALE, 1.0), inplace,
                  lambda: reference.selu(input, inplace))


def celu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.celu``: max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    if not isinstance(alpha, (int, float)) or alpha == 0:  # torch raises for alpha = 0
        return reference.celu(input, alpha, inplace)
    return _unary("elu", input, (alpha, 1.0, 1.0 / alpha), inplace, lambda: reference.celu(input, alpha, inplace))


def sigmoid(input: Tensor) -> Tensor:
    """Drop-in for ``F.sigmoid`` / ``torch.sigmoid``."""
    return _unary("sigmoid", input, (0, 0, 0), False, lambda: reference.sigmoid(input))


def tanh(input: Tensor) -> Tensor:
    """Drop-in for ``F.tanh`` / ``torch.tanh``."""
    return _unary("tanh", input, (0, 0, 0), False, lambda: reference.tanh(input))


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """Drop-in for ``F.softplus``: log(1 + exp(beta x)) / beta, and x where beta x > threshold."""
    if not isinstance(beta, (int, float)) or not isinstance(threshold, (int, float)) or beta == 0:
        return reference.softplus(input, beta, threshold)
    return _unary("softplus", input, (beta, threshold, 0), False,
                  lambda: reference.softplus(input, beta, threshold))


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """Drop-in for ``F.gelu``: x Phi(x) (``approximate='none'``) or its tanh approximation ('tanh')."""
    name = {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate) if isinstance(approximate, str) else None
    if name is None:  # torch raises its own error for anything else
        return reference.gelu(input, approximate=approximate)
    return _unary(name, input, (0, 0, 0), False, lambda: reference.gelu(input, approximate=approximate))


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.silu``: x * sigmoid(x)."""
    return _unary("silu", input, (0, 0, 0), inplace, lambda: reference.silu(input, inplace))


def mish(input: Tensor, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.mish``: x * tanh(softplus(x))."""
    return _unary("mish", input, (0, 0, 0), inplace, lambda: reference.mish(input, inplace))


def logsigmoid(input: Tensor) -> Tensor:
    """Drop-in for ``F.logsigmoid``: log(sigmoid(x)), computed stably."""
    return _unary("logsigmoid", input, (0, 0, 0), False, lambda: reference.logsigmoid(input))


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """Drop-in for ``F.hardswish``: x * relu6(x + 3) / 6."""
    return _unary("hardswish", input, (0, 0, 0), inplace, lambda: reference.hardswish(input, inplace))


def swish(input: Tensor, beta: Union[float, Tensor] = 1.0) -> Tensor:
    """x * sigmoid(beta * x). ``beta`` is a float or a learnable tensor: a one-element tensor (Swish-beta's
    learnable scalar) runs its own kernel pair, which also returns beta's gradient (a reduction over every
    element, summed in double on CPU); a tensor beta of another shape broadcasts against x through torch's
    composition (the reference). beta = 1 is SiLU."""
    if isinstance(beta, Tensor):
        if not (kernel_ok(input, beta) and beta.numel() == 1 and input.dim() > 0 and beta.dim() <= input.dim()):
            return reference.swish(input, beta)
        n = input.shape[-1]
        return call_op(swish_beta_fwd, rows(input, n), beta.reshape(1)).view(input.shape)
    return _unary("swish", input, (beta, 0, 0), False, lambda: reference.swish(input, beta))


def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """Drop-in for ``F.prelu``: x > 0 ? x : weight[c] * x, c the channel (dim 1; one slope if weight has one
    element). Gradients for input and weight."""
    if not kernel_ok(input, weight) or input.dim() == 0 or weight.dim() != 1:
        return reference.prelu(input, weight)
    C = weight.numel()
    if C == 1:
        return call_op(prelu_fwd, _as_rows(input), weight, True).view(input.shape)
    if input.dim() < 2 or input.shape[1] != C or not input.is_contiguous():
        return reference.prelu(input, weight)  # torch's error for a channel mismatch; strided channels
    inner = input[0, 0].numel()
    if inner == 1:  # channels last: one slope per column
        return call_op(prelu_fwd, input.view(-1, C), weight, False).view(input.shape)
    return call_op(prelu_fwd, input.view(-1, inner), weight, True).view(input.shape)


def batch_norm_act(input: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor] = None,
                   bias: Optional[Tensor] = None, eps: float = 1e-5, activation: Optional[str] = "relu",
                   residual: Optional[Tensor] = None) -> Tensor:
    """BatchNorm in inference, an optional residual add and an activation in one pass:
    ``act(F.batch_norm(input, running_mean, running_var, weight, bias, training=False, eps=eps) + residual)``
    (a ResNet block's bn2 + shortcut + relu). activation: None or one of relu, sigmoid, tanh, gelu, gelu_tanh,
    silu, mish, logsigmoid, hardswish. input (N, C, *) contiguous or channels-last, or (N, C); residual the
    input's shape. The statistics fold into a per-channel scale and shift (in float32 for 16-bit input) by torch
    ops, so gradients reach input, residual, weight, bias (and the statistics, if they require grad)."""
    ref = functools.partial(reference.batch_norm_act, input, running_mean, running_var, weight, bias, eps,
                            activation, residual)
    if activation not in reference.BN_ACTIVATIONS:
        return ref()  # its ValueError
    stats = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    # statistics and affine in the input's dtype, or float32 for 16-bit input (what torch's CPU kernel takes)
    stat_dtypes = (input.dtype, torch.float32) if isinstance(input, Tensor) else ()
    if (not kernel_ok(input, *([residual] if residual is not None else [])) or input.dim() < 2
            or not all(isinstance(t, Tensor) and t.device == input.device and t.dim() == 1
                       and t.shape[0] == input.shape[1] and t.dtype in stat_dtypes for t in stats)
            or running_mean is None or running_var is None
            or (residual is not None and residual.shape != input.shape)):
        return ref()
    C = input.shape[1]
    if input.is_contiguous():
        inner = input[0, 0].numel()
        per_row, shape2, back = inner > 1, ((-1, inner) if inner > 1 else (-1, C)), None
        x2 = input.view(shape2)
        r2 = residual.contiguous().view(shape2) if residual is not None else None
    elif input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        per_row, back = False, input.shape
        x2 = input.permute(0, 2, 3, 1).reshape(-1, C)  # a view
        r2 = (residual.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(-1, C)
              if residual is not None else None)
    else:
        return ref()
    acc = acc_dtype(input.dtype)
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if weight is not None:
        scale = weight.to(acc) * scale
    shift = -running_mean.to(acc) * scale
    if bias is not None:
        shift = shift + bias.to(acc)
    act = -1 if activation is None else ACT_NAMES.index(activation)
    y = call_op(batch_norm_act_fwd, x2, scale.contiguous(), shift.contiguous(), r2, per_row, act, 0.0, 0.0, 0.0)
    if back is not None:
        n, _, h, w = back
        return y.view(n, h, w, C).permute(0, 3, 1, 2)
    return y.view(input.shape)


def dyt(x: Tensor, alpha: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Dynamic Tanh ("Transformers without Normalization"): weight * tanh(alpha * x) + bias over the last dim;
    alpha a one-element tensor, weight and bias (x.shape[-1],). Gradients for all four."""
    n = x.shape[-1] if isinstance(x, Tensor) and x.dim() > 0 else -1
    if not (kernel_ok(x, alpha, weight, bias) and n > 0 and alpha.numel() == 1
            and tuple(weight.shape) == (n,) and tuple(bias.shape) == (n,)):
        return reference.dyt(x, alpha, weight, bias)
    y = call_op(dyt_fwd, rows(x, n), alpha.reshape(1), weight, bias)
    return y.view(x.shape)


def _gated(name: str, gate: Tensor, up: Optional[Tensor], ref: Callable[[], Tensor]) -> Tensor:
    fwd, _ = GATE_OPS[name]
    if up is None:
        if not kernel_ok(gate) or gate.dim() == 0 or gate.shape[-1] % 2:
            return ref()
        h = gate.shape[-1] // 2
        y = call_op(fwd, rows(gate, 2 * h), None, LAYOUT_GATE_UP)
        return y.view(gate.shape[:-1] + (h,))
    if not kernel_ok(gate, up) or gate.shape != up.shape or gate.dim() == 0:
        return ref()  # broadcasting and mixed dtypes: torch's semantics
    n = gate.shape[-1]
    return call_op(fwd, rows(gate, n), rows(up, n), LAYOUT_SEPARATE).view(gate.shape)


def swiglu(gate: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """silu(gate) * up. With ``up=None``, ``gate`` holds both halves along its last dim, [gate | up] (the
    output of one fused gate+up projection); the backward then writes one gradient of that shape."""
    return _gated("swiglu", gate, up, lambda: reference.swiglu(gate, up))


def geglu(gate: Tensor, up: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    """gelu(gate, approximate) * up; ``up=None`` as in :func:`swiglu`."""
    name = {"none": "geglu", "tanh": "geglu_tanh"}.get(approximate) if isinstance(approximate, str) else None
    if name is None:
        return reference.geglu(gate, up, approximate)
    return _gated(name, gate, up, lambda: reference.geglu(gate, up, approximate))


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """Drop-in for ``F.glu``: a * sigmoid(b) with a, b the halves of ``input`` along ``dim``."""
    fwd, _ = GATE_OPS["glu"]
    if not kernel_ok(input) or input.dim() == 0 or not isinstance(dim, int) or not -input.dim() <= dim < input.dim():
        return reference.glu(input, dim)
    d = dim % input.dim()
    n = input.shape[d]
    if n % 2:
        return reference.glu(input, dim)  # torch's error
    out_shape = input.shape[:d] + (n // 2,) + input.shape[d + 1:]
    if d == input.dim() - 1:
        return call_op(fwd, rows(input, n), None, LAYOUT_UP_GATE).view(out_shape)
    if not input.is_contiguous():
        return reference.glu(input, dim)
    inner = n * input[(0,) * (d + 1)].numel()  # the halves are contiguous blocks of each outer row
    return call_op(fwd, input.view(-1, inner), None, LAYOUT_UP_GATE).view(out_shape)


__all__: List[str] = [
    "relu", "leaky_relu", "elu", "selu", "celu", "sigmoid", "tanh", "softplus", "gelu", "silu", "mish",
    "logsigmoid", "hardswish", "swish", "prelu", "dyt", "glu", "swiglu", "geglu", "batch_norm_act",
]
