"""Benchmarks of the NF4 weight-only linear op and of QLoRA (tritium.ops.nf4, docs/quantization.md "NF4").

- ``nf4_linear``, shape = tokens x in x out, a SmolLM2-135M MLP projection (576 -> 1536), blocksize 64, bias on:
  tritium.nf4_linear against what a user writes without it, the weight dequantised by torch ops (bitsandbytes'
  formula: code[q] * absmax, as its pure-torch backend does) then F.linear, eager and torch.compile'd. Decode
  steps (1 and 16 tokens: a weight stream, 4-bit bytes against the float weight the baseline writes and reads) and
  a training step's 2048 tokens (compute-bound). The backward is the input gradient (the base is frozen).
- ``qlora_linear``, shape = tokens x in x out x r (the LoRA bar's shape): tritium.lora_linear on an NF4 base against
  PEFT's LoRA layer on bitsandbytes' Linear4bit (NF4, blocksize 64, the same bytes; bitsandbytes' CPU matmul_4bit
  dequantises and calls F.linear), gradients of x, lora_A and lora_B.
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, esize
from tritium.bench.suites.lora import ALPHA, peft_lora_call
from tritium.ops.nf4 import NF4_CODE_VALUES, NF4Weight

BS = 64
_LAYERS = {}


def _nf4_args(shape, dtype, device):
    M, K, N = shape[:3]
    x = torch.randn(M, K, dtype=dtype, device=device)
    q = tritium.quantize_nf4(torch.randn(N, K, device=device) / K ** 0.5, BS)
    b = torch.randn(N, device=device).to(dtype)
    return x, q.data.view(-1), q.absmax, b


def _weight(qd, absmax, n, k, dtype):
    return NF4Weight(qd, absmax, (n, k), BS, dtype)


def _nf4_tritium(x, qd, absmax, b):
    return tritium.nf4_linear(x, _weight(qd, absmax, b.shape[0], x.shape[1], x.dtype), b)


def _nf4_eager(x, qd, absmax, b):
    """The weight dequantised by torch ops, then F.linear."""
    code = torch.tensor(NF4_CODE_VALUES, device=x.device)
    idx = torch.stack((qd >> 4, qd & 15), dim=-1).view(-1).long()
    w = (code[idx].view(-1, BS) * absmax[:, None]).view(b.shape[0], x.shape[1]).to(x.dtype)
    return F.linear(x, w, b)


def _nf4_bytes(fwdbwd):
    def f(s, d):   # x read, the packed weight (+ absmax) read, y written; the backward reads dy and writes dx
        M, K, N = s
        w = N * K / 2 + N * K / BS * 4
        return (2 * M * K + M * N + 2 * w) * esize(d) if fwdbwd else (M * K + M * N) * esize(d) + w
    return f


def _nf4_flops(fwdbwd):
    def f(s, d):
        M, K, N = s
        return (2 if fwdbwd else 1) * 2.0 * M * K * N
    return f


def _qlora_args(shape, dtype, device):
    M, K, N, r = shape
    x, qd, absmax, b = _nf4_args((M, K, N), dtype, device)
    a = (torch.randn(r, K, device=device) / K ** 0.5).to(dtype)
    bb = (torch.randn(N, r, device=device) * 0.1).to(dtype)
    return x, qd, absmax, b, a, bb


def _qlora_tritium(x, qd, absmax, b, a, bb):
    w = _weight(qd, absmax, b.shape[0], x.shape[1], x.dtype)
    return tritium.lora_linear(x, w, b, a, bb, ALPHA / a.shape[0])


def _qlora_peft(x, qd, absmax, b, a, bb):
    """PEFT's LoRA layer on bitsandbytes' Linear4bit holding these NF4 bytes (one module per shape and dtype)."""
    n, k = b.shape[0], x.shape[1]

    def base():
        import bitsandbytes as bnb

        l4 = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=x.dtype, quant_type="nf4", device=x.device)
        w = NF4Weight(qd, absmax, (n, k), BS, x.dtype).dequantize()
        l4.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", blocksize=BS,
                                      compress_statistics=False).to(x.device)
        l4.bias = torch.nn.Parameter(b.detach().clone(), requires_grad=False)
        assert torch.equal(l4.weight.data.view(-1), qd), "bitsandbytes quantised other bytes"
        return l4

    return peft_lora_call(_LAYERS, (n, k, a.shape[0], x.dtype, x.device), base, x, a, bb)


def _qlora_flops(fwdbwd):
    def f(s, d):
        M, K, N, r = s
        return (2 if fwdbwd else 1) * 2.0 * M * K * N + (3 if fwdbwd else 1) * 2.0 * M * r * (K + N)
    return f


def _qlora_bytes(fwdbwd):
    def f(s, d):
        M, K, N, r = s
        return _nf4_bytes(fwdbwd)((M, K, N), d)
    return f


CASES = [
    OpCase("nf4_linear", _nf4_args, _nf4_tritium, _nf4_eager, _nf4_bytes(False), _nf4_bytes(True),
           flops_fwd=_nf4_flops(False), flops_fwdbwd=_nf4_flops(True),
           shapes=((2048, 576, 1536), (1, 576, 1536), (16, 576, 1536)), grad_args=(0,),
           note="shape = tokens x in x out; NF4 blocksize 64, bias; eager: the weight dequantised by torch ops "
                "(code[q] * absmax), then F.linear; backward: dx only (frozen base)"),
    OpCase("qlora_linear", _qlora_args, _qlora_tritium, _qlora_peft, _qlora_bytes(False), _qlora_bytes(True),
           flops_fwd=_qlora_flops(False), flops_fwdbwd=_qlora_flops(True), shapes=((8192, 576, 1536, 16),),
           grad_args=(0, 4, 5),
           note="shape = tokens x in x out x r; NF4 base blocksize 64, alpha 32, bias, no dropout; eager: PEFT's LoRA "
                "Linear on bitsandbytes' Linear4bit holding the same NF4 bytes (adapters in the base's dtype)"),
]
