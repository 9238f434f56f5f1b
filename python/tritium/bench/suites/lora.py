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


def _peft(x, w, b, a, bb):
    """PEFT's LoRA Linear layer (one module per shape, dtype and device) called on these tensors."""
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    key = (tuple(w.shape), a.shape[0], w.dtype, w.device)
    layer = _LAYERS.get(key)
    if layer is None:
        base = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        config = LoraConfig(r=a.shape[0], lora_alpha=ALPHA, lora_dropout=0.0)
        layer = LoraLinear(base, "default", config, r=a.shape[0], lora_alpha=ALPHA).to(w.dtype)
        _LAYERS[key] = layer
    params = {"base_layer.weight": w, "base_layer.bias": b, "lora_A.default.weight": a,
              "lora_B.default.weight": bb}
    return torch.func.functional_call(layer, params, (x,))


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
