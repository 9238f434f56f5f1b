"""Fused optimizers: ``tritium.optim.AdamW`` and ``tritium.optim.SGD``, drop-ins for torch.optim's.

Each step makes one kernel call per group of params sharing a device and dtype (``tritium.ops.optim``: C++ on
CPU, Triton on CUDA), whatever the number of tensors. Arguments, defaults, math and ``state_dict`` are
torch.optim's (the same state keys: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
``momentum_buffer``), so a state_dict saved by one loads in the other; ``zero_grad``, LR schedulers (the lr is
read from the param group at every step; a one-element tensor lr works too) and ``torch.compile`` of the step
work as with torch.optim.

``master_weights=True``: a bfloat16/float16 param is updated through a float32 copy kept in the state
(``master_param``) with float32 optimizer state; every step writes the copy, rounded to nearest, into the 16-bit
param. The model trains in 16 bits while the update keeps float32's precision (small updates to a large weight
are not lost to 16-bit rounding). Float32 params are unaffected by the flag.

DTensor params (FSDP2's ``fully_shard``) are stepped through their local shards: the update is elementwise.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import Tensor

from ._dtypes import HALF_DTYPES
from .ops import optim as _ops

__all__ = ["AdamW", "SGD", "warmup_cosine"]

_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "master_param")


def _local_shards(params: List[Tensor], grads: List[Tensor], *others: List[Tensor]) -> tuple:
    """The lists with every DTensor (FSDP2's fully_shard, tensor-parallel params) replaced by its local shard (a
    view: the kernel's in-place updates land in the DTensor). The update is elementwise, so each rank stepping its
    shards is the whole step, given a param and its gradient laid out alike (checked)."""
    if not any(type(t).__name__ == "DTensor" for t in params):
        return (params, grads) + others
    from torch.distributed.tensor import DTensor

    for p, g in zip(params, grads):
        if isinstance(p, DTensor) and (not isinstance(g, DTensor) or g.placements != p.placements):
            raise ValueError(f"a DTensor param with placements {p.placements} has a gradient laid out as "
                             f"{getattr(g, 'placements', 'a plain tensor')}: tritium.optim steps local shards and "
                             f"needs the two alike")

    def local(ts):
        return [t.to_local() if isinstance(t, DTensor) else t for t in ts]
    return tuple(local(ts) for ts in (params, grads) + others)


def _check_lr(lr) -> None:
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    elif not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")


class _Fused(torch.optim.Optimizer):
    """What AdamW and SGD share: grouping a param group's tensors by (device, dtype), master weights, state_dict."""

    _name = ""

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)  # keys a torch.optim state_dict does not carry (master_weights)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's load_state_dict, which casts floating state to its param's dtype; a master-weights group
        keeps float32 state, so its tensors are taken from the saved dict again in float32 (a bfloat16 state from
        torch.optim is widened exactly; a float32 one keeps its bits)."""
        master = [g.get("master_weights", self.defaults["master_weights"]) for g in self.param_groups]
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        for group, saved_group, keep in zip(self.param_groups, state_dict["param_groups"], master):
            group["master_weights"] = keep
            if not keep:
                continue
            for p, pid in zip(group["params"], saved_group["params"]):
                if p.dtype not in HALF_DTYPES or pid not in saved:
                    continue
                st = self.state[p]
                for key, value in saved[pid].items():
                    if key in _STATE_KEYS and isinstance(value, Tensor) and value.is_floating_point():
                        st[key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    @staticmethod
    def _closure_loss(closure):
        """closure()'s loss computed with autograd on (step runs under no_grad), or None without a closure."""
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _buckets(self, group: Dict[str, Any]) -> List[List[Tensor]]:
        """The params of a group that have a gradient, in order, split by (device, dtype); sparse gradients are
        rejected (like torch.optim.AdamW; torch.optim.SparseAdam is the optimizer for them)."""
        keys: List[Any] = []
        buckets: List[List[Tensor]] = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(f"tritium.optim.{self._name} does not support sparse gradients (a param of shape "
                                   f"{tuple(p.shape)} has a sparse grad); use torch.optim.SparseAdam or dense "
                                   f"gradients")
            key = (p.device, p.dtype)
            if key in keys:
                buckets[keys.index(key)].append(p)
            else:
                keys.append(key)
                buckets.append([p])
        return buckets

    @staticmethod
    def _master(st: Dict[str, Any], p: Tensor) -> Tensor:
        """The float32 copy a master-weights param is updated through (made from the param the first time)."""
        m = st.get("master_param")
        if m is None or m.dtype != torch.float32 or m.device != p.device:
            m = p.detach().to(torch.float32, copy=True)
            st["master_param"] = m
        return m

    @staticmethod
    def _state_tensor(st: Dict[str, Any], key: str, like: Tensor) -> Tensor:
        """st[key], created as zeros like `like` when missing, or converted to like's dtype and device (a state
        loaded from an optimizer that kept it in another dtype)."""
        t = st.get(key)
        if t is None:
            t = torch.zeros_like(like, memory_format=torch.preserve_format)
            st[key] = t
        elif t.dtype != like.dtype or t.device != like.device:
            t = t.to(device=like.device, dtype=like.dtype)
            st[key] = t
        return t


class AdamW(_Fused):
    """torch.optim.AdamW with a fused multi-tensor step (see the module doc); ``master_weights`` keeps float32
    copies and state for 16-bit params."""

    _name = "AdamW"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False, *, maximize: bool = False, master_weights: bool = False) -> None:
        _check_lr(lr)
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = dict(lr=lr, betas=tuple(float(b) for b in betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, master_weights=master_weights)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every param with a gradient; returns closure()'s loss when a closure is given."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            amsgrad, master = group["amsgrad"], group["master_weights"]
            beta1, beta2 = group["betas"]
            for bucket in self._buckets(group):
                use_master = master and bucket[0].dtype in HALF_DTYPES
                params, grads, m, v, vmax, steps, p16 = [], [], [], [], [], [], []
                for p in bucket:
                    st = self.state[p]
                    w = self._master(st, p) if use_master else p
                    # torch.optim's step: a float32 scalar, kept on the param's device (the CPU for CPU params;
                    # on a GPU the kernel reads it there, as torch's fused optimizers keep it)
                    step = st.get("step")
                    if step is None:
                        step = st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    elif step.device != p.device or not step.is_floating_point():
                        step = st["step"] = step.to(device=p.device, dtype=torch.float32)
                    params.append(w)
                    grads.append(p.grad)
                    m.append(self._state_tensor(st, "exp_avg", w))
                    v.append(self._state_tensor(st, "exp_avg_sq", w))
                    if amsgrad:
                        vmax.append(self._state_tensor(st, "max_exp_avg_sq", w))
                    steps.append(step)
                    if use_master:
                        p16.append(p)
                lr = group["lr"]
                if isinstance(lr, Tensor) and lr.device != bucket[0].device:
                    lr = lr.to(bucket[0].device)
                params, grads, m, v, vmax, p16 = _local_shards(params, grads, m, v, vmax, p16)
                _ops.adamw_group_(params, grads, m, v, vmax, steps, p16, lr, beta1, beta2, group["weight_decay"],
                                  group["eps"], group["maximize"])
        return loss


class SGD(_Fused):
    """torch.optim.SGD with a fused multi-tensor step (see the module doc); ``master_weights`` keeps float32
    copies and momentum buffers for 16-bit params."""

    _name = "SGD"

    def __init__(self, params, lr=1e-3, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False, *, maximize: bool = False, master_weights: bool = False) -> None:
        _check_lr(lr)
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize, master_weights=master_weights)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step over every param with a gradient; returns closure()'s loss when a closure is given."""
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            momentum, master = group["momentum"], group["master_weights"]
            for bucket in self._buckets(group):
                use_master = master and bucket[0].dtype in HALF_DTYPES
                # params whose momentum buffer exists, and those starting one this step (torch.optim sets a new
                # buffer to the gradient): at most two calls, the second only on a param's first step
                parts: List[List[Any]] = [[[], [], [], []], [[], [], [], []]]  # [old, new] x (params, grads, bufs, p16)
                for p in bucket:
                    st = self.state[p]
                    w = self._master(st, p) if use_master else p
                    new = momentum != 0 and st.get("momentum_buffer") is None
                    part = parts[1 if new else 0]
                    part[0].append(w)
                    part[1].append(p.grad)
                    if momentum != 0:
                        if new:
                            st["momentum_buffer"] = torch.empty_like(w, memory_format=torch.preserve_format)
                        part[2].append(self._state_tensor(st, "momentum_buffer", w))
                    if use_master:
                        part[3].append(p)
                lr = group["lr"]
                if isinstance(lr, Tensor) and lr.device != bucket[0].device:
                    lr = lr.to(bucket[0].device)
                for first, (params, grads, bufs, p16) in enumerate(parts):
                    if params:
                        params, grads, bufs, p16 = _local_shards(params, grads, bufs, p16)
                        _ops.sgd_group_(params, grads, bufs, p16, lr, group["weight_decay"], momentum,
                                        group["dampening"], group["nesterov"], group["maximize"], bool(first))
        return loss


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int,
                  floor: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of tritium's training recipes: linear warm-up over warmup_steps, then a cosine
    decay from the optimizer's lr to floor times it at total_steps (held there after)."""
    def factor(s: int) -> float:
        return min(1.0, (s + 1) / warmup_steps) * (
            floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
