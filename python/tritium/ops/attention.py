"""Attention: ``scaled_dot_product_attention`` (torch's drop-in) and ``flash_attention`` (causal bottom-right,
sliding window, softcap, log-sum-exp output), both on one pair of flash kernels.

The kernels see (batch, heads, seq, dim) tensors and one visibility rule: query row i attends key j when
``(left < 0 or j >= i + offset - left) and (right < 0 or j <= i + offset + right)``, plus an optional
additive mask and soft-capping. torch's ``is_causal`` is offset 0, right 0 (top-left aligned);
``flash_attention(causal=True)`` is offset S - L, right 0 (bottom-right, as flash-attn and a decode continuing
a KV cache need). GQA/MQA: key/value heads divide query heads; head h reads kv head h // (H / H_kv).

Whatever the kernels do not cover goes explicitly to ``tritium.reference``: dropout_p > 0, a mask that
requires grad, batch dims that broadcast, more than 4 dims, empty tensors, mixed dtypes or devices, float64
or head dims outside 16..256 on GPU, and every invalid argument (so torch raises its own error).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import reference
from ._library import acc_dtype, call_op, define_op, kernel_ok, unit_last


# ---- fake kernels ----
def _fake_fwd(q, k, v, mask, scale, offset, left, right, softcap):
    B, H, L, _ = q.shape  # the output lives in (B, L, H, Dv) memory, as torch's own CPU flash attention's
    return (q.new_empty((B, L, H, v.shape[-1])).transpose(1, 2),
            q.new_empty((B, H, L), dtype=acc_dtype(q.dtype)))


def _fake_bwd(dout, q, k, v, out, lse, dlse, mask, scale, offset, left, right, softcap):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


flash_attn_bwd = define_op(
    "flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, Tensor? mask,"
    " float scale, int offset, int left, int right, float softcap) -> (Tensor, Tensor, Tensor)",
    _fake_bwd, "attention:flash_attn_bwd")


def _fwd_setup(ctx, inputs, output):
    q, k, v, mask, scale, offset, left, right, softcap = inputs
    out, lse = output
    ctx.set_materialize_grads(False)  # lse is rarely used: no zero dlse, and the kernel skips its term
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.args = (scale, offset, left, right, softcap)


def _fwd_backward(ctx, dout, dlse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * 9
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = flash_attn_bwd(unit_last(dout), q, k, v, out, lse,
                                None if dlse is None else dlse.contiguous(), mask, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


flash_attn_fwd = define_op(
    "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, int offset, int left, int right,"
    " float softcap) -> (Tensor, Tensor)",
    _fake_fwd, "attention:flash_attn_fwd", backward=_fwd_backward, setup_context=_fwd_setup)


# ---- public API ----
def _tensors_ok(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """kernel_ok for q, k, v (each non-empty); on GPU the Triton kernels' head dims, 16..256."""
    return (kernel_ok(q, k, v) and k.numel() > 0 and v.numel() > 0
            and (q.device.type == "cpu" or (16 <= q.shape[-1] <= 256 and 16 <= v.shape[-1] <= 256)))


def _sdpa_mask(attn_mask: Optional[Tensor], query: Tensor, S: int) -> Tuple[bool, Optional[Tensor]]:
    """(covered, additive mask expanded to (B, H, L, S) as stride-0 views; never materialised)."""
    if attn_mask is None:
        return True, None
    L = query.shape[-2]
    if (not isinstance(attn_mask, Tensor) or attn_mask.device != query.device or attn_mask.requires_grad
            or attn_mask.dim() > query.dim() or attn_mask.dtype not in (torch.bool, query.dtype)):
        return False, None
    target = tuple(query.shape[:-2]) + (L, S)
    try:
        if torch.broadcast_shapes(attn_mask.shape, target) != torch.Size(target):
            return False, None
    except RuntimeError:
        return False, None
    if attn_mask.dtype == torch.bool:  # torch's conversion: 0 where True, -inf where False
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            attn_mask.logical_not(), float("-inf"))
    m = attn_mask.expand(target)
    return True, (m if m.dim() == 4 else m.unsqueeze(0))


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                                 enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: softmax(q k^T * scale + mask) v with
    (batch, heads, L, E) / (batch, heads_kv, S, E) / (batch, heads_kv, S, Ev) inputs (or 3-D without batch);
    ``is_causal`` masks j > i (top-left aligned, as torch); ``enable_gqa`` lets heads_kv divide heads."""
    args = (query, key, value, attn_mask, dropout_p, is_causal)
    kwargs = dict(scale=scale, enable_gqa=enable_gqa)  # keyword-only in torch
    if not (_tensors_ok(query, key, value) and dropout_p == 0.0 and query.dim() in (3, 4)
            and key.dim() == query.dim() and value.dim() == query.dim()
            and key.shape[:-3] == query.shape[:-3] == value.shape[:-3]
            and key.shape[-1] == query.shape[-1] and key.shape[-2] == value.shape[-2]
            and key.shape[-3] == value.shape[-3]
            and (key.shape[-3] == query.shape[-3] or (enable_gqa and query.shape[-3] % key.shape[-3] == 0))
            and not (is_causal and attn_mask is not None)):
        return reference.scaled_dot_product_attention(*args, **kwargs)
    ok, mask = _sdpa_mask(attn_mask, query, key.shape[-2])
    if not ok:
        return reference.scaled_dot_product_attention(*args, **kwargs)
    q, k, v = (unit_last(t if t.dim() == 4 else t.unsqueeze(0)) for t in (query, key, value))
    sc = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out, _ = call_op(flash_attn_fwd, q, k, v, mask, sc, 0, -1, 0 if is_causal else -1, 0.0)
    return out if query.dim() == 4 else out.squeeze(0)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False, scale: Optional[float] = None,
                    window: Optional[Tuple[int, int]] = None, softcap: Optional[float] = None,
                    return_lse: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """softmax(cap(q k^T * scale)) v on (batch, heads, L, D) q and (batch, heads_kv, S, D) k, v (heads_kv divides
    heads). ``causal``: key j visible to query i when j <= i + S - L (bottom-right aligned, as flash-attn);
    ``window=(left, right)``: additionally i + S - L - left <= j <= i + S - L + right (-1: unbounded; None, the
    default, is no window: (-1, -1));
    ``softcap``: scores become softcap * tanh(scores / softcap). Rows that see no key give 0 (lse -inf).
    ``return_lse``: also return logsumexp of the scores per row, (batch, heads, L) float32 (float64 for
    float64 input), differentiable."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"flash_attention: {name} must be a 4-D (batch, heads, seq, dim) tensor, got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    B, H, L, D = q.shape
    if k.shape[0] != B or v.shape[0] != B or k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, heads and "
                         f"seq, with q's batch {B}")
    if k.shape[3] != D:
        raise ValueError(f"flash_attention: k's head dim {k.shape[3]} must equal q's {D}")
    if k.shape[1] == 0 or H % k.shape[1] != 0:
        raise ValueError(f"flash_attention: kv heads {k.shape[1]} must divide query heads {H}")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"flash_attention: q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.is_floating_point():
        raise TypeError(f"flash_attention: expected floating point inputs, got {q.dtype}")
    if window is None:
        window = (-1, -1)
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) for w in window)):
        raise ValueError(f"flash_attention: window must be None (no window) or a (left, right) pair of ints "
                         f"(-1: unbounded), got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap must be None or > 0, got {softcap}")
    left, right = window
    left = -1 if left < 0 else left
    right = 0 if causal else (-1 if right < 0 else right)
    sc = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not _tensors_ok(q, k, v):
        out, lse = reference.flash_attention(q, k, v, causal, sc, (left, right), softcap, True)
    else:
        out, lse = call_op(flash_attn_fwd, unit_last(q), unit_last(k), unit_last(v), None, sc, k.shape[2] - L, left,
                           right, float(softcap or 0.0))
    return (out, lse) if return_lse else out


__all__: List[str] = ["scaled_dot_product_attention", "flash_attention"]
