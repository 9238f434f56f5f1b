"""Benchmark of lora_linear against PEFT's LoRA Linear layer (peft.tuners.lora.Linear) on the same frozen base layer,
at a SmolLM2-135M MLP projection's shape: shape = tokens x in x out x r, lora_alpha 32, no dropout, bias on.

The baseline runs PEFT's own module (its forward: the base layer, then lora_B(lora_A(x)) * scaling added) with the
base weight, bias and adapter weights passed in through torch.func.functional_call, so eager and torch.compile take
the same tensors as tritium; the adapters in the base's dtype (PEFT's autocast_adapter_dtype=False: its default
float32 adapters on a bfloat16 base are slower still). Gradients of x, lora_A and lora_B (the base is frozen).

Compute-bound: 2 M K N + 2 M r (K + N) FLOPs forward; forward + backward adds the input gradient's 2 M K N and the
adapter's 4 M r (K + N) (dy B, dB, dA and the low-rank part of dx).
"""
import torch

import tritium
from tritium.bench.case import OpCase, esize

ALPHA = 32.0
_LAYERS = {}


def _args(shape, dtype, device):
    M, K, N, r = shape
    x = torch.randn(M, K, dtype=dtype, device=device)
    w = (torch.randn(N, K, device=device) / K ** 0.5).to(dtype)
    b = torch.randn(N, device=device).to(dtype)
    a = (torch.randn(r, K, device=device) / K ** 0.5).to(dtype)
    bb = (torch.randn(N, r, device=device) * 0.1).to(dtype)   # PEFT starts B at zero; any values time the same
    return x, w, b, a, bb


def _tritium(x, w, b, a, bb):
    return tritium.lora_linear(x, w, b, a, bb, ALPHA / a.shape[0])


def peft_lora_call(cache: dict, key, make_base, x, a, bb, params=None):
    """PEFT's LoRA Linear layer (peft.tuners.lora.Linear: r = lora_A's rows, lora_alpha ALPHA, no dropout, adapters
    in x's dtype) around the base layer ``make_base()`` returns, built once per ``key`` in ``cache``, called on x
    through torch.func.functional_call with the adapter weights a (r, in) and bb (out, r) and ``params`` (the base
    layer's tensors by name, for a base that takes them per call). The baseline of every LoRA row: on a float base
    (here), on bitsandbytes' NF4 Linear4bit (suites/nf4.py) and on the dequantised int4 weight (suites/quant.py)."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    layer = cache.get(key)
    if layer is None:
        r = a.shape[0]
        layer = LoraLinear(make_base(), "default", LoraConfig(r=r, lora_alpha=ALPHA, lora_dropout=0.0), r=r,
                           lora_alpha=ALPHA).to(x.dtype)
        cache[key] = layer
    tensors = {"lora_A.default.weight": a, "lora_B.default.weight": bb, **(params or {})}
    return torch.func.functional_call(layer, tensors, (x,), strict=False)


def _peft(x, w, b, a, bb):
    """PEFT's LoRA Linear layer on a torch Linear, its weight and bias passed in per call."""
    return peft_lora_call(_LAYERS, (tuple(w.shape), a.shape[0], w.dtype, w.device),
                          lambda: torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype), x, a, bb,
                          {"base_layer.weight": w, "base_layer.bias": b})


def _flops(fwdbwd):
    def f(s, d):
        M, K, N, r = s
        return (2 if fwdbwd else 1) * 2.0 * M * K * N + (3 if fwdbwd else 1) * 2.0 * M * r * (K + N)
    return f


def _bytes(fwdbwd):
    def f(s, d):   # x, W read and y written; with the backward dy read, x and W read again and dx written
        M, K, N, r = s
        return ((3 * M * K + 2 * N * K + 2 * M * N) if fwdbwd else (M * K + N * K + M * N)) * esize(d)
    return f


CASES = [
    OpCase("lora_linear", _args, _tritium, _peft, _bytes(False), _bytes(True), flops_fwd=_flops(False),
           flops_fwdbwd=_flops(True), shapes=((8192, 576, 1536, 16),), grad_args=(0, 3, 4),
           note="shape = tokens x in x out x r; alpha 32, bias, no dropout; eager: PEFT's LoRA Linear on the same "
                "base (adapters in the base's dtype)"),
]
