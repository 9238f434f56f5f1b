"""Benchmark of fused sampling: top-k + top-p + min-p + repetition/presence/frequency penalties over a
256-token history, against the same pipeline in eager torch ops (penalties by scatter, sort, cumsum, masking,
multinomial). Shape (batch, vocab); bytes: the logits read once."""
import torch

from tritium.bench.case import OpCase, esize
from tritium.inference import SamplingParams, sample

HISTORY = 256
PARAMS = dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.1,
              frequency_penalty=0.1)


def _make(shape, dtype, device):
    B, V = shape
    logits = torch.randn(B, V, dtype=dtype, device=device) * 4
    history = torch.randint(0, V, (B, HISTORY), device=device)
    return logits, history


def _tritium(logits, history):
    return sample(logits, [SamplingParams(**PARAMS)] * logits.shape[0], history)


def _eager(logits, history):
    p = PARAMS
    z = logits.float()
    counts = torch.zeros_like(z).scatter_add_(1, history, torch.ones_like(history, dtype=z.dtype))
    seen = counts > 0
    z = torch.where(seen, torch.where(z > 0, z / p["repetition_penalty"], z * p["repetition_penalty"]), z)
    z = z - p["frequency_penalty"] * counts - p["presence_penalty"] * seen
    z = z / p["temperature"]
    logprobs_raw = torch.log_softmax(logits.float(), -1)
    s, idx = torch.sort(z, descending=True)
    s[:, p["top_k"]:] = float("-inf")
    probs = torch.softmax(s, -1)
    above = torch.cumsum(probs, -1) - probs
    s = s.masked_fill(above >= p["top_p"], float("-inf"))
    probs = torch.softmax(s, -1)
    s = s.masked_fill(probs < p["min_p"] * probs[:, :1], float("-inf"))
    choice = torch.multinomial(torch.softmax(s, -1), 1)
    tokens = idx.gather(1, choice).squeeze(1)
    return tokens, logprobs_raw.gather(1, tokens[:, None]).squeeze(1)


CASES = [
    OpCase("sample", _make, _tritium, _eager, lambda s, d: s[0] * s[1] * esize(d),
           shapes=((32, 49152), (1, 128256)), grad_args=(),
           note="top-k 50 + top-p 0.9 + min-p 0.05 + penalties; eager: scatter, sort, cumsum, masks, multinomial"),
]
