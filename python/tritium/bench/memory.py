"""Peak extra memory of attention (tritium flash attention vs torch SDPA) as the sequence grows.

Each measurement runs in a fresh Python process so that nothing earlier is cached: large allocations go
straight to mmap (MALLOC_MMAP_THRESHOLD_), so memory freed during the call leaves the resident set, and
tritium's output pool is off (TRITIUM_CPU_POOL_MB=0). The figure is the resident-set high-water mark during
one call (forward, or forward + backward) minus the resident set before it, with q, k, v already allocated:
it counts the outputs, the saved log-sum-exp, any workspace and, for the backward, the gradients. An
O(seq^2) implementation would show the (heads, seq, seq) score matrix here (512 MiB at 8 x 4096^2 float32).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List

from .common import machine_info, write_json

_CHILD = r"""
import sys, torch, tritium, torch.nn.functional as F
L, dt, impl, bwd = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
H, D = int(sys.argv[5]), int(sys.argv[6])

def attn(q, k, v):
    if impl == "tritium":
        return tritium.flash_attention(q, k, v, causal=True)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)

def kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])

q, k, v = (torch.randn(1, H, L, D, dtype=dt, requires_grad=bwd) for _ in range(3))
w = torch.randn(1, H, 64, D, dtype=dt, requires_grad=bwd)  # warm-up: thread pool, code paths
o = attn(w, w, w)
if bwd:
    o.sum().backward()
del o, w
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
o = attn(q, k, v)
if bwd:
    o.backward(torch.ones_like(o))
print((kib("VmHWM") - before) * 1024)
"""


def peak_extra_bytes(seq: int, dtype: str = "float32", impl: str = "tritium", backward: bool = False,
                     heads: int = 8, head_dim: int = 64) -> float:
    """Peak extra bytes of one causal attention call (batch 1) measured in a fresh process (see module doc)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITIUM_CPU_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", _CHILD, str(seq), dtype, impl, "1" if backward else "0",
                          str(heads), str(head_dim)], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number

    p.add_argument("--seqs", default=[1024, 2048, 4096, 8192], type=comma_list(number(int, 1)),
                   help="sequence lengths, comma-separated")
    p.add_argument("--dtypes", default=["float32", "bfloat16"], type=comma_list(choices=("float32", "bfloat16")),
                   help="comma-separated")
    p.add_argument("--json", default=None, help="write the results here")


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    rows = []
    table = Table(title="attention peak extra memory (MiB), batch 1, 8 heads x 64, causal")
    for col in ("dtype", "mode", "seq", "tritium", "torch SDPA", "tritium vs previous seq"):
        table.add_column(col, justify="right")
    for dtype in args.dtypes:
        for backward in (False, True):
            prev = None
            for seq in args.seqs:
                t = peak_extra_bytes(seq, dtype, "tritium", backward) / 2 ** 20
                e = peak_extra_bytes(seq, dtype, "sdpa", backward) / 2 ** 20
                mode = "fwdbwd" if backward else "fwd"
                rows.append(dict(dtype=dtype, mode=mode, seq=seq, tritium_MiB=t, sdpa_MiB=e))
                table.add_row(dtype, mode, str(seq), f"{t:.1f}", f"{e:.1f}",
                              "-" if prev is None else f"{t / prev:.2f}x")
                prev = t
    Console().print(table)
    if args.json:
        write_json(args.json, machine_info("cpu"), rows, {"suite": "memory"})
    return rows
