"""Fused sampling: penalties, logit bias, temperature, top-k, top-p, min-p and the draw in one pass per row.

``tritium.sample(logits, params, history=None)`` returns ``(tokens, logprobs)``:
- tokens int64 (batch,): the drawn token of each row (temperature 0: the argmax, first maximal index);
- logprobs float32 (batch,): the chosen token's log-probability under the model's RAW distribution
  ``log_softmax(logits)`` (before penalties, bias, temperature and truncation), the quantity an engine reports
  and scores sequences by; it is the same whether a row is greedy or sampled.

The distribution a row is drawn from is ``tritium.reference.sampling_distribution`` (each step documented
there; the kept set after top-k/top-p/min-p is always {p >= cut}, so ties at a cut are kept). Every row has its
own ``SamplingParams``, so a batch mixes greedy and sampled rows. Determinism: a row with ``seed`` set draws
its uniform number from (seed, number of history tokens), so the same logits, history and seed always give the
same token, and successive decode steps get fresh numbers; rows without a seed use torch's global generator
(``torch.manual_seed`` makes them reproducible). The draw is inverse-CDF in index order with that one number, so
the C++ and Triton kernels and the reference pick the same token from the same number.

A row whose logits contain NaN or +inf, or have no finite value left after penalties and bias, raises a
ValueError naming the rows (default), or with ``on_invalid="flag"`` gets token -1 and logprob NaN.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import reference
from ._library import define_op, kernel_ok


@dataclass
class SamplingParams:
    """Per-row sampling parameters. temperature 0 is greedy; top_k 0, top_p 1 and min_p 0 disable truncation;
    repetition_penalty 1, presence/frequency_penalty 0 disable penalties; logit_bias {token: bias};
    seed makes the row's draws reproducible."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = None
    seed: Optional[int] = None

    def __post_init__(self):
        self.validate()

    def validate(self, vocab_size: Optional[int] = None) -> None:
        def bad(field, want):
            raise ValueError(f"SamplingParams.{field} must be {want}, got {getattr(self, field)!r}")

        def real(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        if not real(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "an int >= 0 (0 = off)")
        if not real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not real(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        if not real(self.presence_penalty):
            bad("presence_penalty", "a finite number")
        if not real(self.frequency_penalty):
            bad("frequency_penalty", "a finite number")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "a dict {token id: bias} or None")
            for t, b in self.logit_bias.items():
                if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                    bad("logit_bias", f"keyed by token ids in [0, {vocab_size or 'vocab'})")
                if not isinstance(b, (int, float)) or math.isnan(b):
                    bad("logit_bias", "a dict of non-NaN biases")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad("seed", "an int or None")


def _fake_sample(logits, uniform, params, history, bias_idx, bias_val):
    b = logits.shape[0]
    return logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b,), dtype=torch.float32)


sample_op = define_op(
    "sample_fwd(Tensor logits, Tensor uniform, Tensor params, Tensor? history, Tensor? bias_idx,"
    " Tensor? bias_val) -> (Tensor, Tensor)", _fake_sample, "sampling:sample_fwd")

_MASK64 = (1 << 64) - 1


def seeded_uniform(seed: int, step: int) -> float:
    """The uniform number in [0, 1) of draw number `step` of a seeded row: splitmix64 of (seed, step), 24 bits."""
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 40) / float(1 << 24)


_HistoryT = Union[None, Tensor, Sequence[Union[Sequence[int], Tensor]]]


def _history_tensor(history: _HistoryT, batch: int, device) -> Optional[Tensor]:
    """history as int64 (batch, L) padded with -1 (None if empty)."""
    if history is None:
        return None
    if isinstance(history, Tensor):
        if history.dim() != 2 or history.shape[0] != batch or history.dtype != torch.int64:
            raise ValueError(f"sample: a history tensor must be int64 ({batch}, L) padded with -1, got "
                             f"{history.dtype} {tuple(history.shape)}")
        return history.to(device) if history.shape[1] else None
    if len(history) != batch:
        raise ValueError(f"sample: history must have one sequence per row ({batch}), got {len(history)}")
    rows = [h.tolist() if isinstance(h, Tensor) else list(h) for h in history]
    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return None
    out = torch.full((batch, width), -1, dtype=torch.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
    return out.to(device, non_blocking=True)


def _steps(history: _HistoryT, ht: Optional[Tensor], batch: int) -> List[int]:
    if history is None or ht is None:
        return [0] * batch
    if isinstance(history, Tensor):
        return (ht >= 0).sum(1).tolist()  # host sync, only when a seeded row needs its step
    return [len(h) for h in history]


def params_table(plist: Sequence[SamplingParams], vocab: int, device=None) -> Tensor:
    """sample_fwd's params: float32 (batch, 7), one row per SamplingParams (temperature, top_k capped at the
    vocabulary, top_p, min_p, repetition, presence and frequency penalties)."""
    return torch.tensor([[p.temperature, min(p.top_k, vocab), p.top_p, p.min_p, p.repetition_penalty,
                          p.presence_penalty, p.frequency_penalty] for p in plist], dtype=torch.float32,
                        device=device)


def sample(logits: Tensor, params: Union[SamplingParams, Sequence[SamplingParams]], history: _HistoryT = None,
           *, on_invalid: str = "raise") -> tuple[Tensor, Tensor]:
    """Draw one token per row of logits (batch, vocab) under per-row SamplingParams (one for all rows, or a
    list with one per row), applying penalties over `history` (the tokens each row has produced: a list of
    token lists/tensors, or an int64 (batch, L) tensor padded with -1; tokens outside the vocabulary are
    ignored). Returns (tokens int64 (batch,), logprobs float32 (batch,)); see the module docstring."""
    if on_invalid not in ("raise", "flag"):
        raise ValueError(f"sample: on_invalid must be 'raise' or 'flag', got {on_invalid!r}")
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"sample: logits must be a floating (batch, vocab) tensor, got "
                         f"{getattr(logits, 'dtype', type(logits))} {tuple(getattr(logits, 'shape', ()))}")
    B, V = logits.shape
    if V == 0:
        raise ValueError("sample: logits must have a non-empty vocab dimension")
    plist = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(plist) != B or not all(isinstance(p, SamplingParams) for p in plist):
        raise ValueError(f"sample: params must be a SamplingParams or a list of {B} of them")
    for p in plist:
        p.validate(V)
    device = logits.device
    ht = _history_tensor(history, B, device)
    table = params_table(plist, V)
    seeded = [i for i, p in enumerate(plist) if p.seed is not None]
    uniform = torch.rand(B, dtype=torch.float32, device=device) if len(seeded) < B else None
    if seeded:
        steps = _steps(history, ht, B)
        us = torch.tensor([seeded_uniform(plist[i].seed, steps[i]) for i in seeded], dtype=torch.float32)
        if uniform is None:
            uniform = us.to(device)
        else:
            uniform[torch.tensor(seeded, device=device)] = us.to(device)
    nb = max((len(p.logit_bias) for p in plist if p.logit_bias), default=0)
    bias_idx = bias_val = None
    if nb:
        bias_idx = torch.full((B, nb), -1, dtype=torch.int64)
        bias_val = torch.zeros((B, nb), dtype=torch.float32)
        for i, p in enumerate(plist):
            if p.logit_bias:
                bias_idx[i, : len(p.logit_bias)] = torch.tensor(list(p.logit_bias), dtype=torch.int64)
                bias_val[i, : len(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)
        bias_idx, bias_val = bias_idx.to(device), bias_val.to(device)
    if kernel_ok(logits):
        x = logits if logits.stride(-1) == 1 else logits.contiguous()
        tokens, logprobs = sample_op(x, uniform, table.to(device), ht, bias_idx, bias_val)
    else:
        hist_lists = None if ht is None else [[t for t in row if t >= 0] for row in ht.tolist()]
        rows = [dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                     repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
                     frequency_penalty=p.frequency_penalty, logit_bias=p.logit_bias) for p in plist]
        tokens, logprobs = reference.sample(logits.detach().cpu(), uniform.cpu(), rows, hist_lists)
        tokens, logprobs = tokens.to(device), logprobs.to(device)
    if on_invalid == "raise":
        bad = (tokens < 0).nonzero().flatten().tolist()  # one host sync: the caller reads the tokens anyway
        if bad:
            raise ValueError(f"sample: row(s) {bad} have NaN or +inf logits, or no finite logit after penalties "
                             f"and logit_bias (pass on_invalid='flag' to get token -1 and logprob NaN instead)")
    return tokens, logprobs


__all__: List[str] = ["sample", "SamplingParams"]
