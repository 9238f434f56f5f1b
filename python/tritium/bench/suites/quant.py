"""Benchmarks of the weight-only quantized linear op (tritium.ops.quant, docs/quantization.md).

``quant_linear``, shape = tokens x in x out x bits x int8_act: the embedded SmolLM2-135M's largest products as its
GGUF stores them, the fused gate/up projection (576 -> 3072, Q4_1: 4-bit, float16 scales and mins, groups of 32)
and the tied LM head (576 -> 49152, Q8_0: symmetric 8-bit, groups of 32), at a decode step of one sequence and of
16, with one and two int8 activation terms (the activation modes of Llama.set_int8_activations 1 and 2; 16 rows of
bfloat16 x on 4-bit weights with two terms take the avx512_bf16 set's exact pair products where the CPU has them,
quant.activation_terms). The rows at 1 and 16 tokens say what a batch-16 decode step costs over batch 1 product by
product (docs/quantization.md "What the modes cost at batch"). The baseline is what a user writes without the op:
the weight dequantised by torch ops (scales * q + mins, as reference.quant_weight) then F.linear.
"""
import torch
import torch.nn.functional as F

from tritium.bench.case import OpCase, esize
from tritium.ops.quant import BLOCK, QuantizedWeight, quant_linear

_WEIGHTS = {}


def _weight(n: int, k: int, bits: int, device):
    """A random weight of the embedded file's format for its bits (4: Q4_1, 8: Q8_0), one per shape: the packed
    QuantizedWeight and its logical (q, scales, mins)."""
    key = (n, k, bits, device)
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(0)
        q = torch.randint(0, 2 ** bits, (n, k), generator=g, dtype=torch.uint8)
        scales = (torch.rand(n, k // BLOCK, generator=g) * 0.01 + 0.001).half()
        mins = (torch.randn(n, k // BLOCK, generator=g) * 0.05).half() if bits == 4 else None
        _WEIGHTS[key] = (QuantizedWeight.from_logical(q, scales, mins, bits, BLOCK, device),
                         (q.to(device), scales.to(device), None if mins is None else mins.to(device)))
    return _WEIGHTS[key]


def _args(shape, dtype, device):
    M, K, N, bits, act = shape
    w = _weight(N, K, bits, device)[0]
    return torch.randn(M, K, dtype=dtype, device=device), w.qdata, w.scales, w.mins, bits, N, K, act


def _tritium(x, qd, scales, mins, bits, n, k, act):
    return quant_linear(x, qd, scales, mins if mins.numel() else None, bits, BLOCK, n, k, act)


def _eager(x, qd, scales, mins, bits, n, k, act):
    """The weight dequantised by torch ops from its logical form (scales * q + mins per group), then F.linear."""
    q, s, m = _weight(n, k, bits, x.device)[1]
    w = s.float().repeat_interleave(BLOCK, 1) * (q.float() if m is not None else q.float() - 2 ** (bits - 1))
    if m is not None:
        w = w + m.float().repeat_interleave(BLOCK, 1)
    return F.linear(x, w.to(x.dtype))


def _bytes(s, d):   # x read, the packed weight and its scales (and mins) read, y written
    M, K, N, bits, _ = s
    w = N * K * bits / 8 + N * K / BLOCK * 2 * (2 if bits == 4 else 1)
    return (M * K + M * N) * esize(d) + w


def _flops(s, d):
    M, K, N = s[:3]
    return 2.0 * M * K * N


CASES = [
    OpCase("quant_linear", _args, _tritium, _eager, _bytes, flops_fwd=_flops,
           shapes=tuple((m, 576, n, bits, act) for m in (16, 1) for n, bits in ((3072, 4), (49152, 8))
                        for act in (1, 2)),
           dtypes=(torch.bfloat16, torch.float32),
           note="shape = tokens x in x out x bits x int8_act; SmolLM2-135M's gate/up (Q4_1) and LM head (Q8_0); "
                "eager: the weight dequantised by torch ops, then F.linear; forward only (frozen weight)"),
]
