"""Mamba's causal depthwise conv1d: ``causal_conv1d`` (autograd w.r.t. x, weight, bias and the initial states;
optional initial and final states) and ``causal_conv1d_update`` (decoding steps over a rolling state, in place),
with causal-conv1d's signatures (``causal_conv1d_fn`` without seq_idx; ``causal_conv1d_update`` without
cache_seqlens and conv_state_indices):

    out[b, c, t] = act(bias[c] + sum_k weight[c, k] x[b, c, t - (width - 1) + k])

x before position 0 being the initial states (zeros without them); act: identity, or silu for "silu" / "swish".
The backward recomputes the pre-activation from x (width multiply-adds per element) instead of saving it. The
final states (the last width - 1 inputs, padded on the left by the initial states or zeros when L < width - 1)
are a slice taken in torch ops, so their gradient flows back by autograd.

The kernels take widths 1..MAX_WIDTH with x, weight, bias, initial_states (and conv_state) of one dtype and
device; anything else (other dtypes or devices, wider kernels, empty x, an update that must be differentiable,
TRITIUM_BACKEND=reference) goes explicitly to ``tritium.reference``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok, unit_last

MAX_WIDTH = 8  # the widths the kernels take (causal-conv1d's CUDA kernels: 2..4; Mamba uses 4)
ACTIVATIONS = (None, "silu", "swish")


# ---- fake kernels: shapes only ----
def _fake_fwd(x, weight, bias, initial_states, silu):
    return x.new_empty(x.shape)


def _fake_bwd(dout, x, weight, bias, initial_states, silu):
    B, D, _ = x.shape
    W = weight.shape[1]
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            x.new_empty((D,) if bias is not None else (0,)),
            x.new_empty((B, D, W - 1) if initial_states is not None else (0,)))


def _fake_update(x, conv_state, weight, bias, silu):
    return x.new_empty(x.shape)


# ---- the backward op, the autograd formula, the forward and update ops ----
causal_conv1d_bwd = define_op(
    "causal_conv1d_bwd(Tensor dout, Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, bool silu)"
    " -> (Tensor, Tensor, Tensor, Tensor)", _fake_bwd, "conv1d:causal_conv1d_bwd")


def _setup(ctx, inputs, output):
    x, weight, bias, initial_states, silu = inputs
    ctx.save_for_backward(x, weight, bias, initial_states)
    ctx.silu = silu


def _backward(ctx, dout):
    x, weight, bias, initial_states = ctx.saved_tensors
    dx, dw, db, dinit = causal_conv1d_bwd(unit_last(dout), x, weight, bias, initial_states, ctx.silu)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dw if need[1] else None, db if bias is not None and need[2] else None,
            dinit if initial_states is not None and need[3] else None, None)


causal_conv1d_fwd = define_op(
    "causal_conv1d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? initial_states, bool silu) -> Tensor",
    _fake_fwd, "conv1d:causal_conv1d_fwd", backward=_backward, setup_context=_setup)

_update_op = define_op(
    "causal_conv1d_update(Tensor x, Tensor(a!) conv_state, Tensor weight, Tensor? bias, bool silu) -> Tensor",
    _fake_update, "conv1d:causal_conv1d_update")


# ---- validation ----
def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _tensor(fn: str, name: str, t, what: str, dims) -> None:
    """t must be a floating tensor with one of the dim counts `dims`; `what` describes the expected shape."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor {what}, got {type(t).__name__}")
    if t.dim() not in dims:
        raise ValueError(f"{fn}: {name} must be {what}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {t.dtype}")


def _check_params(fn: str, dim: int, weight, bias, activation) -> int:
    """weight (dim, width), bias (dim,) or None, activation in ACTIVATIONS; returns the width."""
    _tensor(fn, "weight", weight, f"(dim, width) = ({dim}, width)", (2,))
    if weight.shape[0] != dim or weight.shape[1] < 1:
        raise ValueError(f"{fn}: weight must be (dim, width) = ({dim}, width >= 1) (dim: x's dim 1), got shape "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        _tensor(fn, "bias", bias, f"(dim,) = ({dim},) or None", (1,))
        if bias.shape[0] != dim:
            raise ValueError(f"{fn}: bias must be (dim,) = ({dim},) or None, got shape {tuple(bias.shape)}")
    if not (activation is None or isinstance(activation, str)) or activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be None, 'silu' or 'swish', got {activation!r}")
    return weight.shape[1]


def _check_states(fn: str, name: str, t, shape) -> None:
    _tensor(fn, name, t, f"(batch, dim, width - 1) = {shape} or None", (3,))
    if tuple(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must be (batch, dim, width - 1) = {shape} or None, got shape "
                         f"{tuple(t.shape)}")


def _final_states(x: Tensor, initial_states: Optional[Tensor], w1: int) -> Tensor:
    """The last w1 entries of the input padded on the left by initial_states (zeros without them): a new tensor
    (batch, dim, w1)."""
    L = x.shape[-1]
    if L >= w1:
        return x[..., L - w1:].clone(memory_format=torch.contiguous_format)
    head = initial_states[..., L:] if initial_states is not None else x.new_zeros(x.shape[:-1] + (w1 - L,))
    return torch.cat([head.to(x.dtype), x], dim=-1)


# ---- the public functions ----
def causal_conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, initial_states: Optional[Tensor] = None,
                  return_final_states: bool = False, final_states_out: Optional[Tensor] = None,
                  activation: Optional[str] = None):
    """Causal depthwise conv1d (causal-conv1d's ``causal_conv1d_fn`` without seq_idx). x (batch, dim, L), weight
    (dim, width), bias (dim,), initial_states (batch, dim, width - 1): the inputs before position 0 (zeros without
    them); activation None, "silu" or "swish" (silu).
    out[:, c, t] = act(bias[c] + sum_k weight[c, k] x[:, c, t - width + 1 + k]), (batch, dim, L) in x's dtype.
    With return_final_states also returns the final states (batch, dim, width - 1): the last width - 1 inputs
    (padded on the left by the initial states or zeros when L < width - 1), copied into final_states_out when
    given. Differentiable w.r.t. x, weight, bias, initial_states (and through the final states)."""
    fn = "causal_conv1d"
    _tensor(fn, "x", x, "(batch, dim, seqlen)", (3,))
    B, D, _ = x.shape
    W = _check_params(fn, D, weight, bias, activation)
    if initial_states is not None:
        _check_states(fn, "initial_states", initial_states, (B, D, W - 1))
    if return_final_states and final_states_out is not None:
        _check_states(fn, "final_states_out", final_states_out, (B, D, W - 1))
    present = [t for t in (bias, initial_states) if t is not None]
    if not kernel_ok(x, weight, *present) or W > MAX_WIDTH:
        return reference.causal_conv1d(x, weight, bias, initial_states, return_final_states, final_states_out,
                                       activation)
    out = call_op(causal_conv1d_fwd, unit_last(x), weight.contiguous(), None if bias is None else bias.contiguous(),
                  None if initial_states is None else unit_last(initial_states), activation is not None)
    if not return_final_states:
        return out
    final = _final_states(x, initial_states, W - 1)
    if final_states_out is not None:
        final_states_out.copy_(final)
        final = final_states_out
    return out, final


def causal_conv1d_update(x: Tensor, conv_state: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                         activation: Optional[str] = None) -> Tensor:
    """Decoding step(s) of causal_conv1d (causal-conv1d's ``causal_conv1d_update`` without cache_seqlens /
    conv_state_indices). x (batch, dim) or (batch, dim, seqlen); conv_state (batch, dim, state_len >= width - 1),
    the last state_len inputs, updated in place (shifted left by seqlen, x appended); weight (dim, width), bias
    (dim,), activation None, "silu" or "swish". Returns out shaped as x, in x's dtype. Not differentiable through
    the kernels: a call whose x, weight or bias requires grad goes to tritium.reference."""
    fn = "causal_conv1d_update"
    _tensor(fn, "x", x, "(batch, dim) or (batch, dim, seqlen)", (2, 3))
    B, D = x.shape[0], x.shape[1]
    W = _check_params(fn, D, weight, bias, activation)
    _tensor(fn, "conv_state", conv_state, f"(batch, dim, state_len >= width - 1) = ({B}, {D}, >= {W - 1})", (3,))
    if conv_state.shape[0] != B or conv_state.shape[1] != D or conv_state.shape[2] < W - 1:
        raise ValueError(f"{fn}: conv_state must be (batch, dim, state_len >= width - 1) = ({B}, {D}, >= {W - 1}), "
                         f"got shape {tuple(conv_state.shape)}")
    present = [bias] if bias is not None else []
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, *present))
    if (not kernel_ok(x, conv_state, weight, *present) or W > MAX_WIDTH or grad
            or (conv_state.stride(-1) != 1 and conv_state.shape[-1] > 1)):
        return reference.causal_conv1d_update(x, conv_state, weight, bias, activation)
    x3 = x.unsqueeze(-1) if x.dim() == 2 else x
    out = _update_op(unit_last(x3), conv_state, weight.contiguous(), None if bias is None else bias.contiguous(),
                     activation is not None)
    return out.squeeze(-1) if x.dim() == 2 else out


__all__: List[str] = ["causal_conv1d", "causal_conv1d_update"]
