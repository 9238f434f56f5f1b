"""The crossover of LoRA on a quantized base (python/tritium/ops/lora.py, docs/lora.md): forward + backward of a
LoRALinear (576 -> 1536, r 16) on an int8, int4 (groups of 32) and NF4 base, through the base's quantized product
and through the weight dequantised per call with the fused ops (lora_dequant_fwd), forced either way, at row counts
around each weight's gemm_rows; single calls alternating the two, min and median of each. Informal: run it on an
idle machine. Run: .venv/bin/python tools/lora_crossover.py [rows,rows,...] [kind,kind,...] [dtype,dtype,...]"""
import statistics
import sys
import time

import torch

from tritium.nn import LoRALinear
from tritium.ops.nf4 import NF4Weight
from tritium.ops.quant import QuantizedWeight

K, N, R, REPS = 576, 1536, 16, 8
ROWS = [int(a) for a in sys.argv[1].split(",")] if len(sys.argv) > 1 else [32, 128, 384, 1024, 4096, 8192]
KINDS = sys.argv[2].split(",") if len(sys.argv) > 2 else ["int8", "int4", "nf4"]
DTYPES = [getattr(torch, d) for d in (sys.argv[3].split(",") if len(sys.argv) > 3 else ["bfloat16", "float32"])]
GEMM_ROWS = {cls: cls.gemm_rows for cls in (NF4Weight, QuantizedWeight)}


def route(dequantised: bool) -> None:
    for cls in GEMM_ROWS:
        cls.gemm_rows = (lambda self, dtype: 0) if dequantised else (lambda self, dtype: 1 << 62)


for kind in KINDS:
    for dt in DTYPES:
        torch.manual_seed(0)
        layer = LoRALinear(K, N, r=R, lora_alpha=2 * R, dtype=dt)
        torch.nn.init.normal_(layer.lora_B, std=0.1)
        layer.quantize_base(kind, group_size=32 if kind == "int4" else None)
        edge = GEMM_ROWS[type(layer.frozen_base())](layer.frozen_base(), dt)
        for m in ROWS:
            x = torch.randn(m, K, dtype=dt, requires_grad=True)
            dy = torch.randn(m, N, dtype=dt)

            def step():
                torch.autograd.grad(layer(x), (x, layer.lora_A, layer.lora_B), dy)

            times = {False: [], True: []}
            for i in range(REPS + 1):
                for dq in times:
                    route(dq)
                    t = time.perf_counter()
                    step()
                    if i:   # the first round warms up
                        times[dq].append(time.perf_counter() - t)
            q, d = times[False], times[True]
            print(f"{kind} {str(dt)[6:]} {m} rows (gemm_rows {edge}): quantized min {min(q) * 1e3:.2f} ms median "
                  f"{statistics.median(q) * 1e3:.2f}; dequantised min {min(d) * 1e3:.2f} median "
                  f"{statistics.median(d) * 1e3:.2f}; quantized / dequantised (medians) "
                  f"{statistics.median(q) / statistics.median(d):.2f}", flush=True)
        for cls, fn in GEMM_ROWS.items():
            cls.gemm_rows = fn
