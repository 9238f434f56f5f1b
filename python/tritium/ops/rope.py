"""Rotary position embedding: ``rope`` (q and k in one kernel, Llama half or GPT-J interleaved layout, partial
rotary dim, any positions) and ``rope_tables`` (cos/sin for base, linear, NTK, Llama-3 and YaRN scaling).

The backward of a rotation is the rotation by -theta: the same kernel with the sine negated. The tables are
constants (no gradient); if they require grad, or anything else is outside the kernels (dtype, device), the
call goes explicitly to ``tritium.reference.rope``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from ._library import call_op, define_op, kernel_ok, unit_last


def _fake_rope(q, k, cos, sin, positions, interleaved, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, positions, interleaved, inverse = inputs
    ctx.save_for_backward(cos, sin, positions)
    ctx.flags = (interleaved, inverse)


def _rope_backward(ctx, dq, dk):
    cos, sin, positions = ctx.saved_tensors
    interleaved, inverse = ctx.flags
    dq = torch.zeros(ctx.q_shape, dtype=ctx.q_dtype, device=cos.device) if dq is None else dq
    dk = torch.zeros(ctx.k_shape, dtype=ctx.k_dtype, device=cos.device) if dk is None else dk
    gq, gk = call_op(rope_fwd, unit_last(dq), unit_last(dk), cos, sin, positions, interleaved, not inverse)
    return gq, gk, None, None, None, None, None


def _rope_setup_shapes(ctx, inputs, output):
    _rope_setup(ctx, inputs, output)
    ctx.q_shape, ctx.q_dtype = inputs[0].shape, inputs[0].dtype
    ctx.k_shape, ctx.k_dtype = inputs[1].shape, inputs[1].dtype


rope_fwd = define_op(
    "rope_fwd(Tensor q, Tensor k, Tensor cos, Tensor sin, Tensor positions, bool interleaved, bool inverse)"
    " -> (Tensor, Tensor)", _fake_rope, "rope:rope_fwd", backward=_rope_backward,
    setup_context=_rope_setup_shapes)


def _check(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor]) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            raise TypeError(f"rope: {name} must be a Tensor, got {type(t).__name__}")
    if q.dim() not in (3, 4) or k.dim() != q.dim():
        raise ValueError(f"rope: q and k must both be (batch, seq, heads, head_dim) or (tokens, heads, head_dim), "
                         f"got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on all dims but heads")
    if cos.dim() != 2 or cos.shape != sin.shape:
        raise ValueError(f"rope: cos and sin must be (max_positions, rotary_dim // 2) tables of one shape, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if 2 * cos.shape[1] > q.shape[-1]:
        raise ValueError(f"rope: rotary dim {2 * cos.shape[1]} exceeds head dim {q.shape[-1]}")
    if not q.is_floating_point() or k.dtype != q.dtype:
        raise TypeError(f"rope: q and k must share a floating dtype, got {q.dtype} and {k.dtype}")
    if positions is not None:
        if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.is_complex():
            raise TypeError("rope: positions must be an integer tensor")
        if positions.shape != q.shape[:-2]:
            raise ValueError(f"rope: positions must have shape {tuple(q.shape[:-2])} (q's dims before heads), got "
                             f"{tuple(positions.shape)}")


def rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, positions: Optional[Tensor] = None,
         interleaved: bool = False) -> Tuple[Tensor, Tensor]:
    """Rotary embedding of q (batch, seq, heads, head_dim) and k (batch, seq, kv_heads, head_dim), or of 3-D
    (tokens, heads, head_dim) tensors, in one kernel. cos, sin: (max_positions, rotary_dim // 2) float32
    tables (``rope_tables``); rotary_dim <= head_dim (the remaining dims pass through). positions: integers
    shaped q.shape[:-2] (None: 0..seq-1 along the seq dim). ``interleaved``: GPT-J pairs (2i, 2i+1) instead of
    Llama's halves (i, i + rotary_dim/2). Returns new (q, k)."""
    _check(q, k, cos, sin, positions)
    lead = q.shape[:-2]
    if positions is None:
        seq = q.shape[-3] if q.dim() == 4 else q.shape[0]
        positions = torch.arange(seq, device=q.device)
        if q.dim() == 4:
            positions = positions.expand(lead)
    if (not kernel_ok(q, k) or k.numel() == 0 or any(t.device != q.device for t in (cos, sin, positions))
            or cos.requires_grad or sin.requires_grad or cos.dtype != torch.float32 or sin.dtype != torch.float32):
        return reference.rope(q, k, cos, sin, positions, interleaved)
    q3 = unit_last(q.reshape((-1,) + q.shape[-2:]))
    k3 = unit_last(k.reshape((-1,) + k.shape[-2:]))
    pos = positions.reshape(-1).to(torch.int64).contiguous()
    qo, ko = call_op(rope_fwd, q3, k3, cos.contiguous(), sin.contiguous(), pos, bool(interleaved), False)
    return qo.view(q.shape), ko.view(k.shape)


def _inv_freq(rotary_dim: int, base: float) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))


def rope_tables(max_positions: int, rotary_dim: int, base: float = 10000.0, scaling: Optional[dict] = None,
                device=None) -> Tuple[Tensor, Tensor]:
    """(cos, sin), each (max_positions, rotary_dim // 2) float32, of the angles position * inv_freq with
    inv_freq_i = base ** (-2i / rotary_dim), computed in float64. ``scaling`` (HF ``rope_scaling`` dicts;
    the kind under "type" or "rope_type"):
      None / "default"; {"type": "linear", "factor": f} (positions / f);
      {"type": "ntk", "factor": f} (static NTK-aware: base * f ** (R / (R - 2)));
      {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"};
      {"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast"=32, "beta_slow"=1,
       "attention_factor"=0.1 ln(factor) + 1, "mscale", "mscale_all_dim"} (cos and sin scaled by the
       attention factor, as HF does)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rope_tables: rotary_dim must be a positive even number, got {rotary_dim}")
    if max_positions <= 0:
        raise ValueError(f"rope_tables: max_positions must be positive, got {max_positions}")
    kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    inv = _inv_freq(rotary_dim, base)
    attention_factor = 1.0
    if kind == "default":
        pass
    elif kind == "linear":
        inv = inv / float(scaling["factor"])
    elif kind in ("ntk", "dynamic"):
        f = float(scaling["factor"])
        inv = _inv_freq(rotary_dim, base * f ** (rotary_dim / (rotary_dim - 2)))
    elif kind == "llama3":
        f = float(scaling["factor"])
        low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
        old = float(scaling.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv
        low_wl, high_wl = old / low, old / high
        smooth = ((old / wavelen) - low) / (high - low)
        smoothed = (1 - smooth) * inv / f + smooth * inv
        inv = torch.where(wavelen > low_wl, inv / f, inv)
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = torch.where(medium, smoothed, inv)
    elif kind == "yarn":
        f = float(scaling["factor"])
        old = float(scaling.get("original_max_position_embeddings", max_positions))
        beta_fast, beta_slow = float(scaling.get("beta_fast", 32)), float(scaling.get("beta_slow", 1))

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            if scaling.get("mscale") and scaling.get("mscale_all_dim"):
                attention_factor = mscale(f, scaling["mscale"]) / mscale(f, scaling["mscale_all_dim"])
            else:
                attention_factor = mscale(f)

        def correction_dim(rot):
            return (rotary_dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo = max(math.floor(correction_dim(beta_fast)), 0)
        hi = min(math.ceil(correction_dim(beta_slow)), rotary_dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
        extrapolation = 1 - ramp
        inv = (inv / f) * (1 - extrapolation) + inv * extrapolation
    else:
        raise ValueError(f"rope_tables: unknown scaling type {kind!r} (expected linear, ntk, llama3 or yarn)")
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    cos = (angles.cos() * attention_factor).to(torch.float32)
    sin = (angles.sin() * attention_factor).to(torch.float32)
    return cos.to(device), sin.to(device)


__all__: List[str] = ["rope", "rope_tables"]
