"""``tritium bench dist``: ring attention and tensor-parallel decode (tritium.distributed) vs world size: step time,
communication, memory.

``--kind ring`` (the default) measures ring attention, ``--kind tp`` tensor-parallel Llama decoding (below),
``--kind all`` both.

One causal attention (batch 1, ``--heads`` x ``--head-dim``, ``--kv-heads`` for GQA) over a ``--seq``-long
sequence, forward + backward, split across 1, 2 and 4 gloo processes on this machine (``--worlds``) in the zigzag
layout, against ``tritium.flash_attention`` over the whole sequence in one process ("single"). The processes share
the machine's cores (each gets cores / world torch threads), so the point is the scaling shape, the communication
volume and the memory per rank, not a speedup.

- **step**: median over ``--steps`` timed steps (after a warm-up step) of the slowest rank's forward + backward;
  **fwd** the same for the forward alone.
- **comm wait**: the time ranks spend waiting for ring transfers to finish (the part not hidden behind a piece's
  attention; it includes waiting for a neighbour that is still computing), mean over ranks, and its **share** of
  the step. Gloo moves the bytes on its own threads, which take
  CPU time from the attention on a machine this small; that shows in the step time, not in the wait.
- **sent/rank**: bytes each rank sends per step (forward: K/V blocks; backward: K/V blocks again and the float32
  dK/dV accumulators), and per token of the whole sequence.
- **peak/rank**: each rank's resident-set high-water mark during one forward + backward step (after a warm-up step)
  minus its resident set before q, k, v were made, so it counts the inputs, the output, the gradients, the ring's
  buffers and any workspace; the largest over ranks. **extra** leaves the inputs out (as ``tritium bench memory``
  counts). Measured in fresh processes as ``tritium bench memory`` does: large allocations go straight to mmap and
  tritium's output pool is off, so freed memory leaves the resident set.

Tensor-parallel decode (``--kind tp``): a Llama of ``--config`` (default smollm2-135m, random weights: the shapes
are what count) in ``--dtype``, ``--batch`` sequences of ``--prompt-len`` tokens prefilled, then ``--decode-steps``
timed decode steps (after a few warm-up steps) of ``TPEngine`` on each world size of ``--worlds`` (world 1: the
same Python path and collectives on one rank), against ``Engine`` on the whole model in one process ("single":
the one-call C++ decode step).

- **step**: median over the timed steps of the slowest rank's engine step (model, sampler, bookkeeping).
- **comm**: seconds inside the collectives (the transfer and waiting for slower ranks), mean over ranks, and its
  **share** of the step.
- **B/token/rank**: bytes of the collectives' payloads per decoded token per rank (tritium.distributed.count_comm),
  and **analytic**: (2 n_layers + 1) x dim x dtype bytes (two all-reduces per layer, one for the
  vocabulary-parallel embedding) + 32 (the sampler's all-gather) + 40 / batch (the per-step agreement), for
  greedy decoding; ``--sampling temperature|top-k|top-p`` times seeded sampling instead (its sampler exchanges
  are measured, not analytic: docs/distributed.md).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import tempfile
import time
from typing import List, Optional

from .common import machine_info, write_json


# tp: the sampling presets of --sampling (SamplingParams fields; every sequence gets its own seed)
SAMPLING = {"greedy": {}, "temperature": {"temperature": 0.8}, "top-k": {"temperature": 0.8, "top_k": 50},
            "top-p": {"temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1}}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number

    p.add_argument("--seq", type=number(int, 8), default=8192, help="total sequence length")
    p.add_argument("--heads", type=number(int, 1), default=8)
    p.add_argument("--kv-heads", type=number(int, 1), default=None, help="default: --heads (no GQA)")
    p.add_argument("--head-dim", type=number(int, 1), default=64)
    p.add_argument("--worlds", default=[1, 2, 4], type=comma_list(number(int, 1)), help="world sizes, comma-separated")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--no-causal", dest="causal", action="store_false", help="non-causal attention")
    p.add_argument("--steps", type=number(int, 1), default=3, help="timed steps per world size (ring)")
    p.add_argument("--kind", default="ring", choices=("ring", "tp", "all"),
                   help="ring attention, tensor-parallel decode, or both")
    p.add_argument("--config", default="smollm2-135m", help="tp: a tritium.models.llama.CONFIGS name")
    p.add_argument("--batch", type=number(int, 1), default=1, help="tp: sequences decoding together")
    p.add_argument("--prompt-len", type=number(int, 1), default=32, help="tp: prompt tokens per sequence")
    p.add_argument("--decode-steps", type=number(int, 1), default=32, help="tp: timed decode steps")
    p.add_argument("--sampling", default="greedy", choices=sorted(SAMPLING),
                   help="tp: how each sequence picks its tokens (seeded; " +
                   "; ".join(f"{k}: {v or 'temperature 0'}" for k, v in SAMPLING.items()) + ")")
    p.add_argument("--weights", default="float", choices=("float", "int8", "int4"),
                   help="tp: the model's weights (quantize_d before sharding; the shards stay quantized)")
    p.add_argument("--json", default=None, help="write the results here")


def _kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _rank_main(rank: int, world: int, cfg: dict, out_dir: str) -> None:
    """One rank (or the single process): build this rank's q, k, v, run a warm-up step and then either the timed
    steps or one measured step, and write what it saw to out_dir/<rank>.json."""
    import torch
    import torch.distributed as dist

    import tritium
    from tritium.distributed import collect_stats, ring_attention, zigzag_local_lengths

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    single = cfg["mode"] == "single"
    if not single:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
    dt = getattr(torch, cfg["dtype"])
    H, Hkv, D, N, causal = cfg["heads"], cfg["kv_heads"], cfg["head_dim"], cfg["seq"], cfg["causal"]
    n = N if single else sum(zigzag_local_lengths(N, world)[rank])

    def step(q, k, v):
        t0 = time.perf_counter()
        if single:
            out = tritium.flash_attention(q, k, v, causal=causal)
        else:
            out = ring_attention(q, k, v, causal=causal)
        t1 = time.perf_counter()
        out.backward(torch.ones_like(out))
        return t1 - t0, time.perf_counter() - t0

    def inputs():
        gen = torch.Generator().manual_seed(rank)
        return [torch.randn(1, h, n, D, generator=gen, dtype=torch.float32).to(dt).requires_grad_(True)
                for h in (H, Hkv, Hkv)]

    step(*inputs())  # warm-up: thread pools, gloo's connections, first-call allocations
    res = {}
    if cfg["measure"] == "memory":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _kib("VmRSS")
        q, k, v = inputs()
        with_inputs = _kib("VmRSS")
        step(q, k, v)
        res = {"peak": (_kib("VmHWM") - before) * 1024, "extra": (_kib("VmHWM") - with_inputs) * 1024}
    else:
        q, k, v = inputs()
        res = {"fwd": [], "step": [], "wait": [], "bytes": []}
        for _ in range(cfg["steps"]):
            if not single:
                dist.barrier()
            with collect_stats() as st:
                f, s = step(q, k, v)
            for g in (q, k, v):
                g.grad = None
            res["fwd"].append(f)
            res["step"].append(s)
            res["wait"].append(st.wait_s)
            res["bytes"].append(st.bytes_sent)
    if not single:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(res, f)


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _launch(world: int, cfg: dict) -> List[dict]:
    """Run _rank_main on `world` fresh processes (spawned: a fresh allocator and resident set each)."""
    import torch.multiprocessing as mp

    env = dict(MALLOC_MMAP_THRESHOLD_="65536", TRITIUM_CPU_POOL_MB="0") if cfg["measure"] == "memory" else {}
    with tempfile.TemporaryDirectory() as d, _env(**env):
        mp.start_processes(_rank_main, args=(world, cfg, d), nprocs=world, join=True, start_method="spawn")
        return [json.load(open(os.path.join(d, f"{r}.json"))) for r in range(world)]


def _row(name: str, world: int, cfg: dict, timing: List[dict], memory: List[dict],
         single_peak: Optional[float]) -> dict:
    steps = len(timing[0]["step"])
    step = statistics.median(max(t["step"][i] for t in timing) for i in range(steps))
    fwd = statistics.median(max(t["fwd"][i] for t in timing) for i in range(steps))
    wait = statistics.mean(statistics.median(t["wait"]) for t in timing)
    sent = max(statistics.median(t["bytes"]) for t in timing)
    peak = max(m["peak"] for m in memory)
    return dict(impl=name, world=world, seq=cfg["seq"], heads=cfg["heads"], kv_heads=cfg["kv_heads"],
                head_dim=cfg["head_dim"], dtype=cfg["dtype"], causal=cfg["causal"], fwd_ms=fwd * 1e3,
                step_ms=step * 1e3, comm_wait_ms=wait * 1e3, comm_share=wait / step, bytes_sent_per_rank=sent,
                bytes_per_token_per_rank=sent / cfg["seq"], peak_MiB_per_rank=peak / 2 ** 20,
                extra_MiB_per_rank=max(m["extra"] for m in memory) / 2 ** 20,
                peak_vs_single=None if single_peak is None else peak / single_peak)


def _tp_rank_main(rank: int, world: int, cfg: dict, out_dir: str) -> None:
    """One rank of tensor-parallel decode (or, mode "single", Engine on the whole model): prefill, warm up, time
    the decode steps; writes per-step seconds, collective seconds and bytes to out_dir/<rank>.json."""
    import torch
    import torch.distributed as dist

    from tritium.distributed import TPEngine, count_comm, shard_llama
    from tritium.inference import Engine
    from tritium.models.llama import build

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    single = cfg["mode"] == "single"
    if not single:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=600))
    model = build(cfg["config"]).init_random(generator=torch.Generator().manual_seed(0))
    model = model.to(getattr(torch, cfg["dtype"]))
    if cfg.get("weights", "float") != "float":
        model.quantize_(cfg["weights"])
    if not single:
        model = shard_llama(model)
    warm = 3
    n_new = warm + cfg["decode_steps"] + 2
    engine = (Engine if single else TPEngine)(model, max_batch=cfg["batch"])
    gen = torch.Generator().manual_seed(1)
    for i in range(cfg["batch"]):
        prompt = torch.randint(0, model.config.vocab_size if single else model.tp.full_config.vocab_size,
                               (cfg["prompt_len"],), generator=gen).tolist()
        sampling = dict(SAMPLING[cfg.get("sampling", "greedy")])
        if sampling:
            sampling["seed"] = i
        engine.add_request(prompt, max_new_tokens=n_new, stop_token_ids=(), **sampling)
    engine.step()   # the prefill
    for _ in range(warm):
        engine.step()
    res = {"step": [], "comm": [], "bytes": []}
    for _ in range(cfg["decode_steps"]):
        if not single:
            dist.barrier()
        with count_comm() as st:
            t0 = time.perf_counter()
            engine.step()
            res["step"].append(time.perf_counter() - t0)
        res["comm"].append(st.seconds)
        res["bytes"].append(st.total_bytes)
    if not single:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(res, f)


def _launch_tp(world: int, cfg: dict) -> List[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(_tp_rank_main, args=(world, cfg, d), nprocs=world, join=True, start_method="spawn")
        return [json.load(open(os.path.join(d, f"{r}.json"))) for r in range(world)]


def tp_analytic_bytes_per_token(config, dtype_bytes: int, batch: int) -> float:
    """The payload bytes per decoded token per rank of a tensor-parallel decode step (see the module docstring)."""
    return (2 * config.n_layers + 1) * config.dim * dtype_bytes + 4 * 8 + 5 * 8 / batch


def run_tp(args, console) -> List[dict]:
    import torch
    from rich.table import Table

    from tritium.models.llama import CONFIGS

    if args.config not in CONFIGS:
        raise SystemExit(f"tritium bench dist: --config must be one of {', '.join(CONFIGS)}, got {args.config!r}")
    cfg = dict(config=args.config, dtype=args.dtype, batch=args.batch, prompt_len=args.prompt_len,
               decode_steps=args.decode_steps, sampling=args.sampling, weights=args.weights)
    c = CONFIGS[args.config]
    # the sampler's share is analytic for greedy steps only (sampling rows gather a varying number of candidates)
    analytic = tp_analytic_bytes_per_token(c, getattr(torch, args.dtype).itemsize, args.batch) \
        if args.sampling == "greedy" else None
    rows = []
    for name, world in [("single", 1)] + [("tp", w) for w in args.worlds]:
        console.print(f"tp decode: {name} world {world} ...")
        runs = _launch_tp(world, dict(cfg, mode=name))
        n = len(runs[0]["step"])
        step = statistics.median(max(r["step"][i] for r in runs) for i in range(n))
        comm = statistics.mean(statistics.median(r["comm"]) for r in runs)
        per_token = max(statistics.median(r["bytes"]) for r in runs) / args.batch
        rows.append(dict(impl=f"{name} decode", world=world, config=args.config, dtype=args.dtype,
                         batch=args.batch, prompt_len=args.prompt_len, sampling=args.sampling,
                         weights=args.weights, step_ms=step * 1e3,
                         tokens_per_s=args.batch / step, comm_ms=comm * 1e3, comm_share=comm / step,
                         bytes_per_token_per_rank=per_token,
                         analytic_bytes_per_token_per_rank=analytic if name == "tp" else 0.0))
    table = Table(title=f"decode steps: tensor-parallel vs one process, {args.config} ({args.dtype}), batch "
                        f"{args.batch}, prompts of {args.prompt_len} tokens, {args.sampling} sampling, "
                        f"{args.weights} weights")
    for col in ("impl", "world", "step ms", "tok/s", "comm ms", "share", "B/token/rank", "analytic"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["impl"].split()[0], str(r["world"]), f"{r['step_ms']:.1f}", f"{r['tokens_per_s']:.1f}",
                      f"{r['comm_ms']:.1f}", f"{r['comm_share']:.1%}", f"{r['bytes_per_token_per_rank']:.0f}",
                      "-" if r["analytic_bytes_per_token_per_rank"] is None else
                      f"{r['analytic_bytes_per_token_per_rank']:.0f}")
    console.print(table)
    return rows


def run(args) -> List[dict]:
    from rich.console import Console

    console = Console()
    rows = []
    if args.kind in ("ring", "all"):
        rows += run_ring(args, console)
    if args.kind in ("tp", "all"):
        rows += run_tp(args, console)
    if args.json:
        write_json(args.json, machine_info("cpu"), rows, {"suite": "dist"})
    return rows


def run_ring(args, console) -> List[dict]:
    from rich.table import Table

    cfg = dict(seq=args.seq, heads=args.heads, kv_heads=args.kv_heads or args.heads, head_dim=args.head_dim,
               dtype=args.dtype, causal=args.causal, steps=args.steps)
    if cfg["heads"] % cfg["kv_heads"]:
        raise SystemExit(f"tritium bench dist: --kv-heads {cfg['kv_heads']} must divide --heads {cfg['heads']}")
    rows = []
    single = [_launch(1, dict(cfg, mode="single", measure=m)) for m in ("time", "memory")]
    rows.append(_row("single", 1, cfg, *single, None))
    single_peak = rows[0]["peak_MiB_per_rank"] * 2 ** 20
    for world in args.worlds:
        console.print(f"world {world} ...")
        runs = [_launch(world, dict(cfg, mode="ring", measure=m)) for m in ("time", "memory")]
        rows.append(_row("ring", world, cfg, *runs, single_peak))
    table = Table(title=f"{'causal ' if cfg['causal'] else ''}attention fwd+bwd over {cfg['seq']} tokens, "
                        f"{cfg['heads']} heads ({cfg['kv_heads']} kv) x {cfg['head_dim']}, {cfg['dtype']}")
    for col in ("impl", "world", "fwd ms", "step ms", "comm wait ms", "share", "sent/rank MiB", "B/token/rank",
                "peak/rank MiB", "extra MiB", "peak vs single"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["impl"], str(r["world"]), f"{r['fwd_ms']:.1f}", f"{r['step_ms']:.1f}",
                      f"{r['comm_wait_ms']:.1f}", f"{r['comm_share']:.1%}", f"{r['bytes_sent_per_rank'] / 2**20:.1f}",
                      f"{r['bytes_per_token_per_rank']:.0f}", f"{r['peak_MiB_per_rank']:.1f}",
                      f"{r['extra_MiB_per_rank']:.1f}",
                      "-" if r["peak_vs_single"] is None else f"{r['peak_vs_single']:.2f}x")
    console.print(table)
    return rows
