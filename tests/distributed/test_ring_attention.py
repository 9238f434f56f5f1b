"""tritium.distributed.ring_attention on 2, 3 and 4 gloo processes (CPU) against attention over the whole sequence in
one process: values, log-sum-exp and the gradients of q, k, v, causal (zigzag layout) and not, GQA, sequence
lengths that do not divide the world size, float32 and bfloat16 (DESIGN.md's tolerance rule against float64);
bad input on one rank makes every rank raise the same error naming it, and nothing hangs."""
from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tritium
from tests.util import assert_within_torch_error
from tritium import reference
from tritium.distributed import (collect_stats, ring_attention, zigzag_gather, zigzag_lengths,
                                 zigzag_local_lengths, zigzag_shard, zigzag_unshard)

TIMEOUT_S = 60  # the process group's collective timeout, and the parent's bound on a whole spawn

# (batch, heads, kv heads, seq, head dim, v head dim, causal, dtype, split of the non-causal sequence)
CASES = {
    "causal": (2, 4, 4, 37, 32, 32, True, torch.float32, None),
    "causal_gqa": (1, 6, 2, 13, 16, 16, True, torch.float32, None),
    "causal_mqa_short": (1, 4, 1, 5, 16, 16, True, torch.float32, None),   # fewer positions than chunks
    "full_gqa_uneven": (1, 4, 2, 23, 16, 24, False, torch.float32, "contiguous"),
    "full_zigzag": (2, 2, 2, 19, 32, 32, False, torch.float32, "zigzag"),
    "causal_bf16": (1, 4, 2, 45, 32, 32, True, torch.bfloat16, None),
    "full_bf16": (1, 4, 4, 29, 64, 64, False, torch.bfloat16, "contiguous"),
}


# ---- spawning ----
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


def _spawn(tmp_path, world, body, *args):
    """body(rank, world, *args) on `world` gloo processes; returns each rank's repr(result) or "FAILED <traceback>".
    The processes are killed (and the test fails) if they have not all finished within TIMEOUT_S."""
    ctx = mp.start_processes(_entry, args=(world, str(tmp_path / "store"), str(tmp_path), body, args),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise AssertionError(f"{body.__name__} on {world} ranks did not finish in {TIMEOUT_S} s (hung)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [(tmp_path / f"{r}.txt").read_text() for r in range(world)]


# ---- the checks each rank runs ----
def _inputs(case, seed):
    B, H, Hkv, N, D, Dv, causal, dtype, _ = CASES[case]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, N, d, generator=g, dtype=torch.float64).to(dtype)
               for h, d in ((H, D), (Hkv, D), (Hkv, Dv)))
    dy = torch.randn(B, H, N, Dv, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(B, H, N, generator=g, dtype=torch.float64).float()
    return q, k, v, dy, dlse


def _full(fn, q, k, v, dy, dlse, dtype):
    """(out, lse, dq, dk, dv) of fn over the whole sequence, inputs in dtype (the loss: out . dy + lse . dlse)."""
    ins = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*ins)
    gs = torch.autograd.grad((out * dy.to(dtype)).sum() + (lse * dlse.to(lse.dtype)).sum(), ins)
    return (out.detach(), lse.detach()) + gs


def _check_case(rank, world, case):
    B, H, Hkv, N, D, Dv, causal, dtype, split = CASES[case]
    q, k, v, dy, dlse = _inputs(case, seed=len(case))
    if causal or split == "zigzag":
        def shard(t):
            return zigzag_shard(t, rank, world)
        kv_shard = shard
    else:  # any split: q in uneven contiguous pieces, k and v in the zigzag layout
        def shard(t):
            return torch.tensor_split(t, world, dim=2)[rank]

        def kv_shard(t):
            return zigzag_shard(t, rank, world)
    ql, kl, vl = (leaf.clone().requires_grad_(True) for leaf in (shard(q), kv_shard(k), kv_shard(v)))
    out, lse = ring_attention(ql, kl, vl, causal=causal, return_lse=True)
    gs = torch.autograd.grad((out * shard(dy)).sum() + (lse * shard(dlse)).sum(), (ql, kl, vl))
    ours = (out.detach(), lse.detach()) + gs

    def flash(q_, k_, v_):
        return tritium.flash_attention(q_, k_, v_, causal=causal, return_lse=True)

    def ref(q_, k_, v_):
        return reference.flash_attention(q_, k_, v_, causal=causal, return_lse=True)

    single = _full(flash, q, k, v, dy, dlse, dtype)
    theirs = _full(ref, q, k, v, dy, dlse, dtype)
    ref64 = _full(ref, q, k, v, dy, dlse, torch.float64)
    names = ("out", "lse", "dq", "dk", "dv")
    for i, name in enumerate(names):
        cut = shard if i < 3 else kv_shard
        what = f"{case} rank {rank}/{world} {name}"
        assert ours[i].dtype == single[i].dtype, f"{what}: dtype {ours[i].dtype} != {single[i].dtype}"
        assert_within_torch_error(ours[i], cut(theirs[i]), cut(ref64[i]), what)
        # and against tritium.flash_attention on the whole sequence in this dtype
        assert_within_torch_error(cut(single[i]), cut(theirs[i]), cut(ref64[i]), what + " (single process)")
        if dtype == torch.float32:
            torch.testing.assert_close(ours[i], cut(single[i]), msg=lambda m: f"{what} vs flash_attention: {m}")
    return "ok"


def _check_cases(rank, world, cases):
    for case in cases:
        _check_case(rank, world, case)
    full = torch.arange(2 * 3 * 11, dtype=torch.float32).view(2, 3, 11)
    assert torch.equal(zigzag_gather(zigzag_shard(full, rank, world)), full)
    # bytes sent, as `tritium bench dist` reports them: forward (world - 1) K/V blocks, backward (world - 1) K/V
    # blocks and world float32 dK/dV blocks (bfloat16 inputs, 8 positions per rank)
    q, k, v = (torch.randn(1, h, 8, 16, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    with collect_stats() as st:
        ring_attention(q, k, v, causal=True).sum().backward()
    block = 2 * (2 * 8 * 16)  # elements of one rank's k and v
    assert st.bytes_sent == 2 * (world - 1) * block * 2 + world * block * 4, st
    return "ok"


# ---- tests ----
def test_zigzag_layout():
    """zigzag_shard gives rank r chunks r and 2w-1-r of 2w near-equal chunks; zigzag_unshard inverts it."""
    assert zigzag_lengths(13, 4) == [2, 2, 2, 2, 2, 1, 1, 1]
    assert zigzag_local_lengths(13, 4) == [(2, 1), (2, 1), (2, 1), (2, 2)]
    assert zigzag_lengths(3, 2) == [1, 1, 1, 0]
    x = torch.arange(13).view(1, 1, 13, 1)
    parts = [zigzag_shard(x, r, 4) for r in range(4)]
    assert parts[0].flatten().tolist() == [0, 1, 12] and parts[3].flatten().tolist() == [6, 7, 8, 9]
    assert torch.equal(zigzag_unshard(parts), x)
    with pytest.raises(ValueError, match="part 1 has 2 positions"):
        zigzag_unshard([parts[0], parts[1][:, :, :2], parts[2], parts[3]])


@pytest.mark.parametrize("world", [2, 4])
def test_ring_attention_matches_single_process(tmp_path, world):
    results = _spawn(tmp_path, world, _check_cases, list(CASES))
    assert results == ["'ok'"] * world, "\n".join(results)


# ---- bad input: every rank raises the same error, naming the bad rank ----
BAD = {
    # name: (what the bad rank passes differently, the error's type and a piece of its message)
    "head_dim": ("ValueError", "rank 1: q/k head dim 24 differs from rank 0's 16"),
    "not_4d": ("ValueError", "rank 1: k must be a 4-D (batch, heads, seq, dim) tensor, got 3 dims"),
    "dtype": ("ValueError", "rank 1: dtype torch.float64 differs from rank 0's torch.float32"),
    "layout": ("ValueError", "rank 1: holds 5 positions, but causal ring attention takes the zigzag layout"),
    "requires_grad": ("ValueError", "rank 1: grad mode (inputs requiring grad) 0 differs from rank 0's 1"),
    "scale": ("ValueError", "rank 1: scale must be None or a positive number, got -1.0"),
}


def _bad_inputs(rank, world):
    got = {}
    for name in BAD:
        q, k, v = (torch.randn(1, 2, 3, 16, requires_grad=True) for _ in range(3))  # 3 = zigzag share of 9 on 3
        kw = dict(causal=True)
        if rank == 1:
            if name == "head_dim":
                q, k = torch.randn(1, 2, 3, 24), torch.randn(1, 2, 3, 24)
            elif name == "not_4d":
                k = torch.randn(2, 3, 16)
            elif name == "dtype":
                q, k, v = (t.detach().double() for t in (q, k, v))
            elif name == "layout":
                q, k, v = (torch.randn(1, 2, 5, 16, requires_grad=True) for _ in range(3))
            elif name == "requires_grad":
                q, k, v = (t.detach() for t in (q, k, v))
            elif name == "scale":
                kw["scale"] = -1.0
        try:
            ring_attention(q, k, v, **kw).sum().backward()
            got[name] = "no error"
        except Exception as e:
            got[name] = f"{type(e).__name__}: {e}"
    # the group is still usable after the errors: a good call on 3 ranks (an odd world size) is exact
    x = torch.randn(1, 2, 9, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ring_attention(*(zigzag_shard(x, rank, world) for _ in range(3)), causal=True)
    want = zigzag_shard(reference.flash_attention(x, x, x, causal=True), rank, world)
    torch.testing.assert_close(out, want)
    return got


def test_bad_input_on_one_rank_fails_every_rank(tmp_path):
    t0 = time.monotonic()
    results = _spawn(tmp_path, 3, _bad_inputs)
    assert not any(r.startswith("FAILED") for r in results), "\n".join(results)
    per_rank = [eval(r) for r in results]
    for name, (exc, msg) in BAD.items():
        for rank, got in enumerate(per_rank):
            assert got[name].startswith(f"{exc}: ring_attention: {msg}"), f"{name} on rank {rank}: {got[name]}"
        assert len({got[name] for got in per_rank}) == 1, f"{name}: ranks raised different errors"
    assert time.monotonic() - t0 < TIMEOUT_S / 2  # nobody waited for a collective's timeout


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ring_attention(torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16), torch.randn(1, 1, 2, 16))
