"""tritium.sample: statistics (chi-square of the empirical distribution against the reference's truncated,
renormalised one), greedy, seeds, validation, invalid rows."""
import math

import pytest
import torch

import tritium
from tritium import reference
from tritium.inference import SamplingParams, sample

V, N = 40, 20000


def _p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Chi-square goodness-of-fit p-value over the bins the expected distribution can produce."""
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    try:
        from scipy.stats import chi2 as chi2_dist

        return float(chi2_dist.sf(chi2, df))
    except ImportError:
        return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                             torch.tensor(chi2 / 2, dtype=torch.float64)))


CONFIGS = {
    "top_k": dict(top_k=7),
    "top_p": dict(top_p=0.6),
    "min_p": dict(min_p=0.08),
    "temperature": dict(temperature=0.7),
    "combined": dict(top_k=12, top_p=0.85, min_p=0.02, temperature=1.2, repetition_penalty=1.5,
                     presence_penalty=0.3, frequency_penalty=0.2, logit_bias={3: 1.5}),
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_empirical_distribution_matches_reference(name, dtype):
    kw = CONFIGS[name]
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(V, generator=g) * 2).to(dtype)
    history = [0, 1, 1, 5] if "repetition_penalty" in kw else None
    p = reference.sampling_distribution(logits, **kw, history=history)
    params = SamplingParams(**kw)
    tokens, logprobs = sample(logits.expand(N, V), params, None if history is None else [history] * N)
    counts = torch.bincount(tokens, minlength=V).double()
    assert counts[p == 0].sum() == 0, f"drew tokens outside the kept set: {torch.nonzero(counts * (p == 0))}"
    keep = p > 0
    assert _p_value(counts[keep], N * p[keep]) > 1e-3
    torch.testing.assert_close(logprobs, torch.log_softmax(logits.double(), 0)[tokens].float())
    # the test has power: the same counts against a slightly different temperature are rejected
    other = reference.sampling_distribution(logits, **{**kw, "temperature": kw.get("temperature", 1.0) * 1.3},
                                            history=history)
    assert _p_value(counts[keep], N * other[keep] / other[keep].sum()) < 1e-3


def test_greedy_equals_argmax_and_mixed_batch():
    logits = torch.randn(6, 1000)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0),
              SamplingParams(top_p=0.9), SamplingParams(temperature=0.0), SamplingParams(min_p=1.0)]
    tokens, _ = sample(logits, params)
    argmax = torch.argmax(logits, -1)
    assert tokens[[0, 1, 2, 4, 5]].tolist() == argmax[[0, 1, 2, 4, 5]].tolist()


def test_seeded_rows_are_deterministic_and_advance():
    logits = torch.randn(3, 500)
    params = [SamplingParams(seed=1234)] * 3
    a, _ = sample(logits, params, [[1, 2]] * 3)
    b, _ = sample(logits, params, [[1, 2]] * 3)
    assert a.tolist() == b.tolist()
    torch.manual_seed(99)  # unseeded rows use the global generator; seeded rows do not
    c, _ = sample(logits, params, [[1, 2]] * 3)
    assert c.tolist() == a.tolist()
    draws = {tuple(sample(logits[:1], params[:1], [[1] * n])[0].tolist()) for n in range(20)}
    assert len(draws) > 5, "successive steps must get fresh random numbers"


def test_reference_backend_gives_the_same_tokens(reference_backend):
    logits = torch.randn(4, 300)
    params = [SamplingParams(seed=s, top_k=30, top_p=0.9) for s in range(4)]
    ref_t, ref_lp = sample(logits, params, [[3, 4]] * 4)
    tritium.set_backend("kernels")
    t, lp = sample(logits, params, [[3, 4]] * 4)
    assert t.tolist() == ref_t.tolist()
    torch.testing.assert_close(lp, ref_lp)


@pytest.mark.parametrize("field,value", [("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", -0.1),
                                         ("min_p", 1.1), ("temperature", -1.0), ("temperature", math.inf),
                                         ("repetition_penalty", 0.0), ("presence_penalty", math.nan),
                                         ("logit_bias", {-1: 1.0}), ("seed", 1.5), ("top_k", 2.5)])
def test_invalid_params_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_invalid_rows_raise_or_flag():
    logits = torch.randn(3, 100)
    logits[1, 5] = float("nan")
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        sample(logits, SamplingParams())
    tokens, logprobs = sample(logits, SamplingParams(), on_invalid="flag")
    assert tokens[1] == -1 and math.isnan(logprobs[1]) and (tokens[[0, 2]] >= 0).all()
    with pytest.raises(ValueError, match="logit_bias"):
        sample(logits, SamplingParams(logit_bias={100: 1.0}))
    with pytest.raises(ValueError, match="params"):
        sample(logits, [SamplingParams()] * 2)
    with pytest.raises(ValueError, match="history"):
        sample(logits, SamplingParams(), [[1]])


def test_history_tensor_equals_lists():
    logits = torch.randn(2, 50)
    params = [SamplingParams(temperature=0.0, repetition_penalty=3.0, presence_penalty=1.0)] * 2
    hist = [[int(torch.argmax(logits[0]))] * 3, []]
    padded = torch.tensor([hist[0], [-1, -1, -1]])
    assert sample(logits, params, hist)[0].tolist() == sample(logits, params, padded)[0].tolist()
    assert sample(logits, params, hist)[0][0] != torch.argmax(logits[0])
