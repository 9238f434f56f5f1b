"""Data-parallel LoRA fine-tuning: ``tritium.finetune.finetune`` on N processes, with DDP over the adapters only.

Every rank holds the whole (frozen) model and the same adapters, draws the same global batches in the same order as
one process does (``tritium.finetune.batches`` with the config's seed) and computes the loss of its slice of each
batch's rows; ``torch.nn.parallel.DistributedDataParallel`` all-reduces the adapters' gradients (the frozen base
weights and the buffers are left out of DDP: nothing of theirs is broadcast or reduced). Each rank's loss is its
rows' summed token losses over the number of labelled tokens of the whole global batch, times the world size (DDP
averages), so the averaged gradient is the gradient of one process's mean over the whole batch: N ranks take the
same steps as one process (tests/distributed/test_training.py). LoRA dropout draws differ per rank (as in any
data-parallel run).

``finetune_fsdp`` is the same fine-tune with FSDP2 (``fully_shard``) instead of DDP: each decoder block is one FSDP
unit and the loss module (with the embedding, the final norm and the LM head) the root, so the frozen base weights
are sharded too (each rank holds 1/N of them between uses) and the adapters' gradients are reduce-scattered. The
blocks use only their own parameters (models/llama.py's Block), which is what per-block sharding needs.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

import tritium

from ..finetune import IGNORE_INDEX, FinetuneConfig, optimizer, prepare, training_batches


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
    return _finetune_dist("finetune_ddp", "ddp", model, tok, examples, cfg, on_step, group)


def finetune_fsdp(model, tok, examples: Sequence[dict], cfg: FinetuneConfig,
                  on_step: Optional[Callable[[int, int, float, int, float], None]] = None,
                  group: Optional[dist.ProcessGroup] = None) -> List[float]:
    """finetune_ddp with FSDP2 (fully_shard per decoder block, then the loss module with the embedding, final
    norm and LM head): the frozen base weights and the adapters sharded across the ranks while training, the same
    steps and losses as one process. On return every rank's model holds its whole weights again (each FSDP unit
    unsharded, a collective), so rank 0 can save and serve the adapters as after finetune_ddp."""
    return _finetune_dist("finetune_fsdp", "fsdp", model, tok, examples, cfg, on_step, group)


def _finetune_dist(fn: str, shard: str, model, tok, examples, cfg, on_step, group) -> List[float]:
    if not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialized (call init_process_group first, "
                           "e.g. under torchrun)")
    if shard == "fsdp" and cfg.quantize() is not None:
        raise NotImplementedError(f"{fn}: QLoRA's NF4 (and int8/int4) base weights are not parameters FSDP2 can "
                                  "shard; use finetune_ddp for qlora or a quantized base")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    # the same adapters on every rank (seeded; DDP broadcasts rank 0's anyway)
    encoded, total, opt, sched = prepare(fn, model, tok, examples, cfg)
    model.pack_for_inference(False)
    device = model.device   # where the batches go (the rank's GPU under NCCL)
    wrapper = _SFTLossSum(model)
    if shard == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # DDP over the adapters only: the frozen weights and the buffers are the same on every rank already
        DDP._set_params_and_buffers_to_ignore_for_model(
            wrapper, [n for n, p in wrapper.named_parameters() if not p.requires_grad] +
            [n for n, _ in wrapper.named_buffers()])
        step_module = DDP(wrapper, process_group=group)
        units = []
    else:
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(group or dist.group.WORLD, model.device.type)
        units = [fully_shard(block, mesh=mesh) for block in model.layers]
        step_module = fully_shard(wrapper, mesh=mesh)
        units.append(step_module)
        # fully_shard replaced the params with sharded ones: the optimizer steps those
        opt, sched = optimizer([p for p in wrapper.parameters() if p.requires_grad], cfg, total)
    model.train()
    losses: List[float] = []
    with warnings.catch_warnings():
        # FSDP2 warns that a block returns a view (the norm kernel's 2-D output seen as (batch, seq, dim)): an
        # in-place op on it would skip its hook, and nothing modifies a block's outputs in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
        _train_steps(step_module, encoded, tok, cfg, total, opt, sched, rank, world, group, on_step, losses, device)
    for unit in units:   # the whole weights back on every rank (plain tensors) for saving and serving
        unit.unshard()
    model.eval()
    return losses


def _train_steps(step_module, encoded, tok, cfg, total, opt, sched, rank, world, group, on_step, losses, device):
    for step, ids, labels in training_batches(encoded, tok, cfg, total, device):
        t0 = time.perf_counter()
        n_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())   # the whole batch's, as one process's mean
        mine = slice(rank * len(ids) // world, (rank + 1) * len(ids) // world)
        x, y = ids[mine], labels[mine]
        if not len(x):   # fewer rows than ranks: a row that learns nothing keeps this rank in the step
            x, y = ids[:1], torch.full_like(labels[:1], IGNORE_INDEX)
        # DDP and FSDP2 average the ranks' gradients: each rank's loss is its token sum over the batch's mean share
        loss = step_module(x, y, n_tokens / world)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        whole = loss.detach().float() / world
        dist.all_reduce(whole, group=group)
        losses.append(whole.item())
        if on_step is not None:
            on_step(step, total, losses[-1], x.numel(), time.perf_counter() - t0)
