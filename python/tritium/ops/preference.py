"""Preference and RL losses fused with the LM head: DPO (sigmoid, hinge, IPO, robust), SimPO, CPO, ORPO, KTO,
GRPO / PPO-clip, the Bradley-Terry reward-model loss and perplexity. The (sequences, tokens, vocab) logits are
never held. Inputs follow Liger-Kernel's chunked losses: hidden (2B, T, H) with the B chosen sequences first and
the B rejected after them, the LM head's weight (V, H) and optional bias, target (2B, T) already shifted, with
ignore_index on the tokens that do not count; the reference model's log-probabilities come either precomputed or
from its own hidden states and head, computed the same chunked way without gradients. docs/losses.md gives every
formula and its TRL equivalent.

The sequence losses run one op, ``fused_linear_sequence_loss``, whose formulas are the table
``reference.SEQUENCE_LOSSES``. Every such loss is a mean over groups (a chosen/rejected pair, or one KTO sequence)
of a formula of the group's summed log-probabilities, so the op finishes a group before the next starts: for each
of its sequences, chunk by chunk of tokens, the logits (one matmul), their cross-entropy rows and gradient rows
(``cross_entropy_fwd``), the unscaled grad_hidden rows (a second matmul) and the sequence's own grad_weight sum (a
third); then the formula's derivative with respect to the group's log-probabilities (written out next to each
formula in reference.SEQUENCE_LOSSES: torch.func cannot run inside an op under torch.compile) scales the
group's rows and adds its sums into grad_weight. Three matmuls per token in all, as eager's forward and backward,
and the gradients are ready after the forward (the backward only scales them by the upstream gradient); the extra
memory is a (V, H) float32 sum per sequence of a group besides grad_weight's, and one chunk's logits.

GRPO's loss is per token, so it differentiates through the per-token log-probabilities of
``fused_linear_cross_entropy(reduction="none")`` (whose backward recomputes each chunk's logits).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from .. import reference
from ._library import acc_dtype, call_op, define_op, kernel_ok, unit_last
from .cross_entropy import (LMHead, default_chunk_size, flce_accumulators, flce_rows, fused_linear_cross_entropy,
                            lm_head_grads, saved_grads_backward, saved_grads_setup)


# ---- the op: fused sequence losses ----
def _fake_seq_loss(hidden, weight, target, bias, ref_logps, labels, kl, kind, params, ignore_index, chunk,
                   need_grad, weight_grad=True):
    adt = acc_dtype(hidden.dtype)
    none = (0,)
    wg = need_grad and weight_grad
    return (hidden.new_empty((), dtype=adt), hidden.new_empty((hidden.shape[0],), dtype=adt),
            hidden.new_empty(hidden.shape if need_grad else none),
            weight.new_empty(weight.shape if wg else none),
            weight.new_empty((weight.shape[0],) if wg and bias is not None else none))


def _seq_loss_impl(hidden, weight, target, bias, ref_logps, labels, kl, kind, params, ignore_index, chunk,
                   need_grad, weight_grad=True):
    """(the loss, the summed log-probabilities per sequence (N,), and the loss's gradients of hidden, weight and
    bias; weight_grad False: none for the weight and bias, a frozen LM head): see the module docstring.

    On the CPU each sequence's tokens whose target is ignore_index (its prompt and padding) are left out of the
    products, as in fused_linear_cross_entropy (_flce_loop): their log-probability terms and gradient rows are
    exactly zero."""
    fn, paired, _ = reference.SEQUENCE_LOSSES[kind]
    N, T = target.shape
    adt = acc_dtype(hidden.dtype)
    valid = target != ignore_index
    n = valid.sum(1).to(adt)
    ctx = reference.sequence_loss_ctx(n, paired, kl)
    groups = [(i, i + N // 2) for i in range(N // 2)] if paired else [(i,) for i in range(N)]
    logps = hidden.new_empty((N,), dtype=adt)
    gh = torch.empty_like(hidden) if need_grad else hidden.new_empty((0,))
    wg = need_grad and weight_grad
    gw, gb = flce_accumulators(weight, bias, hidden.dtype, wg)
    # one (grad_weight, grad_bias) sum per sequence of a group, reused by every group
    sums = [flce_accumulators(weight, bias, hidden.dtype, wg) for _ in groups[0]] if groups else []
    head = LMHead(weight, bias, hidden.dtype, min(chunk, T), need_grad, weight_grad)
    loss = hidden.new_zeros((), dtype=adt)
    skip = hidden.device.type == "cpu"  # finding the kept rows reads the targets: a host sync on a GPU
    for group in groups:
        for (sw, sb), s in zip(sums, group):
            if wg:
                sw.zero_()
                sb.zero_()
            h, t, g = hidden[s], target[s], gh[s] if need_grad else None
            keep = valid[s].nonzero().squeeze(1) if skip else None
            compact = keep is not None and keep.numel() < T
            if compact:
                h, t = h.index_select(0, keep), t.index_select(0, keep)
                g = h.new_empty(h.shape) if need_grad else None
            nll = hidden.new_zeros((), dtype=adt)
            for start in range(0, h.shape[0], chunk):
                stop = min(h.shape[0], start + chunk)
                nll += head.chunk(h[start:stop], t[start:stop], ignore_index, 0.0,
                                  g[start:stop] if need_grad else None, sw, sb, None).sum()
            if need_grad and compact:
                gh[s].zero_().index_copy_(0, keep, g)
            logps[s] = -nll
        idx = list(group)
        value, _, _, dlp = fn(logps[idx], n[idx], ref_logps[idx], labels[idx] if labels.numel() else labels, ctx,
                              *params)
        loss += value.sum() / len(groups)
        if not need_grad:
            continue
        for (sw, sb), s, d in zip(sums, group, (dlp / len(groups)).unbind(0)):
            scale = -d  # log-probability = -NLL: d loss / d logits = -d * (the NLL's gradient rows)
            gh[s].mul_(scale.to(gh.dtype))
            if wg:
                gw.addcmul_(sw, scale)
                if bias is not None:
                    gb.addcmul_(sb, scale)
    del sums, head  # the per-sequence sums and packed weights go before grad_weight's cast allocates its copy
    cast = lambda t: t.to(hidden.dtype) if t.numel() else t  # noqa: E731
    return loss, logps, gh, cast(gw), cast(gb)


seq_loss = define_op(
    "fused_linear_sequence_loss(Tensor hidden, Tensor weight, Tensor target, Tensor? bias, Tensor ref_logps,"
    " Tensor labels, Tensor kl, str kind, float[] params, int ignore_index, int chunk, bool need_grad,"
    " bool weight_grad=True) -> (Tensor, Tensor, Tensor, Tensor, Tensor)", _fake_seq_loss, composite=_seq_loss_impl,
    backward=saved_grads_backward(13), setup_context=saved_grads_setup)


# ---- validation and the shared parts ----
class PreferenceOutput(NamedTuple):
    """What the paired losses return: the loss, then TRL's logged quantities per pair (TRL logs their means).
    nll_loss: the chosen sequences' token-mean NLL (CPO, ORPO; else None); log_odds_ratio / log_odds_chosen: ORPO's
    per pair (else None). Everything but loss is detached."""
    loss: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logps: Tensor
    rejected_logps: Tensor
    nll_loss: Optional[Tensor] = None
    log_odds_ratio: Optional[Tensor] = None
    log_odds_chosen: Optional[Tensor] = None


class KTOOutput(NamedTuple):
    """fused_linear_kto_loss's result: the loss, then per sequence the reward beta (logp - ref) and the summed
    log-probability (detached); TRL logs their means over the desirable and the undesirable sequences."""
    loss: Tensor
    rewards: Tensor
    logps: Tensor


class GRPOOutput(NamedTuple):
    """fused_linear_grpo_loss's result: the loss, the per-token log-probabilities (N, T) (detached, 0 on ignored
    tokens), and TRL's logged metrics over the unmasked tokens: the mean KL to the reference (None when beta is
    0) and the fractions of tokens clipped low, high and either."""
    loss: Tensor
    logps: Tensor
    kl: Optional[Tensor]
    clip_ratio_low: Tensor
    clip_ratio_high: Tensor
    clip_ratio_region: Tensor


def _fail(cond: Tensor, message: str) -> None:
    """Raise ValueError(message) where cond (a 0-d bool tensor) is true. Reading it is a host sync, paid once
    per call on the small target/score tensors; under torch.compile the check is an async assert instead."""
    if torch.compiler.is_compiling():
        torch._assert_async(~cond, message)
    elif bool(cond):
        raise ValueError(message)


def _check_head(name: str, hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                ignore_index: int, paired: bool, prefix: str = "") -> None:
    """Shapes of hidden (N, T, H), weight (V, H), bias (V,), target (N, T) int64 in [0, V) or ignore_index; N even
    when paired (chosen then rejected)."""
    if hidden.dim() != 3:
        raise ValueError(f"{name}: {prefix}hidden must be (sequences, tokens, hidden), got shape "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"{name}: {prefix}weight must be (vocab, {hidden.shape[2]}) to match {prefix}hidden, got "
                         f"{tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name}: {prefix}bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if paired and hidden.shape[0] % 2:
        raise ValueError(f"{name}: {prefix}hidden must hold B chosen then B rejected sequences (an even first "
                         f"dim), got {hidden.shape[0]} sequences")
    if tuple(target.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"{name}: target must have shape {tuple(hidden.shape[:2])}, got {tuple(target.shape)}")
    if target.dtype != torch.int64:
        raise ValueError(f"{name}: target must be int64 class indices, got {target.dtype}")
    V = weight.shape[0]
    _fail(((target != ignore_index) & ((target < 0) | (target >= V))).any(),
          f"{name}: target holds indices outside [0, {V}) that are not ignore_index ({ignore_index})")


def _seq_vector(name: str, arg: str, t: Tensor, n: int) -> Tensor:
    if not isinstance(t, Tensor) or tuple(t.shape) != (n,):
        raise ValueError(f"{name}: {arg} must be a tensor of shape ({n},), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return t


def _no_nan(name: str, arg: str, t: Tensor) -> None:
    _fail(t.isnan().any(), f"{name}: {arg} holds NaN")


def _chunk(hidden: Tensor, weight: Tensor, chunk_size: Optional[int]) -> int:
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return chunk_size or default_chunk_size(hidden.shape[0] * hidden.shape[1], hidden.shape[2], weight.shape[0],
                                            hidden.dtype, hidden.device)


def _ref_token_logps(name, target, ignore_index, paired, ref_hidden, ref_weight, ref_bias, chunk_size):
    """The reference model's per-token log-probabilities (N, T), chunked without gradients."""
    if ref_weight is None:
        raise ValueError(f"{name}: ref_hidden needs ref_weight")
    _check_head(name, ref_hidden, ref_weight, target, ref_bias, ignore_index, paired, prefix="ref_")
    with torch.no_grad():
        if not kernel_ok(ref_hidden, ref_weight, *([ref_bias] if ref_bias is not None else [])):
            return reference.fused_linear_grpo_logps(ref_hidden, ref_weight, target, ref_bias, ignore_index)
        rows = call_op(flce_rows, unit_last(ref_hidden).reshape(-1, ref_hidden.shape[2]), ref_weight,
                       target.reshape(-1), ref_bias, ignore_index, 0.0, _chunk(ref_hidden, ref_weight, chunk_size))
        return -rows.view(target.shape)


def _ref_logps(name, hidden, target, ignore_index, paired, ref_hidden, ref_weight, ref_bias, precomputed,
               chunk_size, required):
    """The reference's summed log-probabilities per sequence (N,), float32 (float64 for float64 inputs): from
    ref_hidden / ref_weight / ref_bias, or the precomputed tensors (chosen then rejected when paired), or zeros when
    the loss has no reference (required False)."""
    adt = acc_dtype(hidden.dtype)
    N = hidden.shape[0]
    have = [t is not None for t in precomputed]
    if ref_hidden is not None:
        if any(have):
            raise ValueError(f"{name}: pass ref_hidden/ref_weight or the precomputed reference log-probabilities, "
                             f"not both")
        return _ref_token_logps(name, target, ignore_index, paired, ref_hidden, ref_weight, ref_bias,
                                chunk_size).sum(-1).to(adt)
    if all(have):
        sizes = (N // 2, N // 2) if paired else (N,)
        names = ("ref_chosen_logps", "ref_rejected_logps") if paired else ("ref_logps",)
        for t, s, a in zip(precomputed, sizes, names):
            _seq_vector(name, a, t, s)
        return torch.cat([t.detach().to(device=hidden.device, dtype=adt) for t in precomputed])
    if required or any(have):
        raise ValueError(f"{name}: needs the reference model's log-probabilities: ref_hidden and ref_weight, or "
                         + ("ref_chosen_logps and ref_rejected_logps" if paired else "ref_logps"))
    return hidden.new_zeros((N,), dtype=adt)


def _run(name: str, kind: str, params, hidden, weight, target, bias, ref, labels, kl, ignore_index, chunk_size):
    """The sequence loss (fused op, or the reference when the kernels do not cover the inputs) and the formula's
    metrics on the detached log-probabilities: (loss, logps (N,), rewards (N,), extras)."""
    fn, paired, _ = reference.SEQUENCE_LOSSES[kind]
    params = [float(p) for p in params]
    adt = acc_dtype(hidden.dtype)
    kl = torch.as_tensor(kl, dtype=adt, device=hidden.device) if kl is not None else hidden.new_zeros((), dtype=adt)
    labels = labels if labels is not None else hidden.new_empty((0,), dtype=adt)
    if kernel_ok(hidden, weight, *([bias] if bias is not None else [])):
        need_grad, weight_grad = lm_head_grads(hidden, weight, bias)
        loss, logps = call_op(seq_loss, unit_last(hidden), weight, target, bias, ref, labels, kl, kind, params,
                              ignore_index, _chunk(hidden, weight, chunk_size), need_grad, weight_grad)[:2]
    else:
        loss, logps = reference.sequence_loss(kind, hidden, weight, target, bias, ref, labels, kl, params,
                                              ignore_index)
    logps = logps.detach()
    n = (target != ignore_index).sum(-1).to(logps.dtype)
    with torch.no_grad():
        _, rewards, extras, _ = fn(logps, n, ref, labels, reference.sequence_loss_ctx(n, paired, kl), *params)
    return loss, logps, rewards, extras, n


def _pair_output(loss, logps, rewards, extras, n=None, nll=False) -> PreferenceOutput:
    B = logps.shape[0] // 2
    nll_loss = -logps[:B].sum() / n[:B].sum().clamp(min=1) if nll else None
    return PreferenceOutput(loss, rewards[:B], rewards[B:], logps[:B], logps[B:], nll_loss,
                            extras.get("log_odds_ratio"), extras.get("log_odds_chosen"))


# ---- public API ----
_DPO_TYPES = ("sigmoid", "hinge", "ipo", "robust")
_CPO_TYPES = ("sigmoid", "hinge", "ipo")
_GRPO_TYPES = ("grpo", "bnpo", "dr_grpo")


def _choice(name: str, arg: str, value: str, options) -> None:
    if value not in options:
        raise ValueError(f"{name}: {arg} must be one of {', '.join(options)}, got {value!r}")


def fused_linear_dpo_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                          ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                          ref_bias: Optional[Tensor] = None, ref_chosen_logps: Optional[Tensor] = None,
                          ref_rejected_logps: Optional[Tensor] = None, beta: float = 0.1,
                          loss_type: str = "sigmoid", label_smoothing: float = 0.0, ignore_index: int = -100,
                          chunk_size: Optional[int] = None) -> PreferenceOutput:
    """DPO with TRL's loss types on the fused LM head. With log-ratios c = logp_chosen - ref_chosen and
    r = logp_rejected - ref_rejected (sums over the non-ignored tokens), per pair: "sigmoid":
    -(1 - eps) logsigmoid(beta (c - r)) - eps logsigmoid(-beta (c - r)) (eps = label_smoothing: conservative DPO);
    "hinge": relu(1 - beta (c - r)); "ipo": (c / n_c - r / n_r - 1 / (2 beta))^2 with the token counts n;
    "robust": ((1 - eps) (-logsigmoid(beta (c - r))) + eps logsigmoid(-beta (c - r))) / (1 - 2 eps). The loss is
    the mean over pairs; rewards are beta c and beta r."""
    name = "fused_linear_dpo_loss"
    _choice(name, "loss_type", loss_type, _DPO_TYPES)
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"{name}: label_smoothing must be in [0, 0.5) for the robust loss, got {label_smoothing}")
    _check_head(name, hidden, weight, target, bias, ignore_index, True)
    ref = _ref_logps(name, hidden, target, ignore_index, True, ref_hidden, ref_weight, ref_bias,
                     (ref_chosen_logps, ref_rejected_logps), chunk_size, True)
    out = _run(name, f"dpo_{loss_type}", (beta, label_smoothing), hidden, weight, target, bias, ref, None, None,
               ignore_index, chunk_size)
    return _pair_output(*out[:4])


def fused_linear_cpo_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                          beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                          alpha: float = 1.0, ignore_index: int = -100,
                          chunk_size: Optional[int] = None) -> PreferenceOutput:
    """CPO (no reference model), as TRL's CPOTrainer: with z = p_chosen - p_rejected (summed log-probabilities;
    token means for "ipo"), per pair "sigmoid": -(1 - eps) logsigmoid(beta z) - eps logsigmoid(-beta z), "hinge":
    relu(1 - beta z), "ipo": (z - 1 / (2 beta))^2; the loss is their mean plus alpha times the chosen sequences'
    token-mean NLL. Rewards are beta p."""
    name = "fused_linear_cpo_loss"
    _choice(name, "loss_type", loss_type, _CPO_TYPES)
    _check_head(name, hidden, weight, target, bias, ignore_index, True)
    out = _run(name, f"cpo_{loss_type}", (beta, label_smoothing, alpha, 0.0), hidden, weight, target, bias,
               hidden.new_zeros((hidden.shape[0],), dtype=acc_dtype(hidden.dtype)), None, None, ignore_index,
               chunk_size)
    return _pair_output(*out, nll=True)


def fused_linear_simpo_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                            beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                            alpha: float = 0.0, ignore_index: int = -100,
                            chunk_size: Optional[int] = None) -> PreferenceOutput:
    """SimPO (TRL's CPOTrainer with loss_type="simpo"): with z = the chosen minus the rejected token-mean
    log-probability, per pair -(1 - eps) logsigmoid(beta z - gamma) - eps logsigmoid(gamma - beta z); plus alpha
    times the chosen token-mean NLL (CPO-SimPO; 0: plain SimPO). Rewards are beta times the token means."""
    name = "fused_linear_simpo_loss"
    _check_head(name, hidden, weight, target, bias, ignore_index, True)
    out = _run(name, "cpo_simpo", (beta, label_smoothing, alpha, gamma), hidden, weight, target, bias,
               hidden.new_zeros((hidden.shape[0],), dtype=acc_dtype(hidden.dtype)), None, None, ignore_index,
               chunk_size)
    return _pair_output(*out, nll=alpha != 0)


def fused_linear_orpo_loss(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
                           beta: float = 0.1, ignore_index: int = -100,
                           chunk_size: Optional[int] = None) -> PreferenceOutput:
    """ORPO: the chosen sequences' token-mean NLL - beta mean(logsigmoid(log_odds)), log_odds = (p_c - p_r) -
    (log(1 - exp(p_c)) - log(1 - exp(p_r))) with p the token-mean log-probabilities. Rewards are beta p;
    log_odds_ratio = logsigmoid(log_odds) and log_odds_chosen = log_odds per pair."""
    name = "fused_linear_orpo_loss"
    _check_head(name, hidden, weight, target, bias, ignore_index, True)
    out = _run(name, "orpo", (beta,), hidden, weight, target, bias,
               hidden.new_zeros((hidden.shape[0],), dtype=acc_dtype(hidden.dtype)), None, None, ignore_index,
               chunk_size)
    return _pair_output(*out, nll=True)


def fused_linear_kto_loss(hidden: Tensor, weight: Tensor, target: Tensor, preference_labels: Tensor,
                          bias: Optional[Tensor] = None, ref_hidden: Optional[Tensor] = None,
                          ref_weight: Optional[Tensor] = None, ref_bias: Optional[Tensor] = None,
                          ref_logps: Optional[Tensor] = None, kl=None, beta: float = 0.1,
                          desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                          ignore_index: int = -100, chunk_size: Optional[int] = None) -> KTOOutput:
    """KTO on unpaired sequences: hidden (N, T, H), preference_labels (N,) bool (True: desirable). With the
    log-ratio x = logp - ref per sequence and kl the (detached) KL estimate (default 0, as TRL without a KL
    batch): desirable 1 - sigmoid(beta (x - kl)) times desirable_weight, undesirable 1 - sigmoid(beta (kl - x))
    times undesirable_weight; the loss is the mean over sequences."""
    name = "fused_linear_kto_loss"
    _check_head(name, hidden, weight, target, bias, ignore_index, False)
    labels = _seq_vector(name, "preference_labels", preference_labels, hidden.shape[0])
    ref = _ref_logps(name, hidden, target, ignore_index, False, ref_hidden, ref_weight, ref_bias, (ref_logps,),
                     chunk_size, True)
    if isinstance(kl, Tensor):
        kl = kl.detach()
    loss, logps, rewards, _, _ = _run(name, "kto", (beta, desirable_weight, undesirable_weight), hidden, weight,
                                      target, bias, ref, labels.to(ref.dtype), kl, ignore_index, chunk_size)
    return KTOOutput(loss, rewards, logps)


def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Optional[Tensor] = None) -> Tensor:
    """The reward model's pairwise loss (TRL's RewardTrainer): mean(-logsigmoid(chosen - rejected - margin))."""
    name = "bradley_terry_loss"
    if chosen_scores.shape != rejected_scores.shape:
        raise ValueError(f"{name}: chosen_scores and rejected_scores must have one shape, got "
                         f"{tuple(chosen_scores.shape)} and {tuple(rejected_scores.shape)}")
    _no_nan(name, "chosen_scores", chosen_scores)
    _no_nan(name, "rejected_scores", rejected_scores)
    diff = chosen_scores - rejected_scores
    if margin is not None:
        _no_nan(name, "margin", margin)
        diff = diff - margin
    return -torch.nn.functional.logsigmoid(diff).mean()


def fused_linear_grpo_loss(hidden: Tensor, weight: Tensor, target: Tensor, advantages: Tensor,
                           bias: Optional[Tensor] = None, old_logps: Optional[Tensor] = None,
                           ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                           ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                           beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: Optional[float] = None,
                           loss_type: str = "grpo", max_completion_length: Optional[int] = None,
                           ignore_index: int = -100, chunk_size: Optional[int] = None) -> GRPOOutput:
    """GRPO / PPO-clip on the sampled tokens (target, (N, T), ignore_index off the completion): the per-token
    log-probabilities by the fused LM head, the ratio to old_logps (N, T) (default: the log-probabilities
    themselves, detached: one update per generation), clipped to [1 - epsilon_low, 1 + epsilon_high], advantages
    (N,) per sequence, KL to the reference (ref_logps (N, T), or ref_hidden / ref_weight / ref_bias) with beta,
    normalised as TRL's loss_type "grpo", "bnpo" or "dr_grpo" (max_completion_length: default T). See
    reference.grpo_token_loss."""
    name = "fused_linear_grpo_loss"
    _choice(name, "loss_type", loss_type, _GRPO_TYPES)
    _check_head(name, hidden, weight, target, bias, ignore_index, False)
    N, T = target.shape
    _seq_vector(name, "advantages", advantages, N)
    _no_nan(name, "advantages", advantages)
    epsilon_high = epsilon_low if epsilon_high is None else epsilon_high
    adt = acc_dtype(hidden.dtype)
    mask = target != ignore_index
    if kernel_ok(hidden, weight, *([bias] if bias is not None else [])):
        rows = call_op(flce_rows, unit_last(hidden).reshape(-1, hidden.shape[2]), weight, target.reshape(-1), bias,
                       ignore_index, 0.0, _chunk(hidden, weight, chunk_size))
        logps = -rows.view(N, T)
    else:
        logps = reference.fused_linear_grpo_logps(hidden, weight, target, bias, ignore_index)
    ref = None
    if beta != 0.0:
        if ref_hidden is not None:
            if ref_logps is not None:
                raise ValueError(f"{name}: pass ref_hidden/ref_weight or ref_logps, not both")
            ref = _ref_token_logps(name, target, ignore_index, False, ref_hidden, ref_weight, ref_bias, chunk_size)
        elif ref_logps is not None:
            if tuple(ref_logps.shape) != (N, T):
                raise ValueError(f"{name}: ref_logps must have shape {(N, T)}, got {tuple(ref_logps.shape)}")
            ref = ref_logps.detach()
        else:
            raise ValueError(f"{name}: beta != 0 needs the reference: ref_hidden and ref_weight, or ref_logps")
        ref = ref.to(adt)
    if old_logps is None:
        old = logps.detach()
    elif tuple(old_logps.shape) != (N, T):
        raise ValueError(f"{name}: old_logps must have shape {(N, T)}, got {tuple(old_logps.shape)}")
    else:
        old = old_logps.detach().to(adt)
    loss, kl, ratio = reference.grpo_token_loss(logps, old, ref, advantages.to(adt), mask, beta, epsilon_low,
                                                epsilon_high, loss_type, max_completion_length or T)
    with torch.no_grad():
        m = mask.to(adt)
        count = m.sum().clamp(min=1.0)
        adv = advantages.to(adt).unsqueeze(1)
        low = ((ratio < 1 - epsilon_low) & (adv < 0)).to(adt)
        high = ((ratio > 1 + epsilon_high) & (adv > 0)).to(adt)
        mean = lambda t: (t * m).sum() / count  # noqa: E731
        out = GRPOOutput(loss, logps.detach(), mean(kl) if kl is not None else None, mean(low), mean(high),
                         mean(torch.maximum(low, high)))
    return out


def perplexity(hidden: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor] = None,
               ignore_index: int = -100, chunk_size: Optional[int] = None) -> Tensor:
    """exp of the mean NLL of target's non-ignored tokens under the LM head, by fused_linear_cross_entropy."""
    return torch.exp(fused_linear_cross_entropy(hidden, weight, target, bias, ignore_index, "mean",
                                                chunk_size=chunk_size))


__all__: List[str] = ["fused_linear_dpo_loss", "fused_linear_cpo_loss", "fused_linear_simpo_loss",
                      "fused_linear_orpo_loss", "fused_linear_kto_loss", "bradley_terry_loss",
                      "fused_linear_grpo_loss", "perplexity"]
