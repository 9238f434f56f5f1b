"""Run a function on N gloo processes (CPU) for the distributed tests: each rank's repr(result), or "FAILED
<traceback>", comes back to the parent; a hang fails the test after a bound instead of blocking the suite, and the
failure shows where every unfinished rank was (its Python stacks, dumped just before the bound)."""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import re
import signal
import subprocess
import sys
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


def cli_env():
    """The environment a `python -m tritium` / torchrun child of a test needs (this process's import path, wide
    report lines) and the torchrun next to this interpreter."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), COLUMNS="300")
    return env, os.path.join(os.path.dirname(sys.executable), "torchrun")


def one_and_tp2(args, env=None, timeout=300):
    """`python -m tritium *args` in one process and `torchrun --nproc-per-node 2 -m tritium *args --tp 2` (env:
    cli_env()'s by default): both finished processes, after asserting that both succeeded."""
    default_env, torchrun = cli_env()
    env = default_env if env is None else env
    one = subprocess.run([sys.executable, "-m", "tritium", *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    two = subprocess.run([torchrun, "--nproc-per-node", "2", "-m", "tritium", *args, "--tp", "2"],
                         capture_output=True, text=True, env=env, timeout=timeout)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    return one, two


@contextlib.contextmanager
def torchrun_serve(flags, env=None):
    """`torchrun --nproc-per-node 2 -m tritium serve --tp 2 --port 0 *flags` in its own process group; yields (the
    server's base URL, the lines it printed up to announcing it). On exit: Ctrl-C to torchrun and its ranks, then
    SIGKILL if they linger."""
    default_env, torchrun = cli_env()
    env = default_env if env is None else env
    p = subprocess.Popen([torchrun, "--nproc-per-node", "2", "-m", "tritium", "serve", "--tp", "2", "--port", "0",
                          *flags, "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                         start_new_session=True)
    try:
        lines, m = [], None
        for line in p.stdout:
            lines.append(line)
            m = re.search(r"on (http://127\.0\.0\.1:(\d+))/v1", line)
            if m:
                break
        assert m, "".join(lines)
        yield m.group(1), "".join(lines)
    finally:
        os.killpg(p.pid, signal.SIGINT)
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
