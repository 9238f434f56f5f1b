"""Benchmarks of attention and RoPE.

attention_causal: tritium's SDPA against the naive eager path a user writes (matmul, causal mask, softmax,
matmul: O(seq^2) memory). attention_causal_vs_sdpa: the same call against torch's own fused SDPA (its CPU
flash kernel), the bar tritium must stay near. Shapes (batch, heads, seq, head_dim); FLOPs: 4 B H L S D,
halved for causal; bytes: q, k, v read and o written once. track_memory records the peak extra memory of
one call (O(seq) for the flash kernels, O(seq^2) for the naive path).
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, elems, esize


def _qkv(shape, dtype, device):
    return tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))


def _naive_causal(q, k, v):
    L, S = q.shape[-2], k.shape[-2]
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s.masked_fill(torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


def _tritium_causal(q, k, v):
    return tritium.scaled_dot_product_attention(q, k, v, is_causal=True)


def _sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _attn_bytes(shape, dtype):
    return 4 * elems(shape) * esize(dtype)


def _attn_bytes_bwd(shape, dtype):
    return (4 + 8) * elems(shape) * esize(dtype)  # + read q, k, v, o, do, write dq, dk, dv (and re-read)


def _causal_flops(shape, dtype):
    B, H, L, D = shape
    return 4 * B * H * L * L * D / 2


def _causal_flops_bwd(shape, dtype):
    return _causal_flops(shape, dtype) * 3.5  # backward: 5 matmuls to forward's 2, + the recomputed QK^T


ATTN_SHAPES = ((1, 8, 4096, 64), (1, 8, 2048, 64))


# rope: q (batch, seq, heads, dim), k with a quarter of the heads (GQA); eager = the HF rotate_half form
def _rope_inputs(shape, dtype, device):
    B, T, H, D = shape
    q = torch.randn(B, T, H, D, dtype=dtype, device=device)
    k = torch.randn(B, T, max(1, H // 4), D, dtype=dtype, device=device)
    cos, sin = tritium.rope_tables(T, D, device=device)
    return q, k, cos, sin


def _rotate_half(x):
    a, b = x.chunk(2, -1)
    return torch.cat((-b, a), -1)


def _rope_eager(q, k, cos, sin):
    c = torch.cat((cos, cos), -1)[:, None, :].to(q.dtype)
    s = torch.cat((sin, sin), -1)[:, None, :].to(q.dtype)
    return q * c + _rotate_half(q) * s, k * c + _rotate_half(k) * s


def _rope_bytes(shape, dtype):
    B, T, H, D = shape
    return 2 * B * T * (H + max(1, H // 4)) * D * esize(dtype) + 4 * T * D


CASES = [
    OpCase("attention_causal", _qkv, _tritium_causal, _naive_causal, _attn_bytes, _attn_bytes_bwd,
           flops_fwd=_causal_flops, flops_fwdbwd=_causal_flops_bwd, shapes=ATTN_SHAPES, track_memory=True,
           note="eager: naive matmul + mask + softmax + matmul"),
    OpCase("attention_causal_vs_sdpa", _qkv, _tritium_causal, _sdpa_causal, _attn_bytes, _attn_bytes_bwd,
           flops_fwd=_causal_flops, flops_fwdbwd=_causal_flops_bwd, shapes=ATTN_SHAPES, track_memory=True,
           note="eager: torch's own F.scaled_dot_product_attention (fused CPU flash kernel)"),
    OpCase("rope", _rope_inputs, lambda q, k, c, s: tritium.rope(q, k, c, s), _rope_eager, _rope_bytes,
           lambda s, d: 2 * _rope_bytes(s, d), shapes=((1, 4096, 32, 128), (8, 512, 32, 64)), grad_args=(0, 1),
           note="eager: HF rotate_half form (cos/sin gathered, 2 muls + cat per tensor)"),
]
