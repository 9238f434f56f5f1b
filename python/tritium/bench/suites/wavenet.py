"""Benchmarks of WaveNet's gated activation (tritium.wavenet_gate: tanh(a) * sigmoid(g) over the channel halves of a
dilated convolution's output) against the eager torch formulation (chunk, tanh, sigmoid, product) and
torch.compile of it. Shapes (batch, 2C, T); the first: 16 windows of 4096 samples at 64 gate channels."""
import torch

import tritium
from tritium import reference
from tritium.bench.case import OpCase, esize


def _inputs(shape, dtype, device):
    return (torch.randn(*shape, device=device).to(dtype),)


def _tritium(h):
    return tritium.wavenet_gate(h)


def _eager(h):
    return reference.wavenet_gate(h)


def _bytes_fwd(s, d):  # read h (2n), write z (n)
    B, C2, T = s
    return 1.5 * B * C2 * T * esize(d)


def _bytes_fwdbwd(s, d):  # + read dz (n) and h (2n), write dh (2n)
    B, C2, T = s
    return (1.5 + 2.5) * B * C2 * T * esize(d)


CASES = [
    OpCase("wavenet_gate", _inputs, _tritium, _eager, _bytes_fwd, _bytes_fwdbwd,
           shapes=((16, 128, 4096), (16, 64, 256), (1, 64, 16000)),
           note="tanh(a) * sigmoid(g) (the WaveNet gate) vs the eager chunk/tanh/sigmoid/mul"),
]
