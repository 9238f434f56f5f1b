"""``--device`` and ``--backend`` of the commands that run under torchrun (generate --tp, serve --tp, finetune): one
process group per rank, its backend picked from its device by tritium.distributed.init_distributed (NCCL with a GPU
per rank, gloo on the CPU)."""
from __future__ import annotations

from .errors import UsageError


def add_launch_arguments(p) -> None:
    p.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where the model and its caches go (cuda: cuda:LOCAL_RANK under torchrun; default: the CPU in "
                   "one process, under torchrun CUDA when torch sees a GPU, else the CPU)")
    p.add_argument("--backend", default=None, choices=("gloo", "nccl"),
                   help="under torchrun: the process group's backend (default: nccl on CUDA, gloo on the CPU)")


def launch(args, distributed: bool, timeout_s: float = 300.0):
    """This process's torch.device for args.device / args.backend. distributed (under torchrun): the process group
    is started first (init_distributed: the rank's GPU made current for NCCL); the caller destroys it. In one
    process --backend is a usage error (there is no group) and the default device is the CPU."""
    import torch

    from tritium.distributed.launch import init_distributed, pick_backend

    if not distributed and args.backend is not None:
        raise UsageError(f"--backend {args.backend} picks the process group's backend under torchrun; one process "
                         "has no group")
    try:
        if distributed:
            return init_distributed(args.device, args.backend, timeout_s)
        return torch.device("cpu") if args.device in (None, "cpu") else pick_backend(args.device)[1]
    except ValueError as e:
        raise UsageError(f"--device/--backend: {e}") from None
