"""Benchmarks of the weight-only quantized linear op (tritium.ops.quant, docs/quantization.md).

``quant_linear``, shape = tokens x in x out x bits x int8_act: the embedded SmolLM2-135M's largest products as its
GGUF stores them, the fused gate/up projection (576 -> 3072, Q4_1: 4-bit, float16 scales and mins, groups of 32)
and the tied LM head (576 -> 49152, Q8_0: symmetric 8-bit, groups of 32), at a decode step of one sequence and of
16, with one and two int8 activation terms (the activation modes of Llama.set_int8_activations 1 and 2; 16 rows of
bfloat16 x on 4-bit weights with two terms take the avx512_bf16 set's exact pair products where the CPU has them,
quant.activation_terms). The rows at 1 and 16 tokens say what a batch-16 decode step costs over batch 1 product by
product (docs/quantization.md "What the modes cost at batch"). The baseline is what a user writes without the op:
the weight dequantised by torch ops (scales * q + mins, as reference.quant_weight) then F.linear.

``lora_linear_int4``, shape = tokens x in x out x r (the QLoRA row's shape, bench/suites/nf4.py): tritium.lora_linear
on an int4 base (groups of 32, float16 scales and mins: quantize_'s int4) against PEFT's LoRA layer on a torch
Linear holding the dequantised weight in x's dtype (no int4 LoRA layer exists to compare with: this is what a
float base costs), gradients of x, lora_A and lora_B.
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, esize
from tritium.bench.suites.lora import ALPHA, peft_lora_call
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


_LORA_LAYERS = {}


def _lora_args(shape, dtype, device):
    M, K, N, r = shape
    w = _weight(N, K, 4, device)[0]
    x = torch.randn(M, K, dtype=dtype, device=device)
    b = torch.randn(N, device=device).to(dtype)
    a = (torch.randn(r, K, device=device) / K ** 0.5).to(dtype)
    bb = (torch.randn(N, r, device=device) * 0.1).to(dtype)
    return x, w.qdata, w.scales, w.mins, b, a, bb


def _lora_tritium(x, qd, scales, mins, b, a, bb):
    w = QuantizedWeight(qd, scales, mins, 4, BLOCK, b.shape[0], x.shape[1])
    return tritium.lora_linear(x, w, b, a, bb, ALPHA / a.shape[0])


def _lora_peft(x, qd, scales, mins, b, a, bb):
    """PEFT's LoRA layer on a torch Linear holding the dequantised weight (one module per shape and dtype)."""
    n, k = b.shape[0], x.shape[1]

    def base():
        lin = torch.nn.Linear(k, n, device=x.device, dtype=x.dtype)
        with torch.no_grad():
            lin.weight.copy_(QuantizedWeight(qd, scales, mins, 4, BLOCK, n, k).dequantize(x.dtype))
            lin.bias.copy_(b)
        return lin.requires_grad_(False)

    return peft_lora_call(_LORA_LAYERS, (n, k, a.shape[0], x.dtype, x.device), base, x, a, bb)


def _lora_bytes(fwdbwd):
    def f(s, d):   # x read, the int4 weight (+ scales and mins) read, y written; the backward reads dy, writes dx
        M, K, N, r = s
        w = N * K / 2 + N * K / BLOCK * 4
        return (2 * M * K + M * N + 2 * w) * esize(d) if fwdbwd else (M * K + M * N) * esize(d) + w
    return f


def _lora_flops(fwdbwd):
    def f(s, d):
        M, K, N, r = s
        return (2 if fwdbwd else 1) * 2.0 * M * K * N + (3 if fwdbwd else 1) * 2.0 * M * r * (K + N)
    return f


CASES = [
    OpCase("quant_linear", _args, _tritium, _eager, _bytes, flops_fwd=_flops,
           shapes=tuple((m, 576, n, bits, act) for m in (16, 1) for n, bits in ((3072, 4), (49152, 8))
                        for act in (1, 2)),
           dtypes=(torch.bfloat16, torch.float32),
           note="shape = tokens x in x out x bits x int8_act; SmolLM2-135M's gate/up (Q4_1) and LM head (Q8_0); "
                "eager: the weight dequantised by torch ops, then F.linear; forward only (frozen weight)"),
    OpCase("lora_linear_int4", _lora_args, _lora_tritium, _lora_peft, _lora_bytes(False), _lora_bytes(True),
           flops_fwd=_lora_flops(False), flops_fwdbwd=_lora_flops(True), shapes=((8192, 576, 1536, 16),),
           grad_args=(0, 5, 6),
           note="shape = tokens x in x out x r; int4 base in groups of 32 (float16 scales and mins), alpha 32, bias, "
                "no dropout; eager: PEFT's LoRA Linear on a torch Linear holding the dequantised weight"),
]
