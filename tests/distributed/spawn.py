"""Run a function on N gloo processes (CPU) for the distributed tests: each rank's repr(result), or "FAILED
<traceback>", comes back to the parent; a hang fails the test after a bound instead of blocking the suite, and the
failure shows where every unfinished rank was (its Python stacks, dumped just before the bound)."""
from __future__ import annotations

import datetime
import faulthandler
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # the default bound on a whole spawn, and the process group's collective timeout
STACKS_BEFORE_S = 5  # how long before the parent's bound each rank dumps its stacks


def _entry(rank, world, init_file, out_dir, body, args, timeout_s, deadline):
    torch.set_num_threads(1)
    stacks = open(os.path.join(out_dir, f"{rank}.stacks"), "w")   # deadline: the parent's, in time.time()
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time() - STACKS_BEFORE_S), file=stacks)
    # the collective timeout is the spawn's bound: a rank that reaches a collective first (its peer slowed down by
    # a busy machine) waits as long as the parent does
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = repr(body(rank, world, *args))
    except BaseException as e:  # reported to the parent, which asserts on it
        result = "FAILED " + "".join(traceback.format_exception(e))
    finally:
        dist.destroy_process_group()
    faulthandler.cancel_dump_traceback_later()
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(result)


def spawn(tmp_path, world, body, *args, timeout_s: float = TIMEOUT_S):
    """body(rank, world, *args) on `world` gloo processes; returns each rank's repr(result) or "FAILED <traceback>".
    The processes are killed (and the test fails) if they have not all finished within timeout_s."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp_path / "store"), str(tmp_path), body, args, timeout_s,
                                           time.time() + timeout_s), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{body.__name__} on {world} ranks did not finish in {timeout_s} s (hung)\n"
                                     + _where(tmp_path, world))
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [(tmp_path / f"{r}.txt").read_text() for r in range(world)]


def _where(tmp_path, world) -> str:
    """Each rank's result, or the stacks it dumped (what it was doing when the bound was near)."""
    out = []
    for r in range(world):
        done, stacks = tmp_path / f"{r}.txt", tmp_path / f"{r}.stacks"
        if done.exists():
            out.append(f"rank {r} finished: {done.read_text()[:2000]}")
        else:
            out.append(f"rank {r} unfinished, its stacks:\n" + (stacks.read_text()[-6000:] if stacks.exists() else ""))
    return "\n".join(out)
