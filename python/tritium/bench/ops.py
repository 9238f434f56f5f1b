"""``tritium bench ops``: every declared op case, tritium vs PyTorch eager vs torch.compile, forward and
forward+backward, median time and achieved throughput: TFLOP/s (GFLOP/s on CPU) from the case's FLOP formula
for compute-bound cases, else GB/s from its bytes formula with the fraction of this machine's measured copy
bandwidth.

``--quick`` runs the handful of headline rows in QUICK (the summary ``make demo`` prints); ``--headline`` every
case at its first shape; neither: every case at every shape.
"""
from __future__ import annotations

import argparse
import fnmatch
import gc
import math
import statistics
import sys
from typing import List

import torch

from .case import OpCase
from .common import (copy_bandwidth, dtype_name, geomean, machine_info, parse_dtype, released_memory, time_fn,
                     write_json)


# The short summary (`tritium bench ops --quick`, run by `make demo`): (op, dtype, mode) at the op's headline
# shape, one row per op family that dominates a model: two memory-bound rows, a loss, compute-bound attention.
QUICK = (
    ("rms_norm", "bfloat16", "fwd"),
    ("swiglu", "bfloat16", "fwd"),
    ("softmax", "float32", "fwd"),
    ("cross_entropy", "float32", "fwdbwd"),
    ("attention_causal_vs_sdpa", "bfloat16", "fwd"),
)


# `--against`: tritium's own time, not a speedup, is what says whether a kernel regressed (the baselines' times
# move with torch's version and the allocator's state); slower by more than this factor is marked
REGRESSION = 1.15


def _shape(text: str) -> str:
    """--shape's type: dims joined by x, each a positive integer (kept as the text)."""
    try:
        if all(int(v) >= 1 for v in text.lower().split("x")):
            return text
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"must be positive integers joined by x (e.g. 4096x4096), got {text!r}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import number

    p.add_argument("--quick", action="store_true",
                   help=f"a short summary: {len(QUICK)} headline rows (the --op/--dtype/--mode filters still apply)")
    p.add_argument("--op", action="append", help="op name or glob (repeatable); default: all")
    p.add_argument("--dtype", action="append", choices=("float32", "bfloat16", "float16"),
                   help="repeatable; default: per case")
    p.add_argument("--shape", action="append", type=_shape, help="e.g. 4096x4096 (repeatable); default: per case")
    p.add_argument("--headline", action="store_true",
                   help="only each case's first (headline) shape: the one its issue's bar is stated at")
    p.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (saves minutes)")
    p.add_argument("--min-time", type=number(float, 0, low_open=True), default=None,
                   help="seconds of timing per measurement (default 0.5; 0.2 with --quick), split over the rounds")
    p.add_argument("--rounds", type=number(int, 1), default=1,
                   help="rounds over eager, compile and tritium in turn, each side's figure the median of its "
                        "rounds (default 1)")
    p.add_argument("--json", help="write machine info, versions and every figure to this path")
    p.add_argument("--plot", help="write a PNG of the speedups to this path")
    p.add_argument("--against", metavar="JSON",
                   help="a recording of this suite (e.g. bench/results/ops-headline-<kind>.json): print tritium's "
                        "time in each row both runs share, then and now, marking rows more than "
                        f"{100 * (REGRESSION - 1):.0f}%% slower now")
    p.add_argument("--list", action="store_true", help="list the cases and exit")


def _select(cases: List[OpCase], patterns) -> List[OpCase]:
    if not patterns:
        return cases
    chosen = [c for c in cases if any(fnmatch.fnmatch(c.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"no op matches {patterns}; known: {', '.join(c.name for c in cases)}")
    return chosen


def _parse_shape(s: str):
    return tuple(int(v) for v in s.lower().split("x"))


def _plan(cases: List[OpCase], args):
    """[(case, shape, dtype, modes)] to measure, from the command line's filters."""
    modes = ["fwd", "fwdbwd"] if args.mode == "both" else [args.mode]
    plan = []
    if args.quick:
        by_name = {c.name: c for c in cases}
        for name, dname, mode in QUICK:
            if name in by_name and mode in modes and (not args.dtype or dname in args.dtype):
                case = by_name[name]
                shape = _parse_shape(args.shape[0]) if args.shape else case.shapes[0]
                plan.append((case, shape, parse_dtype(dname), [mode]))
        return plan
    for case in cases:
        shapes = [_parse_shape(s) for s in args.shape] if args.shape else case.shapes
        if args.headline and not args.shape:
            shapes = shapes[:1]
        dtypes = [parse_dtype(d) for d in args.dtype] if args.dtype else case.dtypes
        plan.extend((case, shape, dtype, modes) for shape in shapes for dtype in dtypes)
    return plan


def throughput(row: dict, device: str) -> str:
    """The row's achieved rate as the table shows it: FLOP/s for compute-bound rows, else GB/s."""
    if row.get("TFLOPps") is not None:
        return f"{row['TFLOPps']:.2f} TFLOP/s" if device == "cuda" else f"{row['TFLOPps'] * 1e3:.0f} GFLOP/s"
    return f"{row['GBps']:.1f} GB/s"


def _grad_inputs(case: OpCase, args: tuple):
    idx = case.grad_args
    if idx is None:
        idx = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.is_floating_point()]
    return idx


def _runner(fn, args, mode, grad_idx):
    """A zero-argument callable running fn once in the given mode."""
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    args = list(args)
    for i in grad_idx:
        args[i] = args[i].detach().requires_grad_(True)
    inputs = [args[i] for i in grad_idx]
    out = fn(*args)
    outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    # a scalar (a loss) gets loss.backward()'s upstream gradient, 1; other outputs a random one
    grads = [torch.ones_like(o) if o.dim() == 0 else torch.randn_like(o) for o in outs]

    def run():
        o = fn(*args)
        o = [t for t in (o if isinstance(o, (tuple, list)) else (o,))
             if isinstance(t, torch.Tensor) and t.requires_grad]
        return torch.autograd.grad(o, inputs, grads)
    return run


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def peak_extra_bytes(fn, device: str = "cpu", calls: int = 3):
    """Peak memory one call of fn adds above what was in use before it (OpCase.track_memory), the least over
    `calls` calls: a first call also pays one-time costs that are no call's working memory (oneDNN's primitives
    and their JIT code, a thread's first arena: 10-50 MiB measured on the CPU), and the resident set's mark moves
    with what earlier cases left in the heap. CPU: the resident-set high-water mark, reset through
    /proc/self/clear_refs (Linux), minus the resident set before the call, with freed memory returned to the OS and
    tritium's output pool off (released_memory); CUDA: the caching allocator's peak. None where neither is
    available."""
    peaks = [_peak_extra_once(fn, device) for _ in range(calls)]
    return None if None in peaks else min(peaks)


def _peak_extra_once(fn, device: str):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    try:
        with released_memory():
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            before = _status_kib("VmRSS")
            out = fn()
            peak = _status_kib("VmHWM")
            del out
    except OSError:
        return None
    return float(peak - before) * 1024


def run(args) -> List[dict]:
    from .suites import all_cases

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = _select(all_cases(), args.op)
    if args.list:
        for c in cases:
            print(f"{c.name:28s} shapes={list(c.shapes)} {c.note}")
        return []
    if args.min_time is None:
        args.min_time = 0.2 if args.quick else 0.5
    plan = _plan(cases, args)
    bw = copy_bandwidth(device)
    rows = []
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(f"[bold]tritium bench ops[/] on {device}; measured copy bandwidth {bw / 1e9:.1f} GB/s")
    table = Table(title="tritium vs eager vs torch.compile (median ms; speedup = baseline / tritium)")
    for col in ("op", "shape", "dtype", "mode", "eager", "compile", "tritium", "x eager", "x compile",
                "throughput", "% copy BW", "peak MiB e/t"):
        table.add_column(col, justify="right" if col not in ("op", "mode") else "left")
    for case, shape, dtype, modes in plan:
        inputs = case.make(shape, dtype, torch.device(device))
        grad_idx = _grad_inputs(case, inputs)
        for mode in modes:
            nbytes_fn = case.bytes_fwd if mode == "fwd" else case.bytes_fwdbwd
            if nbytes_fn is None:
                continue
            flops_fn = case.flops_fwd if mode == "fwd" else case.flops_fwdbwd
            impls = [("eager", case.eager), ("tritium", case.tritium)]
            if not args.no_compile:
                torch._dynamo.reset()
                own = case.compiled_fwdbwd if mode == "fwdbwd" else case.compiled_fwd
                impls.insert(1, ("compile", own or torch.compile(case.eager, dynamic=False)))
            # rounds over the sides in turn, each side's figure the median of its rounds: a slow spell of a shared
            # machine then lands on every side instead of on whichever ran during it
            runners = [(name, _runner(fn, inputs, mode, grad_idx)) for name, fn in impls]
            per = {name: [] for name, _ in runners}
            for _ in range(args.rounds):
                for name, run in runners:
                    per[name].append(time_fn(run, args.min_time / args.rounds, device))
                    gc.collect()
            times = {name: statistics.median(v) for name, v in per.items()}
            del runners
            peaks = {}
            if case.track_memory:
                for name, fn in impls:
                    if name != "compile":
                        peaks[name] = peak_extra_bytes(_runner(fn, inputs, mode, grad_idx), device)
                    gc.collect()
            nbytes = nbytes_fn(shape, dtype)
            flops = flops_fn(shape, dtype) if flops_fn is not None else None
            t = times["tritium"]
            row = {
                "op": case.name, "shape": list(shape), "dtype": dtype_name(dtype), "mode": mode,
                "eager_ms": times["eager"] * 1e3, "compile_ms": times.get("compile", float("nan")) * 1e3,
                "tritium_ms": t * 1e3, "speedup_eager": times["eager"] / t,
                "speedup_compile": times["compile"] / t if "compile" in times else None,
                # compute-bound cases (a FLOP formula declared) are judged by FLOP/s, the others by bytes/s
                "bound": "compute" if flops is not None else "memory",
                "bytes": nbytes, "GBps": nbytes / t / 1e9,
                "frac_copy_bw": nbytes / t / bw if flops is None else None,
                "flops": flops, "TFLOPps": flops / t / 1e12 if flops is not None else None,
                "note": case.note,
            }
            if peaks:
                row["peak_eager_MiB"] = peaks["eager"] / 2**20 if peaks["eager"] is not None else None
                row["peak_tritium_MiB"] = peaks["tritium"] / 2**20 if peaks["tritium"] is not None else None
            rows.append(row)
            sc = f"{row['speedup_compile']:.2f}" if row["speedup_compile"] else "-"
            table.add_row(case.name, "x".join(map(str, shape)), row["dtype"], mode,
                          f"{row['eager_ms']:.3f}", f"{row['compile_ms']:.3f}", f"{row['tritium_ms']:.3f}",
                          _marked(row["speedup_eager"]), _marked(row["speedup_compile"]), throughput(row, device),
                          "-" if row["frac_copy_bw"] is None else f"{100 * row['frac_copy_bw']:.0f}%",
                          f"{row['peak_eager_MiB']:.0f}/{row['peak_tritium_MiB']:.0f}"
                          if row.get("peak_tritium_MiB") is not None else "-")
            console.print(f"  {case.name} {shape} {row['dtype']} {mode}: tritium {t * 1e3:.3f} ms "
                          f"({throughput(row, device)}), {row['speedup_eager']:.2f}x eager, {sc}x compile"
                          + (f"; peak extra memory eager {row['peak_eager_MiB']:.0f} MiB, tritium "
                             f"{row['peak_tritium_MiB']:.0f} MiB" if row.get("peak_tritium_MiB") else ""),
                          highlight=False)
        del inputs
    console.print(table)
    slower = [r for r in rows if min(r["speedup_eager"], r["speedup_compile"] or math.inf) < 1.0]
    for r in slower:  # a drop-in slower than what it replaces is a bug (issue: no row below 1.0x)
        console.print(f"[red]below 1.0x:[/] {r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['mode']}: "
                      f"{r['speedup_eager']:.2f}x eager, "
                      + (f"{r['speedup_compile']:.2f}x compile" if r["speedup_compile"] else "no compile"),
                      highlight=False)
    console.print(f"{len(slower)} of {len(rows)} rows below 1.0x eager or compile")
    console.print(f"geomean speedup vs eager {geomean([r['speedup_eager'] for r in rows]):.2f}x"
                  + ("" if args.no_compile else
                     f", vs torch.compile {geomean([r['speedup_compile'] for r in rows]):.2f}x"))
    if args.against:
        regressed = compare(rows, args.against)
        for line in regressed:
            console.print(line, highlight=False)
        console.print(f"{len(regressed)} rows more than {100 * (REGRESSION - 1):.0f}% slower than in {args.against}")
    if args.json:
        write_json(args.json, machine_info(device), rows, {"suite": "ops", "rounds": args.rounds})
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot)
        console.print(f"wrote {args.plot}")
    return rows


def compare(rows: List[dict], path: str) -> List[str]:
    """One line per row of `rows` whose tritium time is more than REGRESSION times the time of the same (op, shape,
    dtype, mode) in the recording at `path`."""
    import json

    with open(path) as f:
        then = {(r["op"], tuple(r["shape"]), r["dtype"], r["mode"]): r["tritium_ms"] for r in json.load(f)["rows"]}
    out = []
    for r in rows:
        old = then.get((r["op"], tuple(r["shape"]), r["dtype"], r["mode"]))
        if old is not None and r["tritium_ms"] > REGRESSION * old:
            out.append(f"slower than recorded: {r['op']} {'x'.join(map(str, r['shape']))} {r['dtype']} {r['mode']}: "
                       f"tritium {r['tritium_ms']:.3f} ms, was {old:.3f} ms ({r['tritium_ms'] / old:.2f}x)")
    return out


def _marked(speedup) -> str:
    """A speedup for the table, in red when below 1.0x (tritium the slower choice)."""
    if not speedup:
        return "-"
    return f"[red]{speedup:.2f}[/]" if speedup < 1.0 else f"{speedup:.2f}"


def plot(rows: List[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']} {'x'.join(map(str, r['shape']))} {r['dtype'][:4]} {r['mode']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.28 * len(rows))))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["speedup_eager"] for r in rows], height=0.4, label="vs eager")
    if any(r["speedup_compile"] for r in rows):
        ax.barh([y - 0.2 for y in ys], [r["speedup_compile"] or 0 for r in rows], height=0.4,
                label="vs torch.compile")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup (baseline time / tritium time)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
