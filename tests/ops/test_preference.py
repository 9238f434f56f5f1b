"""The fused preference and RL losses (tritium.ops.preference) against TRL's own loss code on materialised logits.

Each TRL loss is called as TRL runs it: DPOTrainer._compute_loss, KTOTrainer._compute_loss and
GRPOTrainer._compute_loss on a trainer object built without __init__ (object.__new__ plus the attributes the method
reads) and a stand-in model whose log-probabilities are TRL's selective_log_softmax of the logits F.linear(hidden,
weight, bias); CPOTrainer.cpo_loss / get_batch_logps and ORPOTrainer.odds_ratio_loss / get_batch_logps directly;
RewardTrainer.compute_loss with a stand-in reward model. The chosen-NLL term of CPO and ORPO lives in TRL only in a
closure inside concatenated_forward (trl/experimental/cpo/cpo_trainer.py and orpo/orpo_trainer.py,
``cross_entropy_loss``): _nll below reproduces it (nn.CrossEntropyLoss over the chosen tokens).

Tolerance rule (tests/util.py): tritium's error against TRL's code in float64 (inputs rounded to the dtype first)
is at most twice TRL's own error in the dtype, for the loss and the gradients of hidden, weight and bias.
"""
from __future__ import annotations

import collections
import os
import types

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO and ORPO live in trl.experimental, which warns on import
from trl.experimental.cpo.cpo_trainer import CPOTrainer
from trl.experimental.orpo.orpo_trainer import ORPOTrainer
from trl.trainer.dpo_trainer import DPOTrainer
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.kto_trainer import KTOTrainer
from trl.trainer.reward_trainer import RewardTrainer
from trl.trainer.utils import selective_log_softmax

import tritium
from tests.util import assert_within_torch_error

DTYPES = (torch.float32, torch.bfloat16)
B, T, H, V = 2, 7, 16, 37  # odd T; the chunk size 3 splits every sequence into several chunks


def _inputs(n_seq=2 * B, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n_seq, T, H, generator=g)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    b = torch.randn(V, generator=g) * 0.1
    t = torch.randint(0, V, (n_seq, T), generator=g)
    t[:, :2] = -100               # the prompt
    t[1, :] = -100                # a sequence with every token ignored
    t[n_seq - 1, 5:] = -100       # padding
    return h, w, b, t


class _Accelerator:
    device = torch.device("cpu")
    num_processes = 1
    sync_gradients = True

    def gather(self, t):
        return t

    gather_for_metrics = gather

    def reduce(self, t, reduction="sum"):
        return t


class _LM:
    """The stand-in for a model called with fused_lm_head=True: log_probs of labels[:, 1:] (0 where -100) from the
    materialised logits, and the metric outputs TRL reads (entropy, mean_logits, is_top1)."""
    training = True
    is_gradient_checkpointing = False

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, labels=None, **kwargs):
        lab = labels[:, 1:]
        keep = lab != -100
        lp = selective_log_softmax(self.logits, lab.masked_fill(~keep, 0)) * keep
        d = self.logits.detach()
        ent = -(d.softmax(-1) * d.log_softmax(-1)).sum(-1)
        return types.SimpleNamespace(log_probs=lp, entropy=ent, mean_logits=d.mean(-1),
                                     is_top1=d.argmax(-1) == lab)


def _trainer(cls, **attrs):
    tr = object.__new__(cls)
    tr.accelerator = _Accelerator()
    tr._metrics = {"train": collections.defaultdict(list), "eval": collections.defaultdict(list)}
    tr._total_train_tokens, tr._tp_size, tr.aux_loss_enabled = 0, 1, False
    for k, v in attrs.items():
        setattr(tr, k, v)
    return tr


def _lm_inputs(t):
    """input_ids / masks for a batch whose shifted targets are t: position 0 is the prompt's first token."""
    n = t.shape[0]
    ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), t.clamp(min=0)], 1)
    completion = torch.cat([torch.zeros(n, 1, dtype=torch.long), (t != -100).long()], 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": completion}


def _compare(ours, theirs, dtype, h, w, b):
    """ours(h, w, b) and theirs(h, w, b) -> loss: loss and the gradients of h, w, b in dtype, against theirs in
    float64 on the inputs rounded to dtype (the tolerance rule)."""
    def run(fn, dt):
        args = [x.to(dtype).to(dt).requires_grad_() for x in (h, w, b)]
        loss = fn(*args)
        return [loss] + list(torch.autograd.grad(loss, args))

    mine, trl_dt, ref = run(ours, dtype), run(theirs, dtype), run(theirs, torch.float64)
    for name, a, c, r in zip(("loss", "grad hidden", "grad weight", "grad bias"), mine, trl_dt, ref):
        if a.dtype != c.dtype:  # the loss: float32 for 16-bit inputs; TRL's in the input dtype
            c = c.to(a.dtype)
        assert_within_torch_error(a.detach(), c.detach(), r.detach(), name, compute_dtype=dtype)
    return mine


def _ref_logps(t, seed=1):
    """The reference model's summed log-probabilities: its own head on other hidden states (materialised)."""
    rh, rw, rb, _ = _inputs(t.shape[0], seed)
    lp = selective_log_softmax(F.linear(rh, rw, rb).double(), t.clamp(min=0)) * (t != -100)
    return lp.sum(1), (rh, rw, rb)


# ---- DPO ----
def _trl_dpo(t, ref, loss_type, beta, label_smoothing):
    def loss(h, w, b):
        logits = F.linear(h, w, b)
        inputs = dict(_lm_inputs(t), ref_chosen_logps=ref[:B].to(h.dtype), ref_rejected_logps=ref[B:].to(h.dtype))
        tr = _trainer(DPOTrainer, model=_LM(logits), precompute_ref_logps=True, ld_alpha=None,
                      f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
                      label_smoothing=label_smoothing, use_weighting=False)
        out = tr._compute_loss(tr.model, inputs, False)
        loss.metrics = tr._metrics["train"]
        return out
    return loss


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_matches_trl(dtype, loss_type, ls):
    h, w, b, t = _inputs()
    ref, _ = _ref_logps(t)
    theirs = _trl_dpo(t, ref, loss_type, 0.5, ls)
    keep = {}

    def ours(h_, w_, b_):
        keep["out"] = tritium.fused_linear_dpo_loss(h_, w_, t, b_, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:],
                                                    beta=0.5, loss_type=loss_type, label_smoothing=ls, chunk_size=3)
        return keep["out"].loss

    _compare(ours, theirs, dtype, h, w, b)  # theirs runs last in float64: its metrics are the float64 ones
    out = keep["out"]
    m = theirs.metrics
    for field, key in (("chosen_rewards", "rewards/chosen"), ("rejected_rewards", "rewards/rejected"),
                       ("chosen_logps", "logps/chosen"), ("rejected_logps", "logps/rejected")):
        tol = 1e-5 if dtype == torch.float32 else 0.1
        assert abs(getattr(out, field).mean().item() - m[key][-1]) <= tol * max(1.0, abs(m[key][-1])), field


def test_dpo_label_smoothing_is_trl_conservative_dpo():
    """TRL 1.16's DPO sigmoid has no label smoothing; with it, the sigmoid loss is conservative DPO, TRL's
    CPOTrainer.cpo_loss sigmoid formula applied to the log-ratios."""
    h, w, b, t = _inputs()
    ref, _ = _ref_logps(t)
    tr = _trainer(CPOTrainer, alpha=0.0, loss_type="sigmoid", beta=0.5, label_smoothing=0.2, simpo_gamma=0.0)

    def theirs(h_, w_, b_):
        lp = CPOTrainer.get_batch_logps(F.linear(h_, w_, b_), t.clone(), average_log_prob=False,
                                        is_encoder_decoder=True)
        ratios = lp - ref.to(lp.dtype)
        return tr.cpo_loss(ratios[:B], ratios[B:])[0].mean()

    _compare(lambda h_, w_, b_: tritium.fused_linear_dpo_loss(
        h_, w_, t, b_, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:], beta=0.5, label_smoothing=0.2,
        chunk_size=3).loss, theirs, torch.float32, h, w, b)


def test_dpo_reference_model_inputs():
    """ref_hidden / ref_weight / ref_bias give the precomputed reference log-probabilities' result."""
    h, w, b, t = _inputs()
    ref, (rh, rw, rb) = _ref_logps(t)
    a = tritium.fused_linear_dpo_loss(h, w, t, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, chunk_size=3)
    c = tritium.fused_linear_dpo_loss(h, w, t, b, ref_chosen_logps=ref[:B].float(),
                                      ref_rejected_logps=ref[B:].float(), chunk_size=3)
    for x, y in zip(a, c):
        if x is not None:
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_frozen_head(dtype):
    """A frozen LM head (LoRA): no weight or bias gradient is computed, and the loss and hidden's gradient are the
    same bits as with a trainable head."""
    h, w, b, t = _inputs()
    ref, _ = _ref_logps(t)

    def run(frozen):
        hh = h.to(dtype, copy=True).requires_grad_()
        ww, bb = (x.to(dtype, copy=True).requires_grad_(not frozen) for x in (w, b))
        out = tritium.fused_linear_dpo_loss(hh, ww, t, bb, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:],
                                            beta=0.5, chunk_size=3)
        out.loss.backward()
        return out.loss, hh.grad, ww.grad, bb.grad

    loss, gh, gw, gb = run(False)
    loss_f, gh_f, gw_f, gb_f = run(True)
    assert gw is not None and gb is not None and gw_f is None and gb_f is None
    torch.testing.assert_close(loss_f, loss, rtol=0, atol=0)
    torch.testing.assert_close(gh_f, gh, rtol=0, atol=0)


# ---- CPO, SimPO, ORPO ----
def _nll(logits, t):
    """The chosen sequences' NLL as TRL's CPO/ORPO concatenated_forward computes it (its nested
    cross_entropy_loss: nn.CrossEntropyLoss over the flattened chosen tokens; t is already shifted)."""
    return torch.nn.CrossEntropyLoss()(logits[:B].reshape(-1, logits.shape[-1]), t[:B].reshape(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
def test_cpo_simpo_match_trl(dtype, loss_type):
    h, w, b, t = _inputs()
    t[1, 3] = 5  # every sequence keeps a token: TRL's token mean divides by the count unclamped
    alpha = 0.0 if loss_type == "simpo" else 1.0
    tr = _trainer(CPOTrainer, alpha=0.0, loss_type=loss_type, beta=2.0 if loss_type == "simpo" else 0.5,
                  label_smoothing=0.1 if loss_type != "hinge" else 0.0, simpo_gamma=0.7, cpo_alpha=alpha)

    def theirs(h_, w_, b_):
        logits = F.linear(h_, w_, b_)
        lp = CPOTrainer.get_batch_logps(logits, t.clone(), average_log_prob=loss_type in ("ipo", "simpo"),
                                        is_encoder_decoder=True)
        losses = tr.cpo_loss(lp[:B], lp[B:])[0]
        return losses.mean() + tr.cpo_alpha * _nll(logits, t) if alpha else losses.mean()

    def ours(h_, w_, b_):
        if loss_type == "simpo":
            return tritium.fused_linear_simpo_loss(h_, w_, t, b_, beta=2.0, gamma=0.7, label_smoothing=0.1,
                                                   chunk_size=3).loss
        return tritium.fused_linear_cpo_loss(h_, w_, t, b_, beta=0.5, loss_type=loss_type, alpha=alpha,
                                             label_smoothing=tr.label_smoothing, chunk_size=3).loss

    _compare(ours, theirs, dtype, h, w, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_orpo_matches_trl(dtype):
    h, w, b, t = _inputs()
    t[1, 3] = 5
    tr = _trainer(ORPOTrainer, beta=0.3)
    keep = {}

    def theirs(h_, w_, b_):
        logits = F.linear(h_, w_, b_)
        lp = ORPOTrainer.get_batch_logps(logits, t.clone(), average_log_prob=True, is_encoder_decoder=True)
        losses, cr, rr, ratio, log_odds = tr.odds_ratio_loss(lp[:B], lp[B:])
        keep["trl"] = (cr, rr, ratio, log_odds)
        return _nll(logits, t) - losses.mean()

    def ours(h_, w_, b_):
        keep["ours"] = tritium.fused_linear_orpo_loss(h_, w_, t, b_, beta=0.3, chunk_size=3)
        return keep["ours"].loss

    _compare(ours, theirs, dtype, h, w, b)
    if dtype == torch.float32:
        o, (cr, rr, ratio, log_odds) = keep["ours"], keep["trl"]
        torch.testing.assert_close(o.chosen_rewards, cr.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.rejected_rewards, rr.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.log_odds_ratio.mean(), ratio.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o.log_odds_chosen.mean(), log_odds.float(), rtol=1e-5, atol=1e-6)


# ---- KTO ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kl", [None, 0.3])
def test_kto_matches_trl(dtype, kl):
    n = 5
    h, w, b, t = _inputs(n)
    labels = torch.tensor([True, False, True, True, False])
    ref, _ = _ref_logps(t)
    kl_logps = torch.tensor([0.1, 0.5, 0.3, 0.2, 0.4]) if kl is not None else None

    def theirs(h_, w_, b_):
        inputs = dict(_lm_inputs(t), label=labels, ref_logps=ref.to(h_.dtype))
        if kl is not None:
            inputs["ref_KL_logps"] = torch.zeros(n, dtype=h_.dtype)
        tr = _trainer(KTOTrainer, model=_LM(F.linear(h_, w_, b_)), precompute_ref_logps=True,
                      calculate_KL=kl is not None, loss_type="kto", beta=0.2, desirable_weight=1.3,
                      undesirable_weight=0.8)
        tr._compute_kl_logps = lambda model, batch: kl_logps.to(h_.dtype) if kl is not None else None
        return tr._compute_loss(tr.model, inputs, False)

    kl_value = kl_logps.mean() if kl is not None else None
    _compare(lambda h_, w_, b_: tritium.fused_linear_kto_loss(
        h_, w_, t, labels, b_, ref_logps=ref, kl=kl_value, beta=0.2, desirable_weight=1.3, undesirable_weight=0.8,
        chunk_size=3).loss, theirs, dtype, h, w, b)


# ---- GRPO ----
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("loss_type,beta", [("grpo", 0.0), ("grpo", 0.04), ("bnpo", 0.04), ("dr_grpo", 0.04)])
def test_grpo_matches_trl(dtype, loss_type, beta):
    n = 3
    h, w, b, t = _inputs(n)
    g = torch.Generator().manual_seed(3)
    adv = torch.randn(n, generator=g)
    ref_tok = -torch.rand(n, T, generator=g) * 3
    old = -torch.rand(n, T, generator=g) * 3  # far from the current log-probs: both clip bounds are reached
    mask = t != -100

    def theirs(h_, w_, b_):
        lp = selective_log_softmax(F.linear(h_, w_, b_), t.clamp(min=0))
        tr = _trainer(GRPOTrainer, model=types.SimpleNamespace(training=True), top_entropy_quantile=1.0,
                      off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
                      args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type=loss_type,
                      epsilon_low=0.2, epsilon_high=0.28, use_vllm=False, current_gradient_accumulation_steps=1,
                      max_completion_length=T, _entropy_bonus_enabled=False)
        tr._get_per_token_logps_and_entropies = lambda *a, **k: (lp, torch.zeros_like(lp).detach(), None)
        inputs = {"prompt_ids": torch.zeros(n, 0, dtype=torch.long), "prompt_mask": torch.zeros(n, 0),
                  "completion_ids": t.clamp(min=0), "completion_mask": mask.to(h_.dtype), "advantages": adv,
                  "old_per_token_logps": old.to(h_.dtype), "ref_per_token_logps": ref_tok.to(h_.dtype)}
        return tr._compute_loss(None, inputs)

    _compare(lambda h_, w_, b_: tritium.fused_linear_grpo_loss(
        h_, w_, t, adv, b_, old_logps=old, ref_logps=ref_tok, beta=beta, epsilon_low=0.2, epsilon_high=0.28,
        loss_type=loss_type, chunk_size=3).loss, theirs, dtype, h, w, b)


def test_grpo_reference_model_and_metrics():
    n = 3
    h, w, b, t = _inputs(n)
    adv = torch.tensor([1.0, -0.5, 0.2])
    rh, rw, rb, _ = _inputs(n, seed=1)
    ref_tok = selective_log_softmax(F.linear(rh, rw, rb), t.clamp(min=0)) * (t != -100)
    a = tritium.fused_linear_grpo_loss(h, w, t, adv, b, ref_hidden=rh, ref_weight=rw, ref_bias=rb, beta=0.1)
    c = tritium.fused_linear_grpo_loss(h, w, t, adv, b, ref_logps=ref_tok, beta=0.1)
    torch.testing.assert_close(a.loss, c.loss)
    torch.testing.assert_close(a.kl, c.kl)
    # on-policy (old_logps default): the ratio is 1, nothing is clipped
    assert a.clip_ratio_region.item() == 0.0


# ---- Bradley-Terry, perplexity ----
@pytest.mark.parametrize("margin", [False, True])
def test_bradley_terry_matches_trl(margin):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 1, generator=g, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, generator=g, dtype=torch.float64)
    tr = _trainer(RewardTrainer, model=types.SimpleNamespace(training=True),
                  args=types.SimpleNamespace(center_rewards_coefficient=None))
    inputs = {"attention_mask": torch.ones(6, 2)}
    if margin:
        inputs["margin"] = m
    theirs = tr.compute_loss(lambda **kw: types.SimpleNamespace(logits=scores), inputs)
    c, r = scores.squeeze(-1).chunk(2)
    ours = tritium.bradley_terry_loss(c, r, m if margin else None)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, scores), torch.autograd.grad(theirs, scores))


def test_perplexity():
    h, w, b, t = _inputs()
    logits = F.linear(h.double(), w.double(), b.double())
    expected = torch.exp(F.cross_entropy(logits.reshape(-1, V), t.reshape(-1)))
    torch.testing.assert_close(tritium.perplexity(h.double(), w.double(), t, b.double()), expected)


# ---- compile, reference backend, bad input ----
@pytest.mark.parametrize("loss", ["dpo", "grpo"])
def test_compile_fullgraph(loss):
    h, w, b, t = _inputs()
    ref, _ = _ref_logps(t)
    rc, rr = ref[:B].float(), ref[B:].float()
    adv = torch.tensor([1.0, -0.5, 0.2, 0.7])
    old = -torch.rand(2 * B, T) * 3

    def f(h_, w_, b_):
        if loss == "dpo":
            out = tritium.fused_linear_dpo_loss(h_, w_, t, b_, ref_chosen_logps=rc, ref_rejected_logps=rr,
                                                chunk_size=3)
            return out.loss, out.chosen_rewards
        out = tritium.fused_linear_grpo_loss(h_, w_, t, adv, b_, old_logps=old, chunk_size=3)
        return out.loss, out.clip_ratio_region

    args = [x.clone().requires_grad_() for x in (h, w, b)]
    eager = f(*args)
    ge = torch.autograd.grad(eager[0], args)
    compiled = torch.compile(f, fullgraph=True)(*args)
    gc = torch.autograd.grad(compiled[0], args)
    for x, y in zip(list(compiled) + list(gc), list(eager) + list(ge)):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("fn,kw", [
    (tritium.fused_linear_dpo_loss, {"loss_type": "ipo"}), (tritium.fused_linear_orpo_loss, {}),
    (tritium.fused_linear_simpo_loss, {})])
def test_reference_backend(fn, kw):
    """TRITIUM_BACKEND=reference: the formulas on materialised logits (reference.sequence_loss), same results."""
    h, w, b, t = _inputs()
    t[1, 3] = 5
    ref, _ = _ref_logps(t)
    if fn is tritium.fused_linear_dpo_loss:
        kw = dict(kw, ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    args = [x.double().requires_grad_() for x in (h, w, b)]
    fused = fn(args[0], args[1], t, args[2], **kw)
    g_fused = torch.autograd.grad(fused.loss, args)
    old = tritium.get_backend()
    tritium.set_backend("reference")
    try:
        out = fn(args[0], args[1], t, args[2], **kw)
    finally:
        tritium.set_backend(old)
    torch.testing.assert_close(out.loss, fused.loss)
    torch.testing.assert_close(out.chosen_rewards, fused.chosen_rewards)
    for x, y in zip(torch.autograd.grad(out.loss, args), g_fused):
        torch.testing.assert_close(x, y)


def test_bad_input():
    h, w, b, t = _inputs()
    ref = torch.zeros(2 * B)
    kw = dict(ref_chosen_logps=ref[:B], ref_rejected_logps=ref[B:])
    with pytest.raises(ValueError, match="hidden must hold B chosen then B rejected.*got 3"):
        tritium.fused_linear_dpo_loss(h[:3], w, t[:3], **kw)
    bad = t.clone()
    bad[0, 4] = V
    with pytest.raises(ValueError, match=r"target holds indices outside \[0, 37\)"):
        tritium.fused_linear_dpo_loss(h, w, bad, **kw)
    with pytest.raises(ValueError, match="target must have shape"):
        tritium.fused_linear_dpo_loss(h, w, t[:, :3], **kw)
    with pytest.raises(ValueError, match="weight must be"):
        tritium.fused_linear_dpo_loss(h, w[:, :3], t, **kw)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        tritium.fused_linear_dpo_loss(h, w, t, loss_type="exo", **kw)
    with pytest.raises(ValueError, match="needs the reference"):
        tritium.fused_linear_dpo_loss(h, w, t)
    with pytest.raises(ValueError, match=r"ref_chosen_logps must be a tensor of shape \(2,\)"):
        tritium.fused_linear_dpo_loss(h, w, t, ref_chosen_logps=ref, ref_rejected_logps=ref[B:])
    with pytest.raises(ValueError, match="chosen_scores holds NaN"):
        tritium.bradley_terry_loss(torch.tensor([1.0, float("nan")]), torch.zeros(2))
    with pytest.raises(ValueError, match="chosen_scores and rejected_scores must have one shape"):
        tritium.bradley_terry_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="advantages holds NaN"):
        tritium.fused_linear_grpo_loss(h, w, t, torch.tensor([0.0, float("nan"), 1.0, 1.0]))
    with pytest.raises(ValueError, match="preference_labels must be a tensor of shape"):
        tritium.fused_linear_kto_loss(h, w, t, torch.ones(3, dtype=torch.bool), ref_logps=ref)
