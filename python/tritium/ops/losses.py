"""Losses: torch's elementwise and row losses as drop-ins, and the losses torch lacks (sigmoid focal, quantile,
contrastive, InfoNCE).

One table drives the elementwise losses: ``ELEMENTWISE`` lists each pointwise formula once (its id is its index,
the same in csrc/losses.cpp and kernels/losses.py). Three ops serve every row of it:
``tritium::loss_fwd(loss, x, y, w, p, a, b, scale, reduce)`` computes the (weighted) pointwise loss and, for
'mean' / 'sum', its reduction in the same pass (no per-element intermediate), and ``tritium::loss_bwd`` the input's
gradient from a 0-d or per-element upstream gradient. On the CPU a reduced loss that will be differentiated runs
``tritium::loss_fwd_grad`` instead, which writes the input's gradient for an upstream gradient of 1 in the pass that
computes the loss; ``loss.backward()`` then hands it on without reading x and y again (any other upstream gradient
runs loss_bwd). ``w`` is a weight of the input's shape or one per column
(the last dim), ``p`` a per-column parameter (pos_weight, the quantiles), ``a`` / ``b`` the scalar ones (margin,
beta, delta, alpha, gamma). For a loss of d = x - y only (``diff``), the target's gradient is -dx.

The row losses (triplet, cosine embedding, contrastive, multi-margin) are one row kernel (C++; Triton:
kernels/losses_rows.py): ``tritium::loss_rows`` writes each row's loss and its statistics (distances, dot products:
(N, 3) in the accumulation dtype), which autograd saves; ``tritium::loss_rows_bwd`` reads them (recomputing them only
when not given) and writes the gradient rows times the rows' upstream gradient, in the inputs' dtype. On the CPU a
reduced row loss that will be differentiated runs ``tritium::loss_rows_grad``, both in one pass, for the upstream
gradient its reduction passes back from ``loss.backward()``. multilabel_soft_margin_loss is the elementwise
bce_with_logits with a per-column weight, divided by the number of classes.

``info_nce`` computes the (N, N) similarities in blocks of rows (never the whole matrix): the forward keeps each
row's and each column's log-sum-exp, the backward recomputes the blocks. On CPU the blocks are BLAS products and
C++ statistics (nce_block_fwd / nce_block_bwd_); on CUDA one Triton kernel per direction (kernels/losses_nce.py)
with an online log-sum-exp over the tiles of a row block, flash-attention style.

Whatever the kernels do not cover (a dtype, a device, shapes that need broadcasting, a target or weight that
requires grad where only the input's gradient is implemented, legacy size_average / reduce arguments, invalid
arguments) goes explicitly to ``tritium.reference``, i.e. torch itself, so results and errors are torch's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from .. import reference
from ..utils import cpu_has, cpu_has_bf16_dot, register_cpu_path
from ._library import HALF_DTYPES, acc_dtype, call_op, define_op, grad_route, kernel_ok, route_below, routed, unit_last
from .linear import linear_packed, mm_acc_, pack_linear


@dataclass(frozen=True)
class PointwiseLoss:
    name: str    # the public function (and its ELEMENTWISE id: the index)
    diff: bool   # a function of x - y only: the target's gradient is -dx
    doc: str


# The elementwise table (order = the ids in csrc/losses.cpp and kernels/losses.py). d = x - y.
ELEMENTWISE: List[PointwiseLoss] = [
    PointwiseLoss("mse_loss", True, "d^2"),
    PointwiseLoss("l1_loss", True, "|d|"),
    PointwiseLoss("smooth_l1_loss", True, "|d| < a ? d^2 / (2a) : |d| - a/2   (a = beta)"),
    PointwiseLoss("huber_loss", True, "|d| < a ? d^2 / 2 : a (|d| - a/2)   (a = delta)"),
    PointwiseLoss("binary_cross_entropy", False, "-(y max(log x, -100) + (1-y) max(log(1-x), -100))"),
    PointwiseLoss("binary_cross_entropy_with_logits", False,
                  "(1-y) x + (1 + (p-1) y) softplus(-x)   (p = pos_weight)"),
    PointwiseLoss("soft_margin_loss", False, "softplus(-y x)"),
    PointwiseLoss("hinge_embedding_loss", False, "(y != 1) max(a - x, 0) + (y != -1) x   (a = margin)"),
    PointwiseLoss("margin_ranking_loss", False, "max(-y x + a, 0)   (x = x1 - x2, a = margin)"),
    PointwiseLoss("sigmoid_focal_loss", False,
                  "alpha_t bce_with_logits(x, y) (1 - p_t)^gamma   (a = alpha, b = gamma)"),
    PointwiseLoss("quantile_loss", False, "e >= 0 ? p e : (p - 1) e,  e = y - x   (p = the column's quantile)"),
]
LOSS_IDS = {loss.name: i for i, loss in enumerate(ELEMENTWISE)}

# The row losses (csrc/losses.cpp's RowLoss ids)
ROW_TRIPLET, ROW_TRIPLET_SWAP, ROW_COSINE, ROW_CONTRASTIVE, ROW_MULTI_MARGIN = 0, 1, 2, 3, 4

_REDUCTIONS = ("mean", "sum", "none")


# ---- the elementwise ops ----
def _fake_loss_fwd(loss, x, y, w, p, a, b, scale, reduce):
    return x.new_empty(() if reduce else x.shape)


def _fake_loss_bwd(loss, g, x, y, w, p, a, b, scale):
    return x.new_empty(x.shape)


loss_bwd = define_op("loss_bwd(int loss, Tensor g, Tensor x, Tensor y, Tensor? w, Tensor? p, float a, float b,"
                     " float scale) -> Tensor", _fake_loss_bwd, "losses:loss_bwd")


def _loss_setup(ctx, inputs, output):
    loss, x, y, w, p, a, b, scale, reduce = inputs
    ctx.args = (loss, a, b, scale if reduce else 1.0)
    ctx.save_for_backward(x, y, w, p)


def _loss_backward(ctx, g):
    x, y, w, p = ctx.saved_tensors
    loss, a, b, scale = ctx.args
    need_x, need_y = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4] or (need_y and not ELEMENTWISE[loss].diff):
        # the public functions send these calls to torch; a direct call of the op must not get a silent None
        raise NotImplementedError(f"tritium::loss_fwd ({ELEMENTWISE[loss].name}) differentiates the input only "
                                  f"(and the target of a function of input - target)")
    dx = loss_bwd(loss, g if g.dim() == 0 else g.contiguous(), x, y, w, p, a, b, scale)
    return None, (dx if need_x else None), (dx.neg() if need_y else None), None, None, None, None, None, None


loss_fwd = define_op("loss_fwd(int loss, Tensor x, Tensor y, Tensor? w, Tensor? p, float a, float b, float scale,"
                     " bool reduce) -> Tensor", _fake_loss_fwd, "losses:loss_fwd", backward=_loss_backward,
                     setup_context=_loss_setup)


def _fake_loss_fwd_grad(loss, x, y, w, p, a, b, scale):
    return x.new_empty(()), x.new_empty(x.shape)


def _loss_grad_setup(ctx, inputs, output):
    loss, x, y, w, p, a, b, scale = inputs
    ctx.set_materialize_grads(False)  # dx is an output no loss depends on: no zero tensor for its gradient
    ctx.args = (loss, a, b, scale)
    ctx.save_for_backward(x, y, w, p)
    _hold_gradients(ctx, output[1:], x.new_ones(()))  # dx, for loss.backward()'s upstream gradient of 1


def _records_backward(needs: Sequence[bool]) -> bool:
    """Whether an eager call records a backward for an input (needs: each input's requires_grad): grad mode on, not
    while torch.compile traces (its graph differentiates the ops as written)."""
    return torch.is_grad_enabled() and any(needs) and not torch.compiler.is_compiling()


def _known_upstream(g: Tensor, guess: Tensor) -> bool:
    """Whether the upstream gradient g equals the one a forward computed its gradients for, read where reading it
    costs nothing and means something: a real CPU tensor in eager autograd (not while torch.compile or a torch.func
    transform traces, where g has no value, nor on a GPU, where reading it would wait for the device)."""
    return (type(g) is Tensor and g.device.type == "cpu" and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active() and g.shape == guess.shape
            and g.dtype == guess.dtype and torch.equal(g, guess))


def _hold_gradients(ctx, grads: Sequence[Tensor], guess: Tensor) -> None:
    """Keep the gradients a forward computed for the upstream gradient `guess`, for _take_gradients. Not as saved
    tensors: the backward that hands them on takes them away (their only holder, so autograd accumulates them
    without a copy, and a second backward through a retained graph computes its own); detached, so the node does not
    hold its own outputs (no reference cycle)."""
    ctx.held = (tuple(t.detach() for t in grads), guess)


def _take_gradients(ctx, upstream: Optional[Tensor]) -> Optional[tuple]:
    """The gradients _hold_gradients kept, when the upstream gradient is the guessed one; None otherwise and in
    every later backward (the caller computes its own)."""
    held, ctx.held = ctx.held, None
    return held[0] if held is not None and upstream is not None and _known_upstream(upstream, held[1]) else None


def _loss_grad_backward(ctx, g, _ddx):
    x, y, w, p = ctx.saved_tensors
    loss, a, b, scale = ctx.args
    held = _take_gradients(ctx, g)
    need_x, need_y = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4] or (need_y and not ELEMENTWISE[loss].diff):
        raise NotImplementedError(f"tritium::loss_fwd_grad ({ELEMENTWISE[loss].name}) differentiates the input "
                                  f"only (and the target of a function of input - target)")
    if g is None:
        return None
    dx = held[0] if held else loss_bwd(loss, g, x, y, w, p, a, b, scale)
    return None, (dx if need_x else None), (dx.neg() if need_y else None), None, None, None, None, None


# loss_fwd(..., reduce=True) that also returns dx = loss_bwd(1, ...), from the same pass over x and y: the eager
# CPU path of a reduced loss that will be differentiated (see _pointwise). The first backward hands that dx on as
# the gradient when the upstream gradient is 1 (loss.backward() on the loss itself); any other computes its own.
loss_fwd_grad = define_op("loss_fwd_grad(int loss, Tensor x, Tensor y, Tensor? w, Tensor? p, float a, float b,"
                          " float scale) -> (Tensor, Tensor)", _fake_loss_fwd_grad, "losses:loss_fwd_grad",
                          backward=_loss_grad_backward, setup_context=_loss_grad_setup)


def _column_vector(t: Optional[Tensor], x: Tensor, full_ok: bool):
    """t as the kernels take it: None; itself when it has x's shape (full_ok) or is (C,) (C = x's last dim);
    expanded to (C,) from one element. False when the kernels do not cover it (a broadcast needing expansion,
    a gradient for it)."""
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.requires_grad or t.dtype != x.dtype or t.device != x.device:
        return False
    if full_ok and t.shape == x.shape:
        return t.contiguous()
    if x.dim() >= 1 and t.dim() == 1 and t.shape[0] in (1, x.shape[-1]):
        return t.expand(x.shape[-1]).contiguous()
    return False


# the losses torch has no op for: their torch form (reference.py) is a chain of ops, slower at every size
_NO_TORCH_OP = ("sigmoid_focal_loss", "quantile_loss")


def _routed(name: str, input: Tensor, *others: Tensor) -> bool:
    """Whether a CPU call of the drop-in `name` goes to torch's own loss (ops/_library.py's routes), sized by
    `input`: below ROUTE_BELOW["<name> (grad)"] elements when the call records a backward through input or any of
    `others` (the cheapest formulas: there the loss op's autograd wrapper and its Python backward cost more than
    torch's whole loss and gradient), below the house default otherwise (a call without gradients: the kernel wins
    from there). A 16-bit call with a gradient routes below the smaller of the two sizes: torch's 16-bit losses
    and their gradients convert every element to float32 and back, op by op, so the kernel's one pass each way
    wins from the house default on."""
    if name in _NO_TORCH_OP:
        return False
    op = grad_route(name, input, *others)
    if input.dtype in HALF_DTYPES and route_below(op) > route_below(name):
        op = name
    return routed(op, input)


# torch's ATen op of each difference loss, f(input, target, reduction enum, a), as F.<name> calls it at its end
# (smooth_l1 with beta = 0 is l1, as there)
_ATEN_LOSS = {
    "mse_loss": lambda x, y, r, a: torch._C._nn.mse_loss(x, y, r),
    "l1_loss": lambda x, y, r, a: torch._C._nn.l1_loss(x, y, r),
    "huber_loss": lambda x, y, r, a: torch._C._nn.huber_loss(x, y, r, a),
    "smooth_l1_loss": lambda x, y, r, a: (torch._C._nn.l1_loss(x, y, r) if a == 0
                                          else torch._C._nn.smooth_l1_loss(x, y, r, a)),
}
_REDUCTION_ENUM = {"none": 0, "mean": 1, "sum": 2}  # torch's _Reduction.get_enum


def _torch_loss(name: str, input: Tensor, target: Tensor, reduction: str, a: float):
    """A routed call of a difference loss (its caller has sent legacy arguments and weights to torch's function)
    straight to torch's ATen op, or None where F.<name>'s Python does something for it. With a target of the
    input's shape and no __torch_function__ override, F's remaining work is a broadcast of two equal shapes (two
    expand views, and a backward node for each) before that op: skipped, the same kernel gives the same values
    and gradients for less per-call cost."""
    op, r = _ATEN_LOSS.get(name), _REDUCTION_ENUM.get(reduction)
    if op is None or r is None or target.shape != input.shape or has_torch_function_variadic(input, target):
        return None
    return op(input, target, r, a)


def _pointwise(name: str, input: Tensor, target: Tensor, reduction: str, weight: Optional[Tensor] = None,
               p: Optional[Tensor] = None, a: float = 0.0, b: float = 0.0, scale: Optional[float] = None):
    """The kernel call of a pointwise loss; for a call routed to torch's own loss (_routed), torch's ATen op where
    _torch_loss can call it; None when the kernels do not cover the call or the route needs torch's function (the
    caller runs torch). scale: the reduced sum's factor (default: 1 / numel for 'mean', 1 for 'sum')."""
    # the route first: a routed call pays the fewest checks on its way to torch's loss
    if not (isinstance(input, Tensor) and isinstance(target, Tensor)):
        return None
    if _routed(name, input, target):
        return _torch_loss(name, input, target, reduction, a)
    if not (kernel_ok(input, target) and target.shape == input.shape and reduction in _REDUCTIONS):
        return None
    if target.requires_grad and not ELEMENTWISE[LOSS_IDS[name]].diff:
        return None
    w, pv = _column_vector(weight, input, True), _column_vector(p, input, False)
    if w is False or pv is False:
        return None
    reduce = reduction != "none"
    if scale is None:
        scale = 1.0 / input.numel() if reduction == "mean" else 1.0
    args = (LOSS_IDS[name], input.contiguous(), target.contiguous(), w, pv, float(a), float(b), scale)
    if reduce and input.device.type == "cpu" and _records_backward((input.requires_grad, target.requires_grad)):
        # the backward will read x and y again to write dx: write it now, in the pass that reads them for the
        # loss (a loss is the last op of a forward, so dx lives from here to the backward that follows)
        return call_op(loss_fwd_grad, *args)[0]
    return call_op(loss_fwd, *args, reduce)


def _legacy(size_average, reduce) -> bool:
    return size_average is not None or reduce is not None


# ---- public API: torch's drop-ins ----
def _difference_loss(name, input, target, size_average, reduce, reduction, weight):
    """mse_loss / l1_loss: the kernel's pointwise loss, or torch's own (reference.<name>) for the legacy
    arguments, a weight, or what the kernels do not cover."""
    out = None if _legacy(size_average, reduce) or weight is not None else _pointwise(name, input, target,
                                                                                       reduction)
    if out is None:
        extra = {} if weight is None else {"weight": weight}
        return getattr(reference, name)(input, target, size_average, reduce, reduction, **extra)
    return out


def mse_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
             weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.mse_loss``: (input - target)^2, reduced (with a weight: torch's own,
    whose 'mean' divides by the weight's sum)."""
    return _difference_loss("mse_loss", input, target, size_average, reduce, reduction, weight)


def l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
            weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.l1_loss``: |input - target|, reduced (with a weight: torch's own, whose
    'mean' divides by the weight's sum)."""
    return _difference_loss("l1_loss", input, target, size_average, reduce, reduction, weight)


def smooth_l1_loss(input: Tensor, target: Tensor, size_average=None, reduce=None, reduction: str = "mean",
                   beta: float = 1.0) -> Tensor:
    """Drop-in for ``torch.nn.functional.smooth_l1_loss`` (beta >= 0; beta = 0 is l1_loss)."""
    ok = not _legacy(size_average, reduce) and isinstance(beta, (int, float)) and beta >= 0
    out = _pointwise("smooth_l1_loss", input, target, reduction, a=beta) if ok else None
    return reference.smooth_l1_loss(input, target, size_average, reduce, reduction, beta) if out is None else out


def huber_loss(input: Tensor, target: Tensor, reduction: str = "mean", delta: float = 1.0,
               weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.huber_loss`` (delta > 0; with a weight: torch's own)."""
    ok = weight is None and isinstance(delta, (int, float)) and delta > 0
    out = _pointwise("huber_loss", input, target, reduction, a=delta) if ok else None
    if out is None:
        extra = {} if weight is None else {"weight": weight}
        return reference.huber_loss(input, target, reduction, delta, **extra)
    return out


def binary_cross_entropy(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                         reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.binary_cross_entropy`` (input probabilities in [0, 1], checked as torch;
    weight of input's shape or one per class of the last dim)."""
    out = None if _legacy(size_average, reduce) else _pointwise("binary_cross_entropy", input, target, reduction,
                                                                weight)
    if out is None:
        return reference.binary_cross_entropy(input, target, weight, size_average, reduce, reduction)
    return out


def binary_cross_entropy_with_logits(input: Tensor, target: Tensor, weight: Optional[Tensor] = None,
                                     size_average=None, reduce=None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.binary_cross_entropy_with_logits`` (weight of input's shape or one per
    class of the last dim; pos_weight one per class)."""
    out = None if _legacy(size_average, reduce) else _pointwise(
        "binary_cross_entropy_with_logits", input, target, reduction, weight, pos_weight)
    if out is None:
        return reference.binary_cross_entropy_with_logits(input, target, weight, size_average, reduce, reduction,
                                                          pos_weight)
    return out


def soft_margin_loss(input: Tensor, target: Tensor, size_average=None, reduce=None,
                     reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.soft_margin_loss``: log(1 + exp(-target * input)) (computed without
    overflow where torch's log1p(exp(.)) gives inf in the input's dtype)."""
    out = None if _legacy(size_average, reduce) else _pointwise("soft_margin_loss", input, target, reduction)
    return reference.soft_margin_loss(input, target, size_average, reduce, reduction) if out is None else out


def hinge_embedding_loss(input: Tensor, target: Tensor, margin: float = 1.0, size_average=None, reduce=None,
                         reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.hinge_embedding_loss``."""
    ok = not _legacy(size_average, reduce) and isinstance(margin, (int, float))
    out = _pointwise("hinge_embedding_loss", input, target, reduction, a=margin) if ok else None
    if out is None:
        return reference.hinge_embedding_loss(input, target, margin, size_average, reduce, reduction)
    return out


def margin_ranking_loss(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0.0, size_average=None,
                        reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.margin_ranking_loss``: max(0, -target (input1 - input2) + margin)."""
    ok = (not _legacy(size_average, reduce) and isinstance(margin, (int, float)) and isinstance(input2, Tensor)
          and isinstance(input1, Tensor) and input2.shape == input1.shape and input2.dtype == input1.dtype)
    out = _pointwise("margin_ranking_loss", input1 - input2, target, reduction, a=margin) if ok else None
    if out is None:
        return reference.margin_ranking_loss(input1, input2, target, margin, size_average, reduce, reduction)
    return out


def multilabel_soft_margin_loss(input: Tensor, target: Tensor, weight: Optional[Tensor] = None, size_average=None,
                                reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.multilabel_soft_margin_loss``: per sample, the mean over the C classes
    of the weighted bce_with_logits (the elementwise kernel with a per-class weight, divided by C)."""
    ok = (not _legacy(size_average, reduce) and isinstance(input, Tensor) and input.dim() in (1, 2)
          and reduction in _REDUCTIONS and (weight is None or (isinstance(weight, Tensor) and weight.dim() == 1)))
    if ok:
        c = input.shape[-1]
        scale = 1.0 / (input.numel() if reduction == "mean" else c)  # torch: the mean over classes, then rows
        out = _pointwise("binary_cross_entropy_with_logits", input, target, "none" if reduction == "none" else "sum",
                         weight, scale=scale)
        if out is not None:
            return out.sum(-1) / c if reduction == "none" else out
    return reference.multilabel_soft_margin_loss(input, target, weight, size_average, reduce, reduction)


# ---- public API: losses torch lacks ----
def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> Tensor:
    """``torchvision.ops.sigmoid_focal_loss`` (same signature and semantics, torchvision not needed):
    p = sigmoid(inputs), ce = bce_with_logits(inputs, targets), p_t = p targets + (1 - p)(1 - targets),
    loss = ce (1 - p_t)^gamma, times alpha targets + (1 - alpha)(1 - targets) when alpha >= 0; reduction 'none'
    (the default, as torchvision), 'mean' or 'sum'."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"Invalid Value for arg 'reduction': '{reduction} \n Supported reduction modes: 'none', "
                         f"'mean', 'sum'")
    out = _pointwise("sigmoid_focal_loss", inputs, targets, reduction, a=alpha, b=gamma)
    return reference.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction) if out is None else out


def quantile_loss(input: Tensor, target: Tensor, quantiles: Sequence[float], reduction: str = "mean") -> Tensor:
    """Pinball loss over a list of quantiles: input (..., Q) holds one prediction per quantile tau_q, target (...)
    (or (..., 1), or input's shape) the observation; with e = target - input[..., q],
    loss[..., q] = max(tau_q e, (tau_q - 1) e) (written as e >= 0 ? tau_q e : (tau_q - 1) e, whose gradient at
    e = 0 is -tau_q); 'mean' averages over every element of input, 'sum' sums, 'none' keeps input's shape.
    A target without the quantile dim is expanded to input's shape (one copy of input's size)."""
    qs = [float(q) for q in quantiles]
    if input.dim() == 0 or input.shape[-1] != len(qs):
        raise ValueError(f"quantile_loss: input must have a last dim of len(quantiles) = {len(qs)}, got shape "
                         f"{tuple(input.shape)}")
    if not all(0.0 < q < 1.0 for q in qs):
        raise ValueError(f"quantile_loss: quantiles must lie in (0, 1), got {qs}")
    if tuple(target.shape) not in (tuple(input.shape), tuple(input.shape[:-1]), tuple(input.shape[:-1]) + (1,)):
        raise ValueError(f"quantile_loss: target must have shape {tuple(input.shape[:-1])} (or input's), got "
                         f"{tuple(target.shape)}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    tau = torch.tensor(qs, dtype=input.dtype, device=input.device)
    if target.shape != input.shape:
        target = target.reshape(input.shape[:-1] + (1,)).expand(input.shape)
    out = _pointwise("quantile_loss", input, target, reduction, p=tau)
    return reference.quantile_loss(input, target, qs, reduction) if out is None else out


# ---- the row losses: one forward op and one backward op (C++ on CPU, Triton on CUDA: kernels/losses_rows.py) ----
def _fake_loss_rows(loss, x1, x2, x3, y, w, a, b, c):
    adt = acc_dtype(x1.dtype)
    return x1.new_empty((x1.shape[0],), dtype=adt), x1.new_empty((x1.shape[0], 3), dtype=adt)


def _fake_loss_rows_bwd(loss, dloss, x1, x2, x3, y, w, a, b, c, need1, need2, need3, stats=None):
    return tuple(x1.new_empty(x1.shape if need and t is not None else (0,))
                 for need, t in ((need1, x1), (need2, x2), (need3, x3)))


loss_rows_bwd = define_op(
    "loss_rows_bwd(int loss, Tensor dloss, Tensor x1, Tensor? x2, Tensor? x3, Tensor? y, Tensor? w, float a, float b,"
    " float c, bool need1, bool need2, bool need3, Tensor? stats=None) -> (Tensor, Tensor, Tensor)",
    _fake_loss_rows_bwd, "losses_rows:loss_rows_bwd")


def _rows_setup(ctx, inputs, output):
    loss, x1, x2, x3, y, w, a, b, c = inputs
    ctx.args = (loss, a, b, c)
    ctx.set_materialize_grads(False)
    # the rows' statistics (output[1]): the backward reads them instead of another pass over the rows
    ctx.save_for_backward(x1, x2, x3, y, w, output[1])


def _rows_backward(ctx, dloss, _dstats):
    if dloss is None:  # only the statistics were used: they have no gradient
        return (None,) * 9
    x1, x2, x3, y, w, stats = ctx.saved_tensors
    loss, a, b, c = ctx.args
    need = ctx.needs_input_grad[1:4]
    if any(ctx.needs_input_grad[4:6]):
        raise NotImplementedError("tritium::loss_rows differentiates x1, x2 and x3 only (the public functions send "
                                  "a label or weight that requires grad to torch)")
    g1, g2, g3 = loss_rows_bwd(loss, dloss, x1, x2, x3, y, w, a, b, c, *need, stats)
    return (None, g1 if need[0] else None, g2 if need[1] else None, g3 if need[2] else None, None, None, None, None,
            None)


loss_rows = define_op(
    "loss_rows(int loss, Tensor x1, Tensor? x2, Tensor? x3, Tensor? y, Tensor? w, float a, float b, float c)"
    " -> (Tensor, Tensor)", _fake_loss_rows, "losses_rows:loss_rows", backward=_rows_backward,
    setup_context=_rows_setup)


def _fake_loss_rows_grad(loss, dloss, x1, x2, x3, y, w, a, b, c, need1, need2, need3):
    return (_fake_loss_rows(loss, x1, x2, x3, y, w, a, b, c)
            + _fake_loss_rows_bwd(loss, dloss, x1, x2, x3, y, w, a, b, c, need1, need2, need3))


def _rows_grad_setup(ctx, inputs, output):
    loss, dloss, x1, x2, x3, y, w, a, b, c = inputs[:10]
    ctx.args = (loss, a, b, c)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x1, x2, x3, y, w, output[1])
    _hold_gradients(ctx, output[2:], dloss)


def _rows_grad_backward(ctx, dloss, _dstats, *_dgrads):
    if any(ctx.needs_input_grad[5:7]):
        raise NotImplementedError("tritium::loss_rows_grad differentiates x1, x2 and x3 only (the public functions "
                                  "send a label or weight that requires grad to torch)")
    grads = _take_gradients(ctx, dloss)
    if dloss is None:
        return None
    x1, x2, x3, y, w, stats = ctx.saved_tensors
    loss, a, b, c = ctx.args
    need = ctx.needs_input_grad[2:5]
    if grads is None:
        grads = loss_rows_bwd(loss, dloss, x1, x2, x3, y, w, a, b, c, *need, stats)
    return (None, None) + tuple(g if nd else None for g, nd in zip(grads, need)) + (None,) * 8


# loss_rows with the gradient rows for an upstream gradient guessed in the forward (dloss: the gradient a 'mean' or
# 'sum' reduction passes back from loss.backward()), from the same pass over the rows: the eager CPU path of a
# reduced row loss that will be differentiated (_row_call). The first backward whose upstream gradient is the
# guess hands those gradients on; any other computes its own (loss_rows_bwd from the saved statistics).
loss_rows_grad = define_op(
    "loss_rows_grad(int loss, Tensor dloss, Tensor x1, Tensor? x2, Tensor? x3, Tensor? y, Tensor? w, float a,"
    " float b, float c, bool need1, bool need2, bool need3) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
    _fake_loss_rows_grad, "losses_rows:loss_rows_grad", backward=_rows_grad_backward, setup_context=_rows_grad_setup)


def _rows_ok(*ts: Tensor) -> bool:
    """The row kernels take tensors of one floating dtype and device (kernel_ok), 2-D and of one shape."""
    return kernel_ok(*ts) and ts[0].dim() == 2 and all(t.shape == ts[0].shape for t in ts)


def _row_call(loss, x1, x2, x3, y, w, a, b, c, reduction, dtype):
    xs = [None if t is None else unit_last(t) for t in (x1, x2, x3)]
    args = (*xs, y, w, float(a), float(b), float(c))
    need = [t is not None and t.requires_grad for t in (x1, x2, x3)]
    if reduction != "none" and x1.device.type == "cpu" and _records_backward(need):
        # the backward would read the rows again: write the gradient rows now, for the upstream gradient the
        # reduction of loss.backward() will pass (torch's mean backward: 1 / rows, as computed here)
        one = torch.ones((), dtype=acc_dtype(x1.dtype))
        guess = (one.div(x1.shape[0]) if reduction == "mean" else one).expand(x1.shape[0])
        per_row = call_op(loss_rows_grad, loss, guess, *args, *need)[0]
    else:
        per_row = call_op(loss_rows, loss, *args)[0]
    if reduction == "none":
        return per_row.to(dtype)
    return (per_row.mean() if reduction == "mean" else per_row.sum()).to(dtype)


def triplet_margin_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0, p: float = 2,
                        eps: float = 1e-6, swap: bool = False, size_average=None, reduce=None,
                        reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.triplet_margin_loss``: max(d(a, p) - d(a, n) + margin, 0) with
    d(u, v) = ||u - v + eps||_p (swap: the smaller of d(a, n) and d(p, n)): one row kernel pass for the
    distances and the loss, one for the three gradient rows (on the CPU, for a reduced loss that will be
    differentiated, the same pass)."""
    ok = (not _legacy(size_average, reduce) and reduction in _REDUCTIONS and isinstance(margin, (int, float))
          and margin > 0 and isinstance(p, (int, float)) and p > 0 and all(isinstance(t, Tensor) for t in
                                                                            (anchor, positive, negative))
          and anchor.dim() in (1, 2))
    if ok:  # a small call (recording a backward: smaller still) goes to torch's loss
        ok = not _routed("triplet_margin_loss", anchor, positive, negative)
    if ok:
        a2, p2, n2 = (t.unsqueeze(0) if t.dim() == 1 else t for t in (anchor, positive, negative))
        if _rows_ok(a2, p2, n2):
            out = _row_call(ROW_TRIPLET_SWAP if swap else ROW_TRIPLET, a2, p2, n2, None, None, margin, p, eps,
                            reduction, anchor.dtype)
            return out.reshape(anchor.shape[:-1]) if reduction == "none" else out
    return reference.triplet_margin_loss(anchor, positive, negative, margin, p, eps, swap, size_average, reduce,
                                         reduction)


def cosine_embedding_loss(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 0.0, size_average=None,
                          reduce=None, reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.cosine_embedding_loss``: per row, c = cos(x1, x2) (torch's 1e-12 under
    each squared norm); target 1: 1 - c, target -1: max(c - margin, 0), any other value: 0."""
    ok = (not _legacy(size_average, reduce) and reduction in _REDUCTIONS and isinstance(margin, (int, float))
          and isinstance(input1, Tensor) and isinstance(input2, Tensor) and isinstance(target, Tensor)
          and _rows_ok(input1, input2) and target.dtype == input1.dtype and target.shape == input1.shape[:1]
          and not target.requires_grad)
    if ok:
        return _row_call(ROW_COSINE, input1, input2, None, target.contiguous(), None, margin, 0.0, 0.0, reduction,
                         input1.dtype)
    return reference.cosine_embedding_loss(input1, input2, target, margin, size_average, reduce, reduction)


def multi_margin_loss(input: Tensor, target: Tensor, p: int = 1, margin: float = 1.0,
                      weight: Optional[Tensor] = None, size_average=None, reduce=None,
                      reduction: str = "mean") -> Tensor:
    """Drop-in for ``torch.nn.functional.multi_margin_loss``: per row, sum over the classes j != y of
    weight[y] max(margin - x[y] + x[j], 0)^p / C (p = 1 or 2), in the row kernel."""
    ok = (not _legacy(size_average, reduce) and reduction in _REDUCTIONS and p in (1, 2)
          and isinstance(margin, (int, float)) and isinstance(input, Tensor) and isinstance(target, Tensor)
          and input.dim() in (1, 2) and target.dtype == torch.int64 and target.device == input.device
          and target.shape == input.shape[:-1]
          # torch has no 16-bit CPU kernel: its error stands (its CUDA kernel takes 16-bit inputs, as the Triton one)
          and (input.dtype in (torch.float32, torch.float64) or input.device.type == "cuda"))
    if ok:
        x2 = input.unsqueeze(0) if input.dim() == 1 else input
        w = _column_vector(weight, x2, False)
        if w is not False and _rows_ok(x2) and x2.shape[1] > 0:
            out = _row_call(ROW_MULTI_MARGIN, x2, None, None, target.reshape(-1), w, margin, p, 0.0, reduction,
                            input.dtype)
            return out.reshape(target.shape) if reduction == "none" else out
    return reference.multi_margin_loss(input, target, p, margin, weight, size_average, reduce, reduction)


def contrastive_loss(input1: Tensor, input2: Tensor, target: Tensor, margin: float = 1.0, eps: float = 1e-6,
                     reduction: str = "mean") -> Tensor:
    """Pairwise (Siamese) contrastive loss (Hadsell, Chopra and LeCun 2006): input1, input2 (N, D) embeddings,
    target (N,) 1 for a similar pair and 0 for a dissimilar one, d = ||input1 - input2 + eps||_2 (torch's
    pairwise_distance); loss = (target d^2 + (1 - target) max(margin - d, 0)^2) / 2, reduced over the pairs.
    The row kernel computes the distance and the loss, and in the backward both gradient rows."""
    if not (isinstance(input1, Tensor) and isinstance(input2, Tensor) and input1.shape == input2.shape
            and input1.dim() == 2):
        raise ValueError(f"contrastive_loss: input1 and input2 must be (N, D) of one shape, got "
                         f"{tuple(getattr(input1, 'shape', ()))} and {tuple(getattr(input2, 'shape', ()))}")
    if not isinstance(target, Tensor) or tuple(target.shape) != tuple(input1.shape[:1]):
        raise ValueError(f"contrastive_loss: target must be ({input1.shape[0]},), got "
                         f"{tuple(getattr(target, 'shape', ()))}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if _rows_ok(input1, input2) and target.dtype == input1.dtype and not target.requires_grad:
        return _row_call(ROW_CONTRASTIVE, input1, input2, None, target.contiguous(), None, margin, 0.0, eps,
                         reduction, input1.dtype)
    return reference.contrastive_loss(input1, input2, target, margin, eps, reduction)


# ---- InfoNCE in row blocks (CPU: BLAS products and C++ statistics per block; CUDA: kernels/losses_nce.py) ----
def default_block_rows(n_cols: int) -> int:
    """Query rows per block: a block of about 2M similarities (8 MiB in float32), at least 16 rows. At N = 8192
    (256 rows) the forward + backward took 1% longer than with 512-row blocks, float32 and bfloat16 alike (AMD EPYC,
    AVX512-BF16), for 8 MiB (float32) / 4 MiB (bfloat16) less at its peak."""
    return max(16, (1 << 21) // max(n_cols, 1))


def _acc(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.to(acc_dtype(t.dtype))


def _native16(t: Tensor) -> bool:
    """Whether the blocks' products keep t's bfloat16 operands instead of converting them to float32: on a CPU that
    multiplies bfloat16 natively (cpu_has_bf16_dot), where that is two or more times faster. The products are summed
    in float32 either way; the gradients' products go through mm_acc_."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu" and cpu_has_bf16_dot()


def _round16(t: Tensor) -> bool:
    """Whether the blocks' similarities come out of the matmul in bfloat16 (a oneDNN bfloat16 matmul, rounded as
    eager's bfloat16 matmul rounds them; the statistics are then computed from them in float32): on the native path
    without AMX. With AMX they stay float32 (MKL's bfloat16 GEMM into float32 sums, mm_acc_); on AVX512-BF16, MKL's
    bfloat16 GEMM is the slow kernel and a float32 output through oneDNN would take a zeroing and an add pass more."""
    return _native16(t) and not cpu_has("amx_bf16")


register_cpu_path("info_nce.bfloat16", lambda: "bfloat16 products into float32 (MKL, AMX)" if cpu_has("amx_bf16")
                  else "bfloat16 matmuls (oneDNN), bfloat16 similarities" if cpu_has_bf16_dot()
                  else "float32 products")


def _panels(t: Tensor) -> bool:
    """Whether the blocks' float32 / float64 products run on tritium's panel GEMM (csrc/panel.h), the other operand
    packed once per pass (pack_linear, then linear_packed per block): on CPU, except where MKL's GEMM is the tuned
    kernel (Intel), as tritium.linear and the fused LM-head loss choose."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and not cpu_has("intel")


register_cpu_path("info_nce.float32", lambda: "BLAS (MKL)" if cpu_has("intel") else
                  "panel GEMM (the keys packed once per pass)")


class _Products:
    """The products of one pass over the row blocks with one right-hand matrix m (N, D): sim(a) = a m^T inv_t
    (_sim, or the panel GEMM on m packed once), and, when asked (grad), mm(ds) = ds m (m^T packed once)."""

    def __init__(self, m: Optional[Tensor], inv_t: float, native: bool, round16: bool, grad: bool = False):
        self.m, self.inv_t, self.round16 = m, inv_t, round16
        self.panels = m is not None and not native and _panels(m)
        self.packed = pack_linear(m) if self.panels else None
        self.packed_t = pack_linear(m.t()) if self.panels and grad else None

    def sim(self, a: Tensor) -> Tensor:
        if self.panels:
            return linear_packed(a, self.packed, self.m.shape[0]).mul_(self.inv_t)
        return _sim(a, self.m.t(), self.inv_t, self.round16)

    def mm(self, ds: Tensor) -> Tensor:
        """ds @ m in float32 (the accumulation dtype)."""
        if self.panels:
            return linear_packed(ds, self.packed_t, self.m.shape[1])
        return _mm32(ds, self.m)


def _operands(t: Optional[Tensor], native: bool) -> Optional[Tensor]:
    """A product's operand: t itself on the native bfloat16 path, else in the accumulation dtype."""
    return t if native or t is None else _acc(t)


def _sim(a: Tensor, b: Tensor, inv_t: float, round16: bool) -> Tensor:
    """A block of similarities a @ b * inv_t: in bfloat16 from bfloat16 operands when round16 (the matmul scales
    its float32 sums by inv_t and rounds once: no second pass over the block, one rounding where eager's matmul and
    division round twice), else in float32 (_mm32)."""
    if round16:
        return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=inv_t)
    return _mm32(a, b).mul_(inv_t)


def _mm32(a: Tensor, b: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """a @ b in float32 (into out when given): torch.mm for float operands, mm_acc_ for bfloat16 ones."""
    if a.dtype != torch.bfloat16:
        return torch.mm(a, b, out=out) if out is not None else torch.mm(a, b)
    out = a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32) if out is None else out
    mm_acc_(out.zero_(), a, b)
    return out


def _fake_nce_fwd(q, k, neg, inv_t, symmetric, block):
    adt = acc_dtype(q.dtype)
    n = q.shape[0]
    return (q.new_empty((n,), dtype=adt), q.new_empty((n,), dtype=adt),
            q.new_empty((n if symmetric else 0,), dtype=adt))


# The blocks' elementwise statistics of the CPU path: C++ (csrc/losses.cpp: one pass per statistic with a fast
# exp); the same math in torch ops here, the specification tests/kernels/test_losses.py holds the C++ kernels to
# (CUDA runs the fused Triton kernels instead: info_nce_fwd / info_nce_bwd).
def _nce_block_fwd_torch(s, sn, m_col, e_col, symmetric, offset=None):
    s, sn = _acc(s), _acc(sn)  # a 16-bit block is read in the accumulation dtype, the statistics' dtype
    full = s if sn is None else torch.cat([s, sn], 1)
    lse = torch.logsumexp(full, 1)
    if not symmetric:
        return lse, s.new_empty((0,)), s.new_empty((0,))
    if offset is not None:  # the columns' sums taken about the fixed offset instead of their running max
        m_new = torch.full_like(m_col, offset)
        return lse, m_new, torch.where(e_col == 0, 0.0, e_col * torch.exp(m_col - m_new)) + torch.exp(s - offset).sum(0)
    m_new = torch.maximum(m_col, s.amax(0))
    m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
    e_new = torch.where(e_col == 0, 0.0, e_col * torch.exp(m_col - m_safe)) + torch.exp(s - m_safe).sum(0)
    return lse, m_safe, e_new


def _fake_nce_block_fwd(s, sn, m_col, e_col, symmetric, offset=None):
    n = s.shape[1] if symmetric else 0
    adt = acc_dtype(s.dtype)
    return s.new_empty((s.shape[0],), dtype=adt), s.new_empty((n,), dtype=adt), s.new_empty((n,), dtype=adt)


def _nce_block_bwd_torch(s, lse_row, wq, lse_col, wk, diag, offset=None):
    dtype, s = s.dtype, _acc(s)  # computed in the accumulation dtype, written in the block's (one rounding)
    ds = torch.exp(s - lse_row[:, None]) * wq[:, None]
    if lse_col is not None:
        ds += torch.exp(s - lse_col[None, :]) * wk[None, :]
    if diag >= 0:
        rows = torch.arange(s.shape[0], device=s.device)
        cols = rows + diag
        keep = cols < s.shape[1]
        rows, cols = rows[keep], cols[keep]
        ds[rows, cols] -= wq[rows] + (wk[cols] if wk is not None else 0.0)
    return ds.to(dtype)


def _fake_nce_block_bwd(s, lse_row, wq, lse_col, wk, diag, offset=None):
    return None


nce_block_fwd = define_op("nce_block_fwd(Tensor s, Tensor? sn, Tensor m_col, Tensor e_col, bool symmetric,"
                          " float? offset=None) -> (Tensor, Tensor, Tensor)", _fake_nce_block_fwd)
# the score gradient written over the block s: the backward's loop then holds one block instead of two
nce_block_bwd_ = define_op("nce_block_bwd_(Tensor(a!) s, Tensor lse_row, Tensor wq, Tensor? lse_col, Tensor? wk,"
                           " int diag, float? offset=None) -> ()", _fake_nce_block_bwd)

NCE_OFFSET_MAX = 32.0  # csrc/losses.cpp's kNceOffsetMax


def _nce_offset(q: Tensor, k: Tensor, neg: Optional[Tensor], inv_t: float) -> Optional[float]:
    """A bound c on every |similarity| (max |q_i| times max |k_j|, |n_j|, over T), when it is at most
    NCE_OFFSET_MAX: the block statistics then take exp(s - c) once per element (no maxima, one pass; see
    nce_block_fwd), e.g. unit rows at T >= 1/32. None otherwise, and for non-finite rows (their statistics take
    the maxima's path, which propagates NaN as torch does). One host sync (a CPU path)."""
    def top(t):  # the largest row norm, in row chunks (a 16-bit t is read in float32 a chunk at a time, not whole)
        if not t.shape[0]:
            return t.new_zeros(())
        step = max(1, (1 << 18) // max(t.shape[1], 1))
        return torch.stack([torch.linalg.vector_norm(t[i:i + step], dim=1, dtype=acc_dtype(t.dtype)).amax()
                            for i in range(0, t.shape[0], step)]).amax()
    norms = torch.stack([top(q), torch.maximum(top(k), top(neg)) if neg is not None else top(k)]).double()
    # bfloat16 similarities round up by at most a relative 2**-8: the 1.01 keeps the bound a bound
    c = float(norms.prod()) * inv_t * 1.01
    return c if math.isfinite(c) and c <= NCE_OFFSET_MAX else None


def _nce_fwd_impl(q, k, neg, inv_t, symmetric, block):
    """(per-row loss, row log-sum-exp, column log-sum-exp (symmetric; else empty)), all in the accumulation dtype.
    Row block [i0, i1): S = q[i0:i1] k^T / T (and q[i0:i1] n^T / T); the row LSE is complete per block, the
    column LSE is kept online (running max and rescaled exp-sum) across blocks (nce_block_fwd)."""
    native, round16 = _native16(q), _round16(q)
    qa, ka, na = (_operands(t, native) for t in (q, k, neg))
    n = q.shape[0]
    lse_row = q.new_empty((n,), dtype=acc_dtype(q.dtype))
    diag = torch.empty_like(lse_row)
    m_col = lse_row.new_full((n,), float("-inf")) if symmetric else lse_row.new_empty((0,))
    e_col = lse_row.new_zeros((n,)) if symmetric else lse_row.new_empty((0,))
    pk, pn = _Products(ka, inv_t, native, round16), _Products(na, inv_t, native, round16)
    offset = _nce_offset(q, k, neg, inv_t)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        s = pk.sim(qa[i0:i1])
        sn = pn.sim(qa[i0:i1]) if na is not None else None
        lse_row[i0:i1], m_col, e_col = nce_block_fwd(s, sn, m_col, e_col, symmetric, offset)
        del s, sn
        # the positives' similarities in the accumulation dtype, a block at a time (no float copy of q and k)
        diag[i0:i1] = (_acc(q[i0:i1]) * _acc(k[i0:i1])).sum(1)
    diag.mul_(inv_t)
    loss = lse_row - diag
    if symmetric:
        lse_col = m_col + torch.log(e_col)
        loss = (loss + (lse_col - diag)) * 0.5
    else:
        lse_col = qa.new_empty((0,))
    return loss, lse_row, lse_col


def _mm_acc_rows(c: Tensor, a: Tensor, b: Tensor, rows: int = 2048) -> None:
    """mm_acc_(c, a, b) a chunk of c's rows at a time: its 16-bit product buffer (oneDNN's product, then added into
    c) is then one chunk's, not all of c's (the key gradient: (N, D), beside the backward's other buffers)."""
    for i in range(0, c.shape[0], rows):
        mm_acc_(c[i:i + rows], a[i:i + rows], b)


def _fake_nce_bwd(dloss, q, k, neg, lse_row, lse_col, inv_t, symmetric, block):
    return q.new_empty(q.shape), k.new_empty(k.shape), q.new_empty(neg.shape if neg is not None else (0,))


def _nce_bwd_impl(dloss, q, k, neg, lse_row, lse_col, inv_t, symmetric, block):
    """Gradients of sum(dloss * loss) for q, k and the negatives, recomputing each row block's similarities:
    dS = wq (softmax_row(S) - I) + wk (softmax_col(S) - I), wq = wk = dloss / 2 when symmetric (else wq = dloss,
    wk = 0); dq = dS k / T, dk = dS^T q / T (accumulated over blocks), likewise for the negatives' columns."""
    native, round16 = _native16(q), _round16(q)
    qa, ka, na = (_operands(t, native) for t in (q, k, neg))
    adt = acc_dtype(q.dtype)
    n = q.shape[0]
    w = (dloss.to(adt) * (0.5 if symmetric else 1.0)).contiguous()
    # a block's query gradient is complete after its products: summed in the accumulation dtype (dq_blk) and written
    # scaled in q's dtype at once, so a 16-bit q's float32 gradient is never held whole (the keys' is: every block
    # adds to all of it)
    dq = q.new_empty(q.shape)
    dq_blk = q.new_empty((min(block, n), q.shape[1]), dtype=adt) if dq.dtype != adt else None
    dk = k.new_zeros(k.shape, dtype=adt)
    dn = neg.new_zeros(neg.shape, dtype=adt) if neg is not None else None
    # the score gradients enter the products in the operands' dtype (bfloat16 on the native path, as eager's
    # bfloat16 backward; the products are still summed in float32)
    ds_in = (lambda t: t.to(torch.bfloat16)) if native else (lambda t: t)  # noqa: E731
    pk, pn = _Products(ka, inv_t, native, round16, True), _Products(na, inv_t, native, round16, True)
    # float: mm_acc_'s panels where this CPU's products run on them (pk.panels), else BLAS's addmm_
    acc_ = _mm_acc_rows if native else mm_acc_ if pk.panels else (lambda c, a, b: c.addmm_(a, b))  # noqa: E731
    offset = _nce_offset(q, k, neg, inv_t)
    for i0 in range(0, n, block):
        i1 = min(n, i0 + block)
        qb, wb, lb = qa[i0:i1], w[i0:i1], lse_row[i0:i1]
        dqb = dq[i0:i1] if dq_blk is None else dq_blk[:i1 - i0]
        s = pk.sim(qb)
        nce_block_bwd_(s, lb, wb, lse_col if symmetric else None, w if symmetric else None, i0, offset)
        ds = ds_in(s)
        del s
        if pk.panels:
            dqb.copy_(pk.mm(ds))
        else:
            _mm32(ds, ka, out=dqb)
        acc_(dk, ds.t(), qb)
        del ds
        if na is not None:
            sn = pn.sim(qb)
            nce_block_bwd_(sn, lb, wb, None, None, -1)
            dsn = ds_in(sn)
            del sn
            if pn.panels:
                dqb += pn.mm(dsn)
            else:
                acc_(dqb, dsn, na)
            acc_(dn, dsn.t(), qb)
            del dsn
        dqb.mul_(inv_t)
        if dq_blk is not None:
            dq[i0:i1] = dqb
    dk.mul_(inv_t)
    if dn is not None:
        dn.mul_(inv_t)
    cast = lambda t, like: t.to(like.dtype)  # noqa: E731
    return cast(dq, q), cast(dk, k), (cast(dn, neg) if neg is not None else q.new_empty((0,)))


info_nce_bwd = define_op(
    "info_nce_bwd(Tensor dloss, Tensor q, Tensor k, Tensor? neg, Tensor lse_row, Tensor lse_col, float inv_t,"
    " bool symmetric, int block) -> (Tensor, Tensor, Tensor)", _fake_nce_bwd, "losses_nce:info_nce_bwd",
    cpu=_nce_bwd_impl)


def _nce_setup(ctx, inputs, output):
    q, k, neg, inv_t, symmetric, block = inputs
    ctx.set_materialize_grads(False)
    ctx.args = (inv_t, symmetric, block)
    ctx.has_neg = neg is not None
    ctx.save_for_backward(q, k, neg, output[1], output[2])


def _nce_backward(ctx, dloss, _dlse_row, _dlse_col):
    if dloss is None:
        return (None,) * 6
    q, k, neg, lse_row, lse_col = ctx.saved_tensors
    dq, dk, dn = info_nce_bwd(dloss.contiguous(), q, k, neg, lse_row, lse_col, *ctx.args)
    return dq, dk, (dn if ctx.has_neg else None), None, None, None


info_nce_fwd = define_op(
    "info_nce_fwd(Tensor q, Tensor k, Tensor? neg, float inv_t, bool symmetric, int block)"
    " -> (Tensor, Tensor, Tensor)", _fake_nce_fwd, "losses_nce:info_nce_fwd", cpu=_nce_fwd_impl,
    backward=_nce_backward, setup_context=_nce_setup)


# ---- info_nce's normalisation: F.normalize(x, dim=-1)'s values with a lean backward ----
def _unit_rows_impl(x, eps):
    norm = x.norm(2, -1, keepdim=True)  # F.normalize's own operations, so the same values
    return x / norm.clamp_min(eps).expand_as(x), norm


def _fake_unit_rows(x, eps):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1] + (1,))


def _unit_rows_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.eps = inputs[1]
    ctx.save_for_backward(output[0], output[1])


def _unit_rows_backward(ctx, g, _dnorm):
    """d/dx of y = x / max(|x|, eps): (g - (g . y) y) / |x|, and g / eps where the norm is below eps (its clamp
    passes no gradient there). One tensor of x's size (torch's autograd of F.normalize builds four or five): the
    row dot products come from a batched matmul, the rest is in place."""
    if g is None:
        return None, None
    y, norm = ctx.saved_tensors
    dot = torch.einsum("nd,nd->n", g.reshape(-1, g.shape[-1]), y.reshape(-1, y.shape[-1])).reshape(norm.shape)
    dot = dot.masked_fill_(norm < ctx.eps, 0)
    return torch.addcmul(g, y, dot, value=-1).div_(norm.clamp_min(ctx.eps)), None


unit_rows = define_op("unit_rows(Tensor x, float eps) -> (Tensor, Tensor)", _fake_unit_rows,
                      composite=_unit_rows_impl, backward=_unit_rows_backward, setup_context=_unit_rows_setup)


def _normalize(x: Tensor) -> Tensor:
    """F.normalize(x, dim=-1) (eps 1e-12) through unit_rows: the same values, a backward that allocates only its
    result (autograd through F.normalize holds several x-sized temporaries at once: most of info_nce's peak)."""
    return call_op(unit_rows, x, 1e-12)[0]


def info_nce(query: Tensor, key: Tensor, temperature: float = 0.1, symmetric: bool = True,
             negatives: Optional[Tensor] = None, normalize: bool = True, reduction: str = "mean",
             block_size: Optional[int] = None) -> Tensor:
    """InfoNCE / NT-Xent, CLIP-style: query and key (N, D) are two views (or modalities) of N samples; row i's
    positive is key i and its negatives the other keys (and the explicit ``negatives`` (M, D), extra columns for
    the query direction). With q, k, n L2-normalised (normalize), S = q k^T / temperature:
    loss_i = logsumexp_j S_ij (with the negatives' columns) - S_ii; symmetric also takes the key direction,
    logsumexp over the queries of column i minus S_ii, and averages the two. 'mean' over the N rows.

    The (N, N) similarities are computed block_size query rows at a time (default: default_block_rows) and never
    held whole: the forward keeps each row's and each column's log-sum-exp, the backward recomputes the blocks.
    Peak extra memory (CPU) is the normalised inputs (saved for the backward), one (block_size, N) block (float32;
    bfloat16 on a CPU that multiplies bfloat16 natively, else float32 copies of 16-bit inputs too) and the keys'
    gradient summed in float32 (N, D) beside the query gradient in the inputs' dtype. On CUDA the Triton kernels keep
    the similarities as register tiles (block_size is not used) and need only O(N) extra memory. A CPU call of fewer
    than ROUTE_BELOW["info_nce"] similarities N x (N + M) runs torch's formula (tritium.reference.info_nce)."""
    if not (isinstance(query, Tensor) and isinstance(key, Tensor) and query.dim() == 2 and query.shape == key.shape):
        raise ValueError(f"info_nce: query and key must be (N, D) of one shape, got "
                         f"{tuple(getattr(query, 'shape', ()))} and {tuple(getattr(key, 'shape', ()))}")
    if negatives is not None and (not isinstance(negatives, Tensor) or negatives.dim() != 2
                                  or negatives.shape[1] != query.shape[1]):
        raise ValueError(f"info_nce: negatives must be (M, {query.shape[1]}), got "
                         f"{tuple(getattr(negatives, 'shape', ()))}")
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be positive, got {temperature}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")
    if block_size is not None and block_size < 1:
        raise ValueError(f"info_nce: block_size must be positive, got {block_size}")
    ok = kernel_ok(query, key, *([negatives] if negatives is not None else [])) and query.shape[1] > 0
    n = query.shape[0]
    if not ok or routed("info_nce", query, n * (n + (negatives.shape[0] if negatives is not None else 0))):
        return reference.info_nce(query, key, temperature, symmetric, negatives, normalize, reduction)
    if normalize:
        query, key = _normalize(query), _normalize(key)
        negatives = _normalize(negatives) if negatives is not None else None
    block = block_size or default_block_rows(n + (negatives.shape[0] if negatives is not None else 0))
    loss = call_op(info_nce_fwd, query, key, negatives, 1.0 / temperature, bool(symmetric), int(block))[0]
    if reduction == "none":
        return loss.to(query.dtype)
    total = loss.sum()
    return (total / n if reduction == "mean" else total).to(query.dtype)


__all__: List[str] = [
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_with_logits", "soft_margin_loss", "hinge_embedding_loss", "margin_ranking_loss",
    "multilabel_soft_margin_loss", "multi_margin_loss", "triplet_margin_loss", "cosine_embedding_loss",
    "sigmoid_focal_loss", "quantile_loss", "contrastive_loss", "info_nce",
]
