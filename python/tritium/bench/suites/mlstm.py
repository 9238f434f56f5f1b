"""Benchmarks of xLSTM's mLSTM cell (tritium.mlstm, the chunkwise kernels) against the step-by-step recurrence
(tritium.ops.mlstm.mlstm_reference: the stabilised recurrent form in torch ops, a loop over time) eager and
compiled. Shapes are (B, T, H, D) with q, k, v (B, H, T, D) (DK = DV = D) and the gate preactivations i, f (B, H, T)
(input gates N(0, 1), forget gates around sigmoid(1.5)). The compile baseline is the loop with its step compiled
(_compiled_steps), as for selective_scan: torch.compile of the whole loop unrolls every step, and at length 1024
its forward takes over ten minutes to compile and its backward does not finish in twenty."""
import torch

import tritium
import torch.nn.functional as F

from tritium.bench.case import OpCase, compiled_step, esize
from tritium.ops.mlstm import mlstm_reference, mlstm_reference_step


def _inputs(shape, dtype, device):
    B, T, H, D = shape

    def rn(*s):
        return torch.randn(*s, device=device)

    t = (rn(B, H, T, D), rn(B, H, T, D), rn(B, H, T, D), rn(B, H, T), 1.5 + rn(B, H, T))
    return tuple(x.to(dtype) for x in t)


def _tritium(q, k, v, i, f):
    return tritium.mlstm(q, k, v, i, f)[0]


def _eager(q, k, v, i, f):
    return mlstm_reference(q, k, v, i, f)[0]


def _compiled_steps(q, k, v, i, f):
    """mlstm_reference's loop with its step (mlstm_reference_step) under torch.compile: the compile baseline, what
    a user compiles when the whole loop does not compile in reasonable time."""
    B, H, T, D = q.shape
    C, n, m = q.new_zeros(B, H, D, v.shape[-1]), q.new_zeros(B, H, D), q.new_zeros(B, H)
    logf = F.logsigmoid(f)
    step = compiled_step(mlstm_reference_step)
    outs = []
    for t in range(T):
        C, n, m, h = step(C, n, m, q[:, :, t] * D ** -0.5, k[:, :, t], v[:, :, t], logf[:, :, t], i[:, :, t], 1e-6)
        outs.append(h)
    return torch.stack(outs, 2)


def _bytes_fwd(s, d):  # read q, k, v, i, f; write h
    B, T, H, D = s
    return (4 * D + 2) * B * T * H * esize(d)


def _bytes_fwdbwd(s, d):  # + read dh and the inputs again (recompute); write five gradients
    B, T, H, D = s
    return (4 * D + 2 + 9 * D + 4) * B * T * H * esize(d)


# per (batch, head) and chunk of L = 64 steps: the (L, L) scores and their use against v (4 L^2 D), the state's
# share (4 L D^2) and its move to the chunk's end (2 L D^2); the backward recomputes the forward and runs about twice
# its products
def _flops_fwd(s, d):
    B, T, H, D = s
    L = min(64, T)
    return B * H * T * (4 * L * D + 6 * D * D)


def _flops_fwdbwd(s, d):
    return 4 * _flops_fwd(s, d)


CASES = [
    OpCase("mlstm", _inputs, _tritium, _eager, _bytes_fwd, _bytes_fwdbwd, flops_fwd=_flops_fwd,
           flops_fwdbwd=_flops_fwdbwd, shapes=((8, 1024, 8, 64), (8, 128, 8, 64)),
           dtypes=(torch.float32, torch.bfloat16), compiled_fwdbwd=_compiled_steps, compiled_fwd=_compiled_steps,
           note="xLSTM's mLSTM cell, chunkwise (tritium.mlstm) vs the recurrence (tritium.ops.mlstm.mlstm_reference); "
                "compile: the loop with its step compiled"),
]
