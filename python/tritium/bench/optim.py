"""``tritium bench optim``: one optimizer step over SmolLM2-135M's parameters, tritium.optim vs torch.optim.

The parameter list is the shapes of ``tritium.models``' default decoder (smollm2-135m: 182 tensors, 134.5M
elements), with random values and gradients. Cases (``--cases``):

- ``float32``: float32 params and grads. tritium.optim.AdamW against torch.optim.AdamW(fused=True) and
  (foreach=True).
- ``bfloat16-master``: bfloat16 params and grads with float32 master weights and state. tritium.optim.AdamW(
  master_weights=True) against what torch.optim needs for the same result: AdamW (fused / foreach) over float32
  copies, whose gradients are the bfloat16 ones widened first, and the updated copies written back into the
  bfloat16 params (both inside the timed step).
- ``bfloat16``: bfloat16 params, grads and state (no master copy), against fused / foreach on the same.

Each step is timed in rounds over the variants in turn (one step each per round, after a warm-up step), each
figure the median of its rounds. GB/s counts the bytes a step must move: AdamW reads param, grad, exp_avg and
exp_avg_sq and writes param, exp_avg and exp_avg_sq (with master weights: the float32 master in their place, the
16-bit grad read and the 16-bit param written).
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, Dict, List

import torch

from .common import machine_info, write_json

CASES = ("float32", "bfloat16-master", "bfloat16")
VARIANTS = ("tritium", "torch fused", "torch foreach")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number
    from ..models.llama import CONFIGS

    p.add_argument("--cases", default=list(CASES), type=comma_list(choices=CASES), help="comma-separated")
    p.add_argument("--rounds", type=number(int, 1), default=7, help="rounds over the variants in turn")
    p.add_argument("--model", default="smollm2-135m", choices=sorted(CONFIGS),
                   help="the tritium.models.llama config whose parameter shapes to use (default: the embedded model's)")
    p.add_argument("--json", help="write machine info and every figure to this path")
    p.add_argument("--note", default="", help="free text recorded in the JSON (e.g. what else ran on the machine)")


def param_shapes(config: str) -> List[torch.Size]:
    """The parameter shapes of a tritium.models Llama of the named config (built on the meta device: no memory)."""
    from ..models.llama import CONFIGS, Llama

    with torch.device("meta"):
        model = Llama(CONFIGS[config])
    return [p.shape for p in model.parameters()]


def _params(shapes, dtype, seed: int) -> List[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype) * 0.02)
        p.grad = (torch.randn(s, generator=gen) * 1e-3).to(dtype)
        ps.append(p)
    return ps


def steps_for(case: str, shapes) -> Dict[str, Callable[[], None]]:
    """variant -> one optimizer step (state created by a first call, which the timing's warm-up makes)."""
    import tritium.optim

    dtype = torch.float32 if case == "float32" else torch.bfloat16
    ps = _params(shapes, dtype, 0)
    ours = tritium.optim.AdamW(ps, lr=1e-4, master_weights=case == "bfloat16-master")
    out = {"tritium": ours.step}
    if case != "bfloat16-master":
        for name, kw in (("torch fused", dict(fused=True)), ("torch foreach", dict(foreach=True))):
            out[name] = torch.optim.AdamW(ps, lr=1e-4, **kw).step
        return out
    masters = [torch.nn.Parameter(p.detach().float()) for p in ps]  # shared by both torch variants (timing only)
    grads16 = [p.grad for p in ps]
    for m in masters:
        m.grad = torch.empty_like(m)
    mgrads = [m.grad for m in masters]
    p16 = [p.detach() for p in ps]
    for name, kw in (("torch fused", dict(fused=True)), ("torch foreach", dict(foreach=True))):
        opt = torch.optim.AdamW(masters, lr=1e-4, **kw)

        def step(opt=opt):
            torch._foreach_copy_(mgrads, grads16)   # widen the bfloat16 grads
            opt.step()
            torch._foreach_copy_(p16, masters)      # round the updated masters into the model
        out[name] = step
    return out


def step_bytes(case: str, n: int) -> int:
    """Bytes an AdamW step must move over n elements (module doc)."""
    return {"float32": 7 * 4, "bfloat16": 7 * 2, "bfloat16-master": 6 * 4 + 2 * 2}[case] * n


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    from .hf import _timed_rounds

    shapes = param_shapes(args.model)
    n = sum(s.numel() for s in shapes)
    rows = []
    for case in args.cases:
        fns = steps_for(case, shapes)
        times = _timed_rounds(fns, args.rounds)
        del fns
        for v, t in times.items():
            rows.append(dict(case=case, variant=v, tensors=len(shapes), elements=n, ms=round(t * 1e3, 2),
                             GBps=round(step_bytes(case, n) / t / 1e9, 2),
                             tritium_speedup=round(times[v] / times["tritium"], 3)))
    table = Table(title=f"tritium bench optim: AdamW step over {args.model}'s {len(shapes)} params ({n / 1e6:.1f}M "
                        f"elements), {torch.get_num_threads()} threads")
    for col in ("case", "variant", "ms", "GB/s", "tritium speedup vs this"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["case"], r["variant"], f"{r['ms']:.1f}", f"{r['GBps']:.1f}", f"{r['tritium_speedup']:.2f}x")
    Console().print(table)
    if args.json:
        write_json(args.json, machine_info("cpu"), rows, {"suite": "optim", "rounds": args.rounds, "note": args.note,
                                                          "cpu_affinity": sorted(os.sched_getaffinity(0))})
    return rows
