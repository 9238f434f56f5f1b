"""Run a function on N gloo processes (CPU) for the distributed tests: each rank's repr(result), or "FAILED
<traceback>", comes back to the parent; a hang fails the test after a bound instead of blocking the suite."""
from __future__ import annotations

import datetime
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 60  # the process group's collective timeout, and the parent's bound on a whole spawn


def _entry(rank, world, init_file, out_dir, body, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    try:
        result = repr(body(rank, world, *args))
    except BaseException as e:  # reported to the parent, which asserts on it
        result = "FAILED " + "".join(traceback.format_exception(e))
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.txt"), "w") as f:
        f.write(result)


def spawn(tmp_path, world, body, *args, timeout_s: float = TIMEOUT_S):
    """body(rank, world, *args) on `world` gloo processes; returns each rank's repr(result) or "FAILED <traceback>".
    The processes are killed (and the test fails) if they have not all finished within timeout_s."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp_path / "store"), str(tmp_path), body, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{body.__name__} on {world} ranks did not finish in {timeout_s} s (hung)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [(tmp_path / f"{r}.txt").read_text() for r in range(world)]
