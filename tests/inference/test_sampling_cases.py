"""Sampling on small vocabularies whose distribution is written down by hand: ties at the top-p and top-k cuts,
min-p, and the order penalties -> logit bias -> temperature -> truncation that tritium.reference.
sampling_distribution documents. Checked three ways: the reference distribution itself; the kernels drawing
with chosen uniform numbers (the draw is inverse-CDF in index order: the C++ kernel over a grid of N numbers,
each token's share being its probability within 1/N; the Triton kernel, slow in the interpreter, at the middle
of each kept token's interval); and tritium.sample's seeded draws (chi-square)."""
import math

import pytest
import torch

import tritium  # noqa: F401  (registers torch.ops.tritium)
from tritium import reference
from tritium.inference import SamplingParams, sample
from tritium.kernels import sampling as triton_sampling
from tritium.ops.sampling import _history_tensor

LOG = math.log


def _norm(w):
    s = sum(w)
    return [x / s for x in w]


def _softmax(z):
    m = max(z)
    return _norm([math.exp(x - m) for x in z])


# name: (logits, SamplingParams fields, history, the distribution worked out by hand)
CASES = {
    # probabilities .2 .4 .1 .2 .1: token 1 has 0 above it, tokens 0 and 3 (tied) have .4 < .5 above them and
    # are both kept, tokens 2 and 4 have .8 above them
    "top_p_tie_kept": ([LOG(2), LOG(4), LOG(1), LOG(2), LOG(1)], dict(top_p=0.5), None, _norm([2, 4, 0, 2, 0])),
    "top_p_below_tie": ([LOG(2), LOG(4), LOG(1), LOG(2), LOG(1)], dict(top_p=0.35), None, [0, 1, 0, 0, 0]),
    "top_p_keeps_all": ([LOG(2), LOG(4), LOG(1), LOG(2), LOG(1)], dict(top_p=0.85), None, _norm([2, 4, 1, 2, 1])),
    # top-k keeps every token tied with the k-th largest
    "top_k_1_tie": ([LOG(3), LOG(1), LOG(3), LOG(2), LOG(2), LOG(1)], dict(top_k=1), None, [.5, 0, .5, 0, 0, 0]),
    "top_k_3_tie": ([LOG(3), LOG(1), LOG(3), LOG(2), LOG(2), LOG(1)], dict(top_k=3), None,
                    _norm([3, 0, 3, 2, 2, 0])),
    # top-p measures mass within what top-k kept: after top_k=2 the kept mass is 8, and token 1 has 5 >= 0.6 * 8
    # above it (over the whole row, 5 < 0.6 * 10 would keep it)
    "top_p_after_top_k": ([LOG(5), LOG(3), LOG(1), LOG(1)], dict(top_k=2, top_p=0.6), None, [1, 0, 0, 0]),
    "min_p": ([LOG(8), LOG(4), LOG(2), LOG(1)], dict(min_p=0.2), None, _norm([8, 4, 2, 0])),
    # min-p applies after temperature: at T=2 the weights are sqrt(8, 4, 2, 1), and sqrt(2/8) = .5 >= .45 is kept
    # (at T=1, 2/8 = .25 would not be)
    "min_p_after_temperature": ([LOG(8), LOG(4), LOG(2), LOG(1)], dict(min_p=0.45, temperature=2.0), None,
                                _norm([8 ** .5, 4 ** .5, 2 ** .5, 0])),
    "temperature": ([1.0, 0.0, -1.0], dict(temperature=0.5), None, _softmax([2.0, 0.0, -2.0])),
    # history [0, 1, 1]: token 0 (count 1): 2 / 2 (repetition, positive) - 0.25 * 1 - 0.5 = 0.25;
    # token 1 (count 2): -1 * 2 (repetition, negative) - 0.25 * 2 - 0.5 = -3; token 3: 0.5 + bias 1 = 1.5;
    # then / temperature 0.5: (0.5, -6, 2, 3)
    "penalties_bias_then_temperature": (
        [2.0, -1.0, 1.0, 0.5],
        dict(repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.5, logit_bias={3: 1.0},
             temperature=0.5),
        [0, 1, 1], _softmax([0.5, -6.0, 2.0, 3.0])),
    # a repetition penalty below 1 raises both signs: -2 * 0.5 = -1 and 1 / 0.5 = 2
    "repetition_below_one": ([-2.0, 1.0, 0.0], dict(repetition_penalty=0.5), [0, 1], _softmax([-1.0, 2.0, 0.0])),
    # penalties come before top-k: token 0 (largest raw logit) drops below tokens 1 and 2
    "penalty_before_top_k": ([3.0, 2.0, 1.5, 0.0], dict(presence_penalty=2.0, top_k=2), [0], _softmax(
        [-math.inf, 2.0, 1.5, -math.inf])),
}


def _params(kw):
    return SamplingParams(**kw)


@pytest.mark.parametrize("name", list(CASES))
def test_reference_distribution_is_the_hand_computed_one(name):
    logits, kw, history, want = CASES[name]
    got = reference.sampling_distribution(torch.tensor(logits, dtype=torch.float64), **kw, history=history)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)


def _pack(p: SamplingParams, B: int, V: int):
    table = torch.tensor([[p.temperature, min(p.top_k, V), p.top_p, p.min_p, p.repetition_penalty,
                           p.presence_penalty, p.frequency_penalty]] * B, dtype=torch.float32)
    bias = list((p.logit_bias or {}).items()) or [(-1, 0.0)]
    bi = torch.tensor([[t for t, _ in bias]] * B, dtype=torch.int64)
    bv = torch.tensor([[b for _, b in bias]] * B, dtype=torch.float32)
    return table, bi, bv


def _kernel_draw(impl, logits, kw, history, u):
    n, V = u.numel(), len(logits)
    x = torch.tensor(logits, dtype=torch.float32).expand(n, V).contiguous()
    ht = _history_tensor(None if history is None else [history] * n, n, "cpu")
    table, bi, bv = _pack(_params(kw), n, V)
    tokens, logprobs = impl.sample_fwd(x, u, table, ht, bi, bv)
    raw = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0)
    torch.testing.assert_close(logprobs, raw[tokens].float())
    return tokens


@pytest.mark.parametrize("name", list(CASES))
def test_cpp_kernel_draws_the_hand_computed_distribution(name):
    """N evenly spaced uniform numbers (i + 0.5) / N: inverse-CDF sampling gives token t the numbers in
    [c_{t-1}, c_t), so its count is N * p_t within one."""
    logits, kw, history, want = CASES[name]
    n = 4000
    u = (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
    tokens = _kernel_draw(torch.ops.tritium, logits, kw, history, u)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert (counts - n * torch.tensor(want, dtype=torch.float64)).abs().max() <= 1, counts.tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_triton_kernel_draws_each_kept_token_from_its_interval(name):
    """The Triton kernel (interpreter: a few rows only) with u at the middle of each kept token's interval of
    the hand-computed cumulative distribution draws that token."""
    logits, kw, history, want = CASES[name]
    c = [sum(want[:t + 1]) for t in range(len(want))]
    kept = [t for t, p in enumerate(want) if p > 0]
    u = torch.tensor([c[t] - want[t] / 2 for t in kept], dtype=torch.float32)
    assert _kernel_draw(triton_sampling, logits, kw, history, u).tolist() == kept


def _p_value(counts, expected) -> float:
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(chi2 / 2, dtype=torch.float64)))


@pytest.mark.parametrize("name", list(CASES))
def test_seeded_draws_follow_the_hand_computed_distribution(name):
    """tritium.sample with one seed per row (each row's uniform number from its seed): no token outside the
    kept set, and a chi-square test over the kept set (deterministic: the seeds are fixed)."""
    logits, kw, history, want = CASES[name]
    n, V = 20000, len(logits)
    p = torch.tensor(want, dtype=torch.float64)
    tokens, _ = sample(torch.tensor(logits).expand(n, V), [SamplingParams(**kw, seed=i) for i in range(n)],
                       None if history is None else [history] * n)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[p == 0].sum() == 0, counts.tolist()
    keep = p > 0
    if keep.sum() > 1:
        assert _p_value(counts[keep], n * p[keep]) > 1e-3, counts.tolist()
