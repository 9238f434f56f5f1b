"""Benchmarks of 2-D max pooling (tritium.max_pool2d) against torch's F.max_pool2d and torch.compile of it, 2x2
windows at stride 2 on (N, C, H, W) inputs. The first shape: the Siamese CNN's pooling layer (128 digits, 32 channels,
8x8); then a larger CNN's feature map."""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, esize


def _inputs(shape, dtype, device):
    return (torch.randn(*shape, device=device).to(dtype),)


def _bytes_fwd(s, d):  # read x (n), write y (n / 4) and its window offsets (n / 4 bytes)
    n = s[0] * s[1] * s[2] * s[3]
    return n * esize(d) * 1.25 + n / 4


def _bytes_fwdbwd(s, d):  # + read dy (n / 4) and the offsets (n / 4 bytes), write dx (n)
    n = s[0] * s[1] * s[2] * s[3]
    return _bytes_fwd(s, d) + n * esize(d) * 1.25 + n / 4


CASES = [
    OpCase("max_pool2d", _inputs, lambda x: tritium.max_pool2d(x, 2), lambda x: F.max_pool2d(x, 2), _bytes_fwd,
           _bytes_fwdbwd, shapes=((128, 32, 8, 8), (32, 64, 56, 56)),
           note="2x2 max pooling, stride 2, channels first, vs F.max_pool2d"),
]
