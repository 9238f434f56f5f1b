"""Benchmarks of Mamba's causal depthwise conv1d at Mamba-130M's shapes (d_inner 1536, d_conv 4), memory-bound:
bytes = elements read + written.

causal_conv1d (silu, with bias): the forward reads x and writes out (2 BDL); the backward reads dout and x and
writes dx (3 BDL); plus the (dim, width) weights and the bias. Eager is causal-conv1d's causal_conv1d_ref as a
user writes it: F.conv1d padded by width - 1 on both sides (groups = dim), sliced to L, then silu.
causal_conv1d_update (one decoding step, shape (batch, dim, state_len)): reads x and conv_state, writes out and
conv_state. Eager is causal_conv1d_update_ref: cat, copy into the state, F.conv1d, silu.
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, elems, esize

WIDTH = 4


def _conv_args(shape, dtype, device):
    B, D, L = shape
    return (torch.randn(B, D, L, dtype=dtype, device=device), torch.randn(D, WIDTH, dtype=dtype, device=device) / 2,
            torch.randn(D, dtype=dtype, device=device))


def _eager_conv(x, w, b):
    return F.silu(F.conv1d(x, w.unsqueeze(1), b, padding=w.shape[1] - 1, groups=w.shape[0])[..., :x.shape[-1]])


def _params(s, d):
    return s[1] * (WIDTH + 1) * esize(d)


def _conv_fwd(s, d):
    return 2 * elems(s) * esize(d) + _params(s, d)


def _conv_fwdbwd(s, d):
    return 5 * elems(s) * esize(d) + 3 * _params(s, d)  # + reading the params again and writing their grads


def _update_args(shape, dtype, device):
    B, D, S = shape
    return (torch.randn(B, D, dtype=dtype, device=device), torch.randn(B, D, S, dtype=dtype, device=device),
            torch.randn(D, WIDTH, dtype=dtype, device=device) / 2, torch.randn(D, dtype=dtype, device=device))


def _eager_update(x, state, w, b):
    x_new = torch.cat([state, x.unsqueeze(-1)], dim=-1)
    state.copy_(x_new[:, :, -state.shape[-1]:])
    return F.silu(F.conv1d(x_new, w.unsqueeze(1), b, groups=w.shape[0])[:, :, -1])


def _update_bytes(s, d):
    B, D, S = s
    return (2 * B * D + 2 * B * D * S) * esize(d) + D * (WIDTH + 1) * esize(d)


CASES = [
    OpCase("causal_conv1d", _conv_args, lambda x, w, b: tritium.causal_conv1d(x, w, b, activation="silu"),
           _eager_conv, _conv_fwd, _conv_fwdbwd, shapes=((8, 1536, 1024),),
           note="silu, bias; eager: F.conv1d (groups=dim, padded) + slice + silu (causal_conv1d_ref)"),
    OpCase("causal_conv1d_update", _update_args,
           lambda x, s, w, b: tritium.causal_conv1d_update(x, s, w, b, activation="silu"),
           _eager_update, _update_bytes, None, shapes=((8, 1536, WIDTH - 1),), grad_args=(),
           note="one decoding step, conv_state updated in place; eager: causal_conv1d_update_ref's cat, copy_, "
                "conv1d, silu"),
]
