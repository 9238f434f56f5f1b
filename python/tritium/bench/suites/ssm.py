"""Benchmarks of Mamba's selective scan against mamba_ssm's reference algorithm (tritium.reference.selective_scan:
selective_scan_ref's steps, the (batch, dim, L, N) decay and input tensors then a loop over time) eager and
compiled (forward and forward+backward: the loop with its step compiled, _compiled_steps, since torch.compile of
the whole reference unrolls its length-long loop and takes minutes even for the forward). Both walk the loop over
unbind()'s slices (_steps): the reference's indexing costs O(L^2) in the backward. Shapes are (batch, dim,
L, N); B and C per step (batch, N, L); D, z, delta_bias and softplus on, as in a Mamba block. The headline shape is
issue 24's bar: batch 8, dim 768, L 1024, N 16."""
import torch
import torch.nn.functional as F

import tritium
from tritium._dtypes import acc_dtype
from tritium.bench.case import OpCase, compiled_step, esize


def _scan_inputs(shape, dtype, device):
    batch, dim, L, N = shape

    def rn(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, device=device) * scale + shift).to(dtype)

    f32 = torch.float64 if dtype == torch.float64 else torch.float32
    return (rn(batch, dim, L), rn(batch, dim, L, scale=0.5, shift=-1.0),
            -torch.exp(torch.randn(dim, N, device=device, dtype=f32) * 0.5),
            rn(batch, N, L), rn(batch, N, L), torch.randn(dim, device=device, dtype=f32), rn(batch, dim, L),
            torch.randn(dim, device=device, dtype=f32) * 0.1)


def _tritium_scan(u, delta, A, B, C, D, z, bias):
    return tritium.selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True)


def _scan_step(x, dA, dBu, c):
    """One step of reference.selective_scan's loop: x (batch, dim, N) -> (the new x, y (batch, dim))."""
    x = dA * x + dBu
    return x, (x * c).sum(-1)


def _steps(u, delta, A, B, C, D, z, bias, step=_scan_step):
    """reference.selective_scan (B, C per step, D, z, delta_bias, softplus on) with its loop walking unbind()'s
    slices, each step's body `step`. The reference's own loop indexes deltaA[:, :, i], whose backward builds a zero
    tensor of the whole (batch, dim, L, N) per step: O(L^2) memory traffic, minutes a call at the headline shape
    (its eager fwd+bwd took 384 s), a cost no one writing the loop for speed keeps. The rest is the reference's
    code, so values are the same."""
    acc = acc_dtype(u.dtype)
    u32, delta = u.to(acc), F.softplus(delta.to(acc) + bias[:, None].to(acc))
    deltaA = torch.exp(delta[..., None] * A.to(acc)[None, :, None, :])                  # (batch, dim, L, N)
    deltaB_u = (delta * u32)[..., None] * B.to(acc)[:, None].transpose(2, 3)            # (batch, dim, L, N)
    Cv = C.to(acc)[:, None]                                                             # (batch, 1, N, L)
    x = u32.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for dA, dBu, c in zip(deltaA.unbind(2), deltaB_u.unbind(2), Cv.unbind(3)):
        x, y = step(x, dA, dBu, c)
        ys.append(y)
    out = (torch.stack(ys, 2) + u32 * D.to(acc)[:, None]) * F.silu(z.to(acc))
    return out.to(u.dtype)


def _compiled_steps(u, delta, A, B, C, D, z, bias):
    """The eager baseline (_steps) with its loop's body under torch.compile: the compile baseline, forward and
    forward+backward. torch.compile of the whole loop unrolls it: the forward's compile takes minutes, and compiling
    the backward of that graph takes very long or fails (wkv's did, with a RecursionError); compiling the loop's
    body is what a user does instead."""
    return _steps(u, delta, A, B, C, D, z, bias, step=compiled_step(_scan_step))


def _bytes_fwd(s, d):  # read u, delta, z, B, C; write out
    batch, dim, L, N = s
    return 4 * batch * dim * L * esize(d) + 2 * batch * N * L * esize(d)


def _bytes_fwdbwd(s, d):  # + read dout, u, delta, z, B, C, the chunk states; write du, ddelta, dz, dB, dC
    batch, dim, L, N = s
    return 11 * batch * dim * L * esize(d) + 6 * batch * N * L * 4


# per (batch, channel, step, state): exp(dt A), the state's multiply-add, the input term, the output's
# multiply-add (~6 flops, the exp counted as one); the backward recomputes the forward and runs the adjoint (~3x)
def _flops_fwd(s, d):
    batch, dim, L, N = s
    return 6 * batch * dim * L * N


def _flops_fwdbwd(s, d):
    return 4 * _flops_fwd(s, d)


CASES = [
    OpCase("selective_scan", _scan_inputs, _tritium_scan, _steps, _bytes_fwd, _bytes_fwdbwd,
           flops_fwd=_flops_fwd, flops_fwdbwd=_flops_fwdbwd,
           shapes=((8, 768, 1024, 16), (1, 1536, 2048, 16), (8, 768, 128, 64)),
           dtypes=(torch.float32, torch.bfloat16), track_memory=True, compiled_fwdbwd=_compiled_steps,
           compiled_fwd=_compiled_steps,
           note="vs mamba_ssm's selective_scan_ref algorithm (tritium.reference.selective_scan) with its loop over "
                "unbind()'s slices; the compile baseline (fwd and fwdbwd) compiles the loop's step: compiling the "
                "whole loop takes minutes"),
]
