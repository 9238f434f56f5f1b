"""The GEMM rate ceiling of this machine at the MoE layer's expert shapes (docs/moe.md): torch.mm (MKL / oneDNN) and
tritium.linear on (1024, 576) x (576, 1536) and its two transposes, and torch.mm at 4096^3, every torch thread,
float32 and bfloat16; medians of torch.utils.benchmark. Run: .venv/bin/python tools/gemm_ceiling.py"""
import torch

import tritium
from tritium.utils import time_fn

torch.manual_seed(0)
M, K, N = 1024, 576, 1536   # ~ one expert's share of 4096 tokens x top-2 / 8 experts
for dt in (torch.float32, torch.bfloat16):
    a, w, g = torch.randn(M, K).to(dt), torch.randn(N, K).to(dt), torch.randn(M, N).to(dt)
    flops = 2 * M * K * N
    rows = {
        "torch mm x W^T": lambda: torch.mm(a, w.t()),
        "torch mm g W": lambda: torch.mm(g, w),
        "torch mm g^T x": lambda: torch.mm(g.t(), a),
        "tritium.linear": lambda: tritium.linear(a, w),
    }
    for name, fn in rows.items():
        t = time_fn(fn, 1.0)
        print(f"{dt} {name}: {flops / t / 1e9:.0f} GFLOP/s")
    big = torch.randn(4096, 4096).to(dt)
    t = time_fn(lambda: torch.mm(big, big), 1.0)
    print(f"{dt} torch mm 4096^3: {2 * 4096**3 / t / 1e9:.0f} GFLOP/s")
