"""The torchrun recipe for data-parallel training of tritium's classic models (``tritium train``'s digits
configurations) under DDP or FSDP2 (``torch.distributed.fsdp.fully_shard``) with ``tritium.optim.AdamW``:

    torchrun --nproc-per-node 2 -m tritium.cli.train_dist --model encoder --shard fsdp [--compile]

Every rank draws the same global batches as ``tritium train`` (the same seeded order; the recipe's batch size is
the global batch) and trains on its slice of each, so N ranks take the same steps as one process on the whole
batches (tests/distributed/test_training.py checks that on a model without dropout or batch norm). FSDP2 shards
each transformer block and residual block separately, then the rest of the model; DDP replicates the model and
averages gradients. Rank 0 prints the mean loss of the last steps and the test accuracy.

Caveats: dropout draws differ per rank (as in any data-parallel run); batch norm (cnn, resnet) normalises over
each rank's slice of the batch (torch's SyncBatchNorm runs on CUDA only).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import List, Optional

import torch
import torch.distributed as dist


def main(argv: Optional[List[str]] = None) -> int:
    from .errors import UsageError
    from .launch import add_launch_arguments, launch
    from .train import RECIPES, Recipe, accuracy, digits
    from tritium.models.classic import DIGITS, BasicBlock, Block, build
    from tritium.optim import AdamW, warmup_cosine

    p = argparse.ArgumentParser(prog="torchrun ... -m tritium.cli.train_dist", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mlp", choices=sorted(DIGITS))
    p.add_argument("--shard", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--epochs", type=int, default=None, help="default: tritium train's recipe")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the wrapped model (DDP or fully_shard)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile's backend with --compile (default inductor; aot_eager traces without code "
                   "generation)")
    add_launch_arguments(p)   # --device, --backend: nccl with a GPU per rank, gloo on the CPU
    args = p.parse_args(argv)

    try:
        device = launch(args, distributed=True)
    except UsageError as e:   # NCCL asked for on the CPU, a GPU this rank does not have
        p.error(str(e))
    backend = dist.get_backend()
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cpu":
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        recipe = RECIPES[args.model]
        if args.epochs is not None:
            recipe = Recipe(args.epochs, recipe.lr, recipe.batch, recipe.weight_decay)
        if recipe.batch % world:
            raise SystemExit(f"the global batch {recipe.batch} must divide by the number of ranks {world}")
        per = recipe.batch // world
        x_train, y_train, x_test, y_test = (t.to(device) for t in digits(args.seed))
        torch.manual_seed(args.seed)   # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        model, transform = build(args.model, "tritium")
        model.to(device)
        if args.shard == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for m in model.modules():
                if isinstance(m, (Block, BasicBlock)):
                    fully_shard(m)
            wrapped = fully_shard(model)
        if args.compile:   # after wrapping: Dynamo splits DDP's graph at its buckets and traces FSDP2's hooks
            wrapped = torch.compile(wrapped, backend=args.compile_backend)
        steps = recipe.epochs * math.ceil(len(y_train) / recipe.batch)
        opt = AdamW(wrapped.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = warmup_cosine(opt, steps, max(1, steps // 20))
        gen = torch.Generator().manual_seed(args.seed)   # tritium train's batch order, the same on every rank
        perm, pos = torch.randperm(len(y_train), generator=gen), 0
        losses = []
        t0 = time.perf_counter()
        wrapped.train()
        for _ in range(steps):
            if pos + recipe.batch > len(y_train):
                perm, pos = torch.randperm(len(y_train), generator=gen), 0
            idx = perm[pos:pos + recipe.batch][rank * per:(rank + 1) * per].to(device)
            pos += recipe.batch
            loss = model.ops.cross_entropy(wrapped(transform(x_train[idx])), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.detach())
        last = torch.stack(losses[-10:]).mean()
        dist.all_reduce(last)
        seconds = time.perf_counter() - t0
        acc = accuracy(wrapped, transform, x_test, y_test)   # every rank: FSDP2's forward is a collective
        if rank == 0:
            how = f"{args.shard}, compiled ({args.compile_backend})" if args.compile else args.shard
            print(f"{args.model} ({how}, {world} ranks, {backend}): {steps} steps in {seconds:.1f} s, "
                  f"loss {last.item() / world:.4f} (mean of the last steps), test accuracy {acc:.4f}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
