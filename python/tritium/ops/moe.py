"""Mixture of experts: ``moe``, a dropless top-k mixture of SwiGLU experts (Mixtral / Qwen-MoE's sparse MLP;
docs/moe.md):

    logits = x W_r^T (tokens, E);  scores = softmax(logits) or sigmoid(logits) (in float32 for 16-bit x)
    (w, idx) = top-k of scores per token, w renormalised to sum to 1 when renormalize
    y[t] = sum_j w[t, j] * expert_{idx[t, j]}(x[t]),  expert_e(v) = (silu(v G_e^T) * (v U_e^T)) W2_e^T

with each expert's gate and up projections fused in w13 (E, 2F, D) (w13[e] = [G_e; U_e]) and its down projection
w2 (E, D, F). Alongside y it returns the load-balancing loss aux_loss_coef * E * sum_i f_i P_i (f_i: the
fraction of tokens routed to expert i, counting each of a token's k choices, so sum_i f_i = k as in Hugging Face
Mixtral's load_balancing_loss_func; P_i: expert i's mean router probability, the per-token scores normalised to
sum 1) and the router z-loss z_loss_coef * mean_t logsumexp(logits_t)^2 (ST-MoE).

The router (a small (tokens, E) GEMM, the scores, top-k) and the grouping are torch ops: the T k assignments are
sorted by expert (stable), giving each row its token, its routing weight and per-expert offsets (no capacity, no
dropped token). The experts run as one op over the grouped rows, ``moe_experts_fwd``: per expert, the gate/up
GEMM over its contiguous rows (gathered from x), SwiGLU, the down GEMM, and the weighted scatter-add back into
token order; it returns y and the gate/up pre-activations (rows, 2F) for the backward, ``moe_experts_bwd``,
which gives dx, dw13, dw2 and the routing weights' gradient (autograd carries that one on through the top-k
and the scores to x and W_r). Without a backward to come (no grad mode, or nothing requiring grad) the experts
are ``moe_experts_infer``, the same forward returning y alone: the pre-activations are not kept (on CPU's
SwiGLU-epilogue path never written). CPU: csrc/moe.cpp; GPU: kernels/moe.py (grouped GEMMs over the sorted rows).

The kernels take x, w13, w2 of one floating dtype on one device; anything else (mixed dtypes, empty x,
TRITIUM_BACKEND=reference) goes to ``tritium.reference.moe``, the eager loop over experts.
"""
from __future__ import annotations

import functools
import numbers
from typing import List, NamedTuple

import torch
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok
from .activations import swiglu

SCORES = ("softmax", "sigmoid")


class MoEOutput(NamedTuple):
    output: Tensor     # (*, dim), x's dtype
    aux_loss: Tensor   # () float32 (float64 for float64 x): the load-balancing loss, times aux_loss_coef
    z_loss: Tensor     # () the router z-loss, times z_loss_coef


# ---- fake kernels: shapes only ----
def _fake_fwd(x, w13, w2, tokens, offsets, weights):
    return x.new_empty(x.shape), x.new_empty((tokens.shape[0], w13.shape[1]))


def _fake_bwd(dy, x, w13, w2, tokens, offsets, weights, a, need_dx):
    return (x.new_empty(x.shape if need_dx else (0,)), w13.new_empty(w13.shape), w2.new_empty(w2.shape),
            weights.new_empty(weights.shape))


# ---- the backward op, the autograd formula, the forward op ----
moe_experts_bwd = define_op(
    "moe_experts_bwd(Tensor dy, Tensor x, Tensor w13, Tensor w2, Tensor tokens, Tensor offsets, Tensor weights,"
    " Tensor a, bool need_dx) -> (Tensor, Tensor, Tensor, Tensor)", _fake_bwd, "moe:moe_experts_bwd")


def _setup(ctx, inputs, output):
    x, w13, w2, tokens, offsets, weights = inputs
    ctx.save_for_backward(x, w13, w2, tokens, offsets, weights, output[1])


def _backward(ctx, dy, _da):
    x, w13, w2, tokens, offsets, weights, a = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dw13, dw2, dweights = moe_experts_bwd(dy.contiguous(), x, w13, w2, tokens, offsets, weights, a, need[0])
    return (dx if need[0] else None, dw13 if need[1] else None, dw2 if need[2] else None, None, None,
            dweights if need[5] else None)


moe_experts_fwd = define_op(
    "moe_experts_fwd(Tensor x, Tensor w13, Tensor w2, Tensor tokens, Tensor offsets, Tensor weights)"
    " -> (Tensor, Tensor)", _fake_fwd, "moe:moe_experts_fwd", backward=_backward, setup_context=_setup)


# the forward alone, for a call with no backward to come: y only (a separate op, so moe_experts_fwd's schema stays
# as older builds of the extension register it)
def _fake_infer(x, w13, w2, tokens, offsets, weights):
    return x.new_empty(x.shape)


moe_experts_infer = define_op(
    "moe_experts_infer(Tensor x, Tensor w13, Tensor w2, Tensor tokens, Tensor offsets, Tensor weights) -> Tensor",
    _fake_infer, "moe:moe_experts_infer")


@functools.lru_cache(maxsize=None)
def _infer_registered(device_type: str) -> bool:
    """True when moe_experts_infer has a kernel for the device (a C++ extension built before the op has none: the
    forward then takes moe_experts_fwd and drops the pre-activations)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("tritium::moe_experts_infer", device_type.upper())


def _infer_ok(x: Tensor) -> bool:
    return _infer_registered(x.device.type)


# ---- validation ----
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def check_moe_args(fn: str, x, router_weight, w13, w2, top_k, score, renormalize=True) -> None:
    """Raise on arguments no implementation takes, naming the argument, what it should be and what came."""
    for name, t in (("x", x), ("router_weight", router_weight), ("w13", w13), ("w2", w2)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")
    if w13.dim() != 3 or w13.shape[1] % 2 or w13.shape[1] == 0:
        raise ValueError(f"{fn}: w13 must be (num_experts, 2 * ffn_dim, dim) (the experts' fused gate and up "
                         f"weights), got shape {_shape(w13)}")
    E, F2, D = w13.shape
    if E < 1:
        raise ValueError(f"{fn}: w13 must hold at least one expert, got shape {_shape(w13)}")
    if w2.dim() != 3 or tuple(w2.shape) != (E, D, F2 // 2):
        raise ValueError(f"{fn}: w2 must be (num_experts, dim, ffn_dim) = ({E}, {D}, {F2 // 2}) to agree with w13 "
                         f"{_shape(w13)}, got shape {_shape(w2)}")
    if router_weight.dim() != 2 or tuple(router_weight.shape) != (E, D):
        raise ValueError(f"{fn}: router_weight must be (num_experts, dim) = ({E}, {D}) to agree with w13 "
                         f"{_shape(w13)}, got shape {_shape(router_weight)}")
    if x.dim() < 1 or x.shape[-1] != D:
        raise ValueError(f"{fn}: x must be (*, dim) = (*, {D}), got shape {_shape(x)}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or not 1 <= top_k <= E:
        raise ValueError(f"{fn}: top_k must be an integer in [1, num_experts = {E}], got {top_k!r}")
    if score not in SCORES:
        raise ValueError(f"{fn}: score must be one of {SCORES}, got {score!r}")
    if not isinstance(renormalize, bool):
        raise TypeError(f"{fn}: renormalize must be a bool, got {type(renormalize).__name__}")


def group_by_expert(idx: Tensor, num_experts: int):
    """The dropless grouping of top-k assignments idx (tokens, k): (order, tokens, offsets), order (tokens k,)
    the flat assignment index of each row sorted by expert (stable: within an expert, rows in token order),
    tokens = order // k, offsets (E + 1,) int64 the first row of each expert. No capacity: every assignment
    gets a row."""
    k = idx.shape[1]
    experts, order = torch.sort(idx.reshape(-1), stable=True)
    offsets = torch.searchsorted(experts, torch.arange(num_experts + 1, device=idx.device, dtype=experts.dtype))
    return order, torch.div(order, k, rounding_mode="floor"), offsets


def moe(x: Tensor, router_weight: Tensor, w13: Tensor, w2: Tensor, top_k: int, score: str = "softmax",
        renormalize: bool = True, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001) -> MoEOutput:
    """A dropless top-k mixture of SwiGLU experts (see the module docstring): x (*, D); router_weight (E, D);
    w13 (E, 2F, D) the experts' [gate; up] weights; w2 (E, D, F) their down weights; top_k in [1, E]; score
    "softmax" or "sigmoid"; renormalize: the k routing weights divided by their sum. Returns MoEOutput(output
    (*, D) in x's dtype, aux_loss, z_loss). Differentiable w.r.t. x, router_weight, w13 and w2."""
    fn = "moe"
    check_moe_args(fn, x, router_weight, w13, w2, top_k, score, renormalize)
    if not kernel_ok(x, router_weight, w13, w2):
        return MoEOutput(*reference.moe(x, router_weight, w13, w2, top_k, score, renormalize, aux_loss_coef,
                                        z_loss_coef))
    E, D = w13.shape[0], w13.shape[2]
    x2 = x.reshape(-1, D)
    logits, scores, topw, topi = reference.moe_route(x2, router_weight, top_k, score, renormalize)
    aux, z = reference.moe_losses(logits, scores, topi, E, aux_loss_coef, z_loss_coef)
    order, tokens, offsets = group_by_expert(topi, E)
    weights = topw.reshape(-1)[order].to(x.dtype)
    if (torch.is_grad_enabled() and any(t.requires_grad for t in (x2, w13, w2, weights))) or not _infer_ok(x2):
        y, _ = call_op(moe_experts_fwd, x2.contiguous(), w13, w2, tokens, offsets, weights)
    else:   # no backward to come: the pre-activations are not kept
        y = moe_experts_infer(x2.contiguous(), w13, w2, tokens, offsets, weights)
    return MoEOutput(y.view(x.shape), aux, z)


def check_quantized_experts(fn: str, x, router_weight, experts13, experts2, top_k, score, renormalize) -> None:
    """moe_quantized's argument checks (check_moe_args' for sequences of quantized experts)."""
    E = len(experts13)
    if E == 0 or len(experts2) != E:
        raise ValueError(f"{fn}: experts13 and experts2 must hold one projection per expert (the same number, at "
                         f"least one), got {len(experts13)} and {len(experts2)}")
    F2, D = experts13[0].out_features, experts13[0].in_features
    for e in range(E):
        a, b = experts13[e], experts2[e]
        if (a.out_features, a.in_features) != (F2, D) or (b.out_features, b.in_features) != (D, F2 // 2):
            raise ValueError(f"{fn}: expert {e}'s projections must be (2F, D) = ({F2}, {D}) and (D, F) = "
                             f"({D}, {F2 // 2}), got ({a.out_features}, {a.in_features}) and "
                             f"({b.out_features}, {b.in_features})")
    if F2 % 2:
        raise ValueError(f"{fn}: the gate/up projections must have an even out_features (2F), got {F2}")
    meta = {"device": "meta", "dtype": torch.float32}   # shapes only: the checks read no data
    check_moe_args(fn, x, router_weight, torch.empty(E, F2, D, **meta), torch.empty(E, D, F2 // 2, **meta), top_k,
                   score, renormalize)


def moe_quantized(x: Tensor, router_weight: Tensor, experts13, experts2, top_k: int, score: str = "softmax",
                  renormalize: bool = True, aux_loss_coef: float = 0.01, z_loss_coef: float = 0.001) -> MoEOutput:
    """moe with each expert's projections stored quantized: experts13[e] its fused [gate; up] projection (D ->
    2F) and experts2[e] its down projection (F -> D), tritium.nn.QuantizedLinear modules (tritium.nn.MoE.quantize_
    builds them). The router and the grouping are moe's; then, for each expert that has rows, its gate/up product
    over them, SwiGLU and its down product, through the quantized kernels, so a step reads only the experts its
    tokens are routed to, and each at its stored precision. Differentiable w.r.t. x and router_weight (the
    experts are frozen). The per-expert row counts are read on the host: one device sync per call."""
    fn = "moe_quantized"
    check_quantized_experts(fn, x, router_weight, experts13, experts2, top_k, score, renormalize)
    E, D = len(experts13), x.shape[-1]
    x2 = x.reshape(-1, D)
    logits, scores, topw, topi = reference.moe_route(x2, router_weight, top_k, score, renormalize)
    aux, z = reference.moe_losses(logits, scores, topi, E, aux_loss_coef, z_loss_coef)
    order, tokens, offsets = group_by_expert(topi, E)
    weights = topw.reshape(-1)[order].to(x.dtype)
    rows = x2[tokens]
    bounds = offsets.tolist()
    parts = [experts2[e](swiglu(experts13[e](rows[bounds[e]:bounds[e + 1]])))
             for e in range(E) if bounds[e + 1] > bounds[e]]
    y = x2.new_zeros(x2.shape).index_add(0, tokens, torch.cat(parts) * weights[:, None])
    return MoEOutput(y.view(x.shape), aux, z)


__all__: List[str] = ["moe"]
