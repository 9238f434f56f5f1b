"""Data-parallel LoRA fine-tuning: ``tritium.finetune.finetune`` on N processes, with DDP over the adapters only.

Every rank holds the whole (frozen) model and the same adapters, draws the same global batches in the same order as
one process does (``tritium.finetune.batches`` with the config's seed) and computes the loss of its slice of each
batch's rows; ``torch.nn.parallel.DistributedDataParallel`` all-reduces the adapters' gradients (the frozen base
weights and the buffers are left out of DDP: nothing of theirs is broadcast or reduced). Each rank's loss is its
rows' summed token losses over the number of labelled tokens of the whole global batch, times the world size (DDP
averages), so the averaged gradient is the gradient of one process's mean over the whole batch: N ranks take the
same steps as one process (tests/distributed/test_training.py). LoRA dropout draws differ per rank (as in any
data-parallel run).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import tritium

from ..finetune import IGNORE_INDEX, FinetuneConfig, prepare, training_batches


class _SFTLossSum(torch.nn.Module):
    """The module DDP wraps: the summed next-token loss of a batch's labelled tokens, over `scale`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor, labels: Tensor, scale: float) -> Tensor:
        hidden = self.model.hidden_states(ids[:, :-1])
        return tritium.fused_linear_cross_entropy(hidden, self.model.lm_head.weight, labels[:, 1:],
                                                  ignore_index=IGNORE_INDEX, reduction="sum") / scale


def finetune_ddp(model, tok, examples: Sequence[dict], cfg: FinetuneConfig,
                 on_step: Optional[Callable[[int, int, float, int, float], None]] = None,
                 group: Optional[dist.ProcessGroup] = None) -> List[float]:
    """tritium.finetune.finetune on every rank of group (a collective; torch.distributed initialised, every rank
    with the same model and examples): the same adapters, steps and losses as one process over the whole batches.
    Returns every step's loss (the whole batch's mean, the same on every rank); on_step(step, total, loss, tokens,
    seconds) as finetune's (tokens: this rank's)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not dist.is_initialized():
        raise RuntimeError("finetune_ddp: torch.distributed is not initialized (call init_process_group first, "
                           "e.g. under torchrun)")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # the same adapters on every rank (seeded; DDP broadcasts rank 0's anyway)
    encoded, total, opt, sched = prepare("finetune_ddp", model, tok, examples, cfg)
    model.pack_for_inference(False)
    wrapper = _SFTLossSum(model)
    # DDP over the adapters only: the frozen weights and the buffers are the same on every rank already
    DDP._set_params_and_buffers_to_ignore_for_model(
        wrapper, [n for n, p in wrapper.named_parameters() if not p.requires_grad] +
        [n for n, _ in wrapper.named_buffers()])
    ddp = DDP(wrapper, process_group=group)
    model.train()
    losses: List[float] = []
    for step, ids, labels in training_batches(encoded, tok, cfg, total):
        t0 = time.perf_counter()
        n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())   # the whole batch's, as one process's mean
        mine = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
        x, y = ids[mine], labels[mine]
        if not len(x):   # fewer rows than ranks: a row that learns nothing keeps this rank in DDP's step
            x, y = ids[:1], torch.full_like(labels[:1], IGNORE_INDEX)
        loss = ddp(x, y, n_tokens / world)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        whole = loss.detach().float() / world
        dist.all_reduce(whole, group=group)
        losses.append(whole.item())
        if on_step is not None:
            on_step(step, total, losses[-1], x.numel(), time.perf_counter() - t0)
    model.eval()
    return losses
