"""Benchmark of the fused preference losses: fused_linear_dpo_loss against TRL's DPO loss on materialised logits.

The baseline is what a TRL user's DPO step computes after the model's last hidden states: the LM head's logits
(2B, T, V), TRL's selective_log_softmax of the target tokens (trl.trainer.utils), the masked sums per sequence
and the sigmoid loss of DPOTrainer._compute_loss, with precomputed reference log-probabilities. Compute-bound:
2 N T H V FLOPs forward, 6 N T H V forward + backward (the LM head's three matmuls; 4 N T H V with the head
frozen, as under LoRA: no weight gradient); peak memory tracked.
"""
import torch
import torch.nn.functional as F

import tritium
from tritium.bench.case import OpCase, esize

_BETA = 0.1


def _dpo_inputs(shape, dtype, device):
    pairs, tokens, hidden, vocab = shape
    h = torch.randn(2 * pairs, tokens, hidden, dtype=dtype, device=device)
    w = (torch.randn(vocab, hidden, device=device) / hidden ** 0.5).to(dtype)
    t = torch.randint(0, vocab, (2 * pairs, tokens), device=device)
    t[:, : tokens // 4] = -100  # the prompt: a quarter of each sequence
    ref = -torch.rand(2 * pairs, device=device) * tokens
    return h, w, t, ref[:pairs], ref[pairs:]


def _tritium_dpo(h, w, t, ref_c, ref_r):
    return tritium.fused_linear_dpo_loss(h, w, t, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r, beta=_BETA)[0]


def _trl_dpo(h, w, t, ref_c, ref_r):
    """TRL 1.x's DPO sigmoid loss on materialised logits (DPOTrainer._compute_loss, reverse-KL scores)."""
    from trl.trainer.utils import selective_log_softmax

    logits = F.linear(h, w)
    mask = t != -100
    per_token_logps = selective_log_softmax(logits, t.masked_fill(~mask, 0)) * mask
    chosen_logps, rejected_logps = per_token_logps.sum(1).chunk(2, dim=0)
    delta_score = (chosen_logps - ref_c) - (rejected_logps - ref_r)
    return (-F.logsigmoid(_BETA * delta_score)).mean()


def _flops(k):
    return lambda s, d: k * 2.0 * 2 * s[0] * s[1] * s[2] * s[3]


def _bytes(s, d):  # hidden and weight read once (the logits never reach memory)
    return (2 * s[0] * s[1] * s[2] + s[2] * s[3]) * esize(d)


CASES = [
    OpCase("fused_linear_dpo_loss", _dpo_inputs, _tritium_dpo, _trl_dpo, _bytes, _bytes, flops_fwd=_flops(1),
           flops_fwdbwd=_flops(3), shapes=((4, 1024, 576, 49152),), dtypes=(torch.float32, torch.bfloat16),
           grad_args=(0, 1), track_memory=True,
           note="shape = pairs x tokens x hidden x vocab; eager: TRL's DPO sigmoid loss on materialised logits"),
    # LoRA / QLoRA DPO: the LM head frozen, so neither side computes its (V, H) weight gradient
    OpCase("fused_linear_dpo_loss_frozen_head", _dpo_inputs, _tritium_dpo, _trl_dpo, _bytes, _bytes,
           flops_fwd=_flops(1), flops_fwdbwd=_flops(2), shapes=((4, 1024, 576, 49152),),
           dtypes=(torch.float32, torch.bfloat16), grad_args=(0,), track_memory=True,
           note="shape = pairs x tokens x hidden x vocab; the LM head frozen (LoRA); eager: TRL's DPO sigmoid loss "
                "on materialised logits"),
]
