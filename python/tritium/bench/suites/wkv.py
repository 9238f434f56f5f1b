"""Benchmarks of RWKV-7's wkv recurrence against the naive reference (tritium.ops.wkv.wkv7_reference: the loop over
time of flash-linear-attention's naive dplr_recurrence, without its per-step clones) eager and compiled (forward and
backward: the loop with its step compiled, _compiled_steps). Shapes are (B, T, H, K) with V = K; w a log decay in
RWKV-7's range, a = -kappa, b = kappa * iclr. The headline shape is issue 24's bar: batch 8, length 1024, 12 heads
of size 64."""
import torch

import tritium
from tritium.bench.case import OpCase, compiled_step, esize
from tritium.ops.wkv import wkv7_reference, wkv7_reference_step


def _inputs(shape, dtype, device):
    B, T, H, K = shape

    def rn(*s):
        return torch.randn(*s, device=device)

    kappa = torch.nn.functional.normalize(rn(B, T, H, K), dim=-1)
    t = (rn(B, T, H, K), -0.6065 * torch.sigmoid(rn(B, T, H, K)), rn(B, T, H, K), rn(B, T, H, K), -kappa,
         kappa * torch.sigmoid(rn(B, T, H, K)))
    return tuple(x.to(dtype) for x in t)


def _tritium(r, w, k, v, a, b):
    return tritium.wkv7(r, w, k, v, a, b)[0]


def _eager(r, w, k, v, a, b):
    return wkv7_reference(r, w, k, v, a, b)[0]


def _compiled_steps(r, w, k, v, a, b):
    """wkv7_reference's loop with its step (wkv7_reference_step) under torch.compile: the fwdbwd compile baseline.
    torch.compile of the whole loop unrolls all its steps, and at length 1024 Inductor fails on the backward of that
    graph (a RecursionError after many minutes); compiling the loop's body is what a user does instead."""
    B, T, H, K = r.shape
    S = r.new_zeros(B, H, K, v.shape[-1])
    step = compiled_step(wkv7_reference_step)
    outs = []
    for t in range(T):
        S, o = step(S, *(x[:, t] for x in (r, w, k, v, a, b)), K ** -0.5)
        outs.append(o)
    return torch.stack(outs, 1)


def _bytes_fwd(s, d):  # read r, w, k, v, a, b; write o
    B, T, H, K = s
    return 7 * B * T * H * K * esize(d)


def _bytes_fwdbwd(s, d):  # + read do and the inputs twice (recompute, reverse walk); write six gradients
    B, T, H, K = s
    return (7 + 13) * B * T * H * K * esize(d)


# per (batch, head, step, state element): a^T S (2), the update (6), the output (2); the backward recomputes the
# forward and runs the adjoint (~3x)
def _flops_fwd(s, d):
    B, T, H, K = s
    return 10 * B * T * H * K * K


def _flops_fwdbwd(s, d):
    return 4 * _flops_fwd(s, d)


CASES = [
    OpCase("wkv", _inputs, _tritium, _eager, _bytes_fwd, _bytes_fwdbwd, flops_fwd=_flops_fwd,
           flops_fwdbwd=_flops_fwdbwd, shapes=((8, 1024, 12, 64), (8, 128, 12, 64)), dtypes=(torch.float32,),
           compiled_fwdbwd=_compiled_steps,
           note="RWKV-7 (tritium.wkv7) vs fla's naive recurrence algorithm (tritium.ops.wkv.wkv7_reference); "
                "fwdbwd's compile baseline compiles the loop's step (wkv7_reference_step)"),
]
