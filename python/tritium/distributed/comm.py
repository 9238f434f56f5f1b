"""The collectives tensor parallelism uses, wrapped so their payloads can be counted, and the agreement step that
turns bad input on one rank into the same error on every rank.

``count_comm()`` collects, per kind of collective, the bytes of the tensors this rank passes to it: an all-reduce
counts the tensor reduced, an all-gather this rank's contribution. That is the payload, the quantity the
analytic cost of tensor-parallel decoding speaks of (2 all-reduces of a (tokens, hidden) activation per layer);
what goes on the wire depends on the backend's algorithm (a ring all-reduce sends 2 (world - 1) / world times the
payload per rank).
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclasses.dataclass
class CommStats:
    """Payload bytes and calls per kind of collective on this rank while collecting (kinds: "all_reduce",
    "all_gather", "check": the per-call agreement of tensor-parallel forwards), and the seconds spent inside the
    collectives (blocking calls: the transfer, and waiting for ranks that are still computing)."""
    bytes: Dict[str, int] = dataclasses.field(default_factory=dict)
    calls: Dict[str, int] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def add(self, kind: str, t: Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + t.numel() * t.element_size()
        self.calls[kind] = self.calls.get(kind, 0) + 1


_STATS: List[CommStats] = []


@contextlib.contextmanager
def count_comm() -> Iterator[CommStats]:
    """Count this rank's tensor-parallel collectives (all_reduce, all_gather, agree) inside the block."""
    st = CommStats()
    _STATS.append(st)
    try:
        yield st
    finally:
        _STATS.remove(st)


def _count(kind: str, t: Tensor) -> None:
    for st in _STATS:
        st.add(kind, t)


def meta_device(group=None) -> torch.device:
    """Where collectives of this group take small tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _timed(fn, *args, **kwargs):
    if not _STATS:
        return fn(*args, **kwargs)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    dt = time.perf_counter() - t0
    for st in _STATS:
        st.seconds += dt
    return out


def all_reduce(t: Tensor, op=dist.ReduceOp.SUM, group=None, kind: str = "all_reduce") -> Tensor:
    """In-place all-reduce of t (contiguous) over group; returns t. On a group of one rank it is the identity and
    is not called (counted all the same: the payload is the algorithm's, whatever the world size)."""
    _count(kind, t)
    if dist.get_world_size(group) > 1:
        _timed(dist.all_reduce, t, op=op, group=group)
    return t


def all_gather(t: Tensor, group=None, kind: str = "all_gather") -> Tensor:
    """(world, *t.shape): every rank's t, stacked in rank order."""
    world = dist.get_world_size(group)
    _count(kind, t)
    if world == 1:   # the identity: no call into the backend (as Megatron's mappings skip a group of one)
        return t.unsqueeze(0).clone()
    out = [torch.empty_like(t) for _ in range(world)]
    _timed(dist.all_gather, out, t.contiguous(), group=group)
    return torch.stack(out)


def agree(what: str, error: Optional[str], values: Sequence[int] = (), names: Sequence[str] = (),
          group=None) -> None:
    """Collective: raise the same ValueError on every rank when any rank has an error (this rank's message, or
    None) or passed values that differ from rank 0's (names: what each value is). The message names the rank.
    One small all-gather of integers when all is well (counted as "check"); the messages themselves travel only
    when one rank failed."""
    world = dist.get_world_size(group)
    mine = torch.tensor([0 if error is None else 1, *values], dtype=torch.int64, device=meta_device(group))
    table = all_gather(mine, group, kind="check").cpu()
    bad = [r for r in range(world) if table[r, 0]]
    if bad:
        msgs: List[Optional[str]] = [None] * world
        dist.all_gather_object(msgs, error, group=group)
        r = bad[0]
        raise ValueError(f"{what}: rank {r}: {msgs[r]}")
    for r in range(1, world):
        for i, name in enumerate(names):
            if table[r, 1 + i] != table[0, 1 + i]:
                raise ValueError(f"{what}: rank {r}: {name} {int(table[r, 1 + i])} differs from rank 0's "
                                 f"{int(table[0, 1 + i])}; every rank must pass the same input")
