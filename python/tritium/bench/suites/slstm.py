"""Benchmarks of xLSTM's sLSTM cell (tritium.slstm, the fused scan) against the step-by-step recurrence
(tritium.ops.slstm.slstm_reference: torch ops, a loop over time) eager and compiled. Shapes are (B, T, H, Dh): wx
(B, T, 4 H Dh) the gates' input preactivations (input gates N(0, 2^2), forget gates around +1.5, z and o unit
normals) in the case's dtype and R (4, H, Dh, Dh) float32 (the op's accumulation dtype) with a recurrence of unit
gain; the headline is the xLSTM LM's d_model 256 in 4 heads."""
import torch

import tritium
from tritium.bench.case import OpCase, esize
from tritium.ops.slstm import slstm_reference


def _inputs(shape, dtype, device):
    B, T, H, Dh = shape
    D = H * Dh
    wx = torch.randn(B, T, 4, D, device=device)
    wx[:, :, 0] *= 2
    wx[:, :, 1] += 1.5
    R = torch.randn(4, H, Dh, Dh, device=device) / Dh ** 0.5
    return wx.reshape(B, T, 4 * D).to(dtype), R


def _tritium(wx, R):
    return tritium.slstm(wx, R)[0]


def _eager(wx, R):
    return slstm_reference(wx, R)[0]


def _bytes_fwd(s, d):  # read wx, write h (the float32 states and gates saved for backward not counted)
    B, T, H, Dh = s
    return 5 * B * T * H * Dh * esize(d)


def _bytes_fwdbwd(s, d):  # + read dh, write dwx
    B, T, H, Dh = s
    return 10 * B * T * H * Dh * esize(d)


# the recurrent matvecs: per step and (batch, head) four (Dh) x (Dh, Dh) products; the backward twice that (dh and dR)
def _flops_fwd(s, d):
    B, T, H, Dh = s
    return 8 * B * T * H * Dh * Dh


def _flops_fwdbwd(s, d):
    return 3 * _flops_fwd(s, d)


CASES = [
    OpCase("slstm", _inputs, _tritium, _eager, _bytes_fwd, _bytes_fwdbwd, flops_fwd=_flops_fwd,
           flops_fwdbwd=_flops_fwdbwd, shapes=((8, 256, 4, 64), (8, 1024, 4, 64)),
           dtypes=(torch.float32, torch.bfloat16),
           note="xLSTM's sLSTM cell, fused scan (tritium.slstm) vs the recurrence (tritium.ops.slstm.slstm_reference)"),
]
