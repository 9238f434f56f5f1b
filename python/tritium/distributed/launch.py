"""Starting this rank's process group from torchrun's environment, with the backend that fits its device: NCCL when
each rank has a GPU (``cuda:LOCAL_RANK``), gloo on CPUs. The one choice every command line makes under torchrun
(``tritium generate --tp``, ``tritium serve --tp``, ``tritium finetune``, ``tritium.cli.train_dist``); scripts
can call ``init_distributed`` too.

Neither given: CUDA when torch sees a GPU (every rank decides alike, so the ranks never mix backends), else the CPU;
the backend follows the device. Either can be forced: ``backend="gloo"`` alone keeps the CPU, ``backend="nccl"``
alone takes the GPU, and gloo may run on CUDA tensors too; NCCL on the CPU is refused (it takes CUDA tensors
only)."""
from __future__ import annotations

import datetime
import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")
DEVICES = ("cpu", "cuda")


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK; 0 outside torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def pick_backend(device: Optional[str] = None, backend: Optional[str] = None) -> Tuple[str, torch.device]:
    """(backend, this rank's device) for device "cpu" / "cuda" / None and backend "gloo" / "nccl" / None (see the
    module's docstring); "cuda" is ``cuda:LOCAL_RANK``. Raises ValueError for an unknown name, NCCL on the CPU, or a
    GPU this rank does not have."""
    if device is not None and device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES} (or None: CUDA when there is a GPU), got {device!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or None: from the device), got {backend!r}")
    cuda = torch.cuda.is_available()
    if device is None:
        device = {"gloo": "cpu", "nccl": "cuda"}.get(backend, "cuda" if cuda else "cpu")
    if device == "cpu":
        if backend == "nccl":
            raise ValueError("backend nccl takes CUDA tensors only: it needs device cuda, got device cpu "
                             "(use backend gloo on the CPU)")
        return backend or "gloo", torch.device("cpu")
    rank, count = local_rank(), torch.cuda.device_count() if cuda else 0
    if rank >= count:
        raise ValueError(f"device cuda: this rank (LOCAL_RANK {rank}) takes GPU {rank}, but torch sees {count} "
                         f"CUDA device(s)" + ("" if count else " (use device cpu and backend gloo)"))
    return backend or "nccl", torch.device("cuda", rank)


def init_distributed(device: Optional[str] = None, backend: Optional[str] = None,
                     timeout_s: float = 300.0) -> torch.device:
    """init_process_group (under torchrun: RANK, WORLD_SIZE, MASTER_ADDR, ... in the environment) with
    pick_backend's backend, after making this rank's GPU the current CUDA device when it has one (NCCL and the
    library's small collectives use the current device). Returns this rank's device, where the caller puts its
    model and caches. A collective that waits longer than timeout_s fails every rank instead of hanging."""
    backend, dev = pick_backend(device, backend)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dev
