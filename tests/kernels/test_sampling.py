"""Fused sampling kernels (C++ and Triton interpreter) against tritium.reference.sample with the same uniform
numbers: same tokens, same raw log-probabilities; greedy = argmax; invalid rows flagged."""
import pytest
import torch

import tritium  # noqa: F401
from tritium import reference
from tritium.kernels import sampling
from tritium.ops.sampling import SamplingParams, _history_tensor
from tests.util import check_gpu_compile, on_device

triton_sampling = on_device(sampling)

cpp = torch.ops.tritium

PARAMS = [
    SamplingParams(temperature=0.0),
    SamplingParams(),
    SamplingParams(top_k=20),
    SamplingParams(top_k=1),
    SamplingParams(top_p=0.7, temperature=0.8),
    SamplingParams(min_p=0.1),
    SamplingParams(top_k=50, top_p=0.9, min_p=0.05, temperature=1.3),
    SamplingParams(repetition_penalty=1.3, frequency_penalty=0.2, presence_penalty=0.1, logit_bias={5: 3.0, 2: -1.0}),
    SamplingParams(temperature=0.0, repetition_penalty=2.0, logit_bias={0: 100.0}),
    SamplingParams(top_k=5, top_p=0.5, repetition_penalty=0.8, temperature=0.5),
]


def _pack(params, logits, history):
    B = logits.shape[0]
    table = torch.tensor([[p.temperature, min(p.top_k, logits.shape[1]), p.top_p, p.min_p, p.repetition_penalty,
                           p.presence_penalty, p.frequency_penalty] for p in params], dtype=torch.float32)
    nb = max((len(p.logit_bias) for p in params if p.logit_bias), default=0)
    bi = torch.full((B, max(nb, 1)), -1, dtype=torch.int64)
    bv = torch.zeros((B, max(nb, 1)))
    for i, p in enumerate(params):
        for j, (t, b) in enumerate((p.logit_bias or {}).items()):
            bi[i, j], bv[i, j] = t, b
    rows = [dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                 repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
                 frequency_penalty=p.frequency_penalty, logit_bias=p.logit_bias) for p in params]
    return table, _history_tensor(history, B, "cpu"), bi, bv, rows


def _case(V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(PARAMS)
    logits = (torch.randn(B, V, generator=g, dtype=torch.float64) * 3).to(dtype)
    top = torch.argsort(logits[7].double(), descending=True)[:6].tolist()
    history = [[1, 2, 2, 3], [], [V - 1], [0, 0, 0], [5, 5], [7], [3], top + [5, 5, V + 10], [0, 1], top[:3]]
    u = torch.rand(B, generator=g)
    return logits, history, u


@pytest.mark.parametrize("impl_name,impl,dtype",
                         [("cpp", cpp, d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)]
                         + [("triton", triton_sampling, d) for d in (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("V", (7, 123, 4097))
def test_matches_reference(impl_name, impl, dtype, V):
    for seed in range(2 if impl_name == "triton" else 6):
        logits, history, u = _case(V, dtype, seed)
        table, ht, bi, bv, rows = _pack(PARAMS, logits, history)
        tokens, logprobs = impl.sample_fwd(logits, u, table, ht, bi, bv)
        ref_t, ref_lp = reference.sample(logits, u, rows, history)
        assert tokens.tolist() == ref_t.tolist(), f"seed {seed}"
        torch.testing.assert_close(logprobs, ref_lp, rtol=1e-5, atol=1e-5)


def test_triton_float16():
    """float16 logits (other loads than bfloat16) over two vocabulary blocks."""
    logits, history, u = _case(4097, torch.float16, 1)
    table, ht, bi, bv, rows = _pack(PARAMS, logits, history)
    tokens, logprobs = triton_sampling.sample_fwd(logits, u, table, ht, bi, bv)
    ref_t, ref_lp = reference.sample(logits, u, rows, history)
    assert tokens.tolist() == ref_t.tolist()
    torch.testing.assert_close(logprobs, ref_lp, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", [cpp, triton_sampling], ids=["cpp", "triton"])
def test_greedy_is_argmax(impl):
    logits = torch.randn(5, 781)
    logits[2, 100] = logits[2, 200] = logits[2].max() + 1  # ties: the first maximal index, as torch.argmax
    logits[3, 35] = logits[3, 33] = logits[3].max() + 1     # ... within one vector of compares
    logits[4, 779] = logits[4, 770] = logits[4].max() + 1   # ... in the partial last vector (781 = 48 * 16 + 13)
    table = torch.tensor([[0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0]]).repeat(5, 1)
    tokens, logprobs = impl.sample_fwd(logits, torch.rand(5), table, None, None, None)
    assert tokens.tolist() == torch.argmax(logits, -1).tolist()
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1).gather(1, tokens[:, None]).squeeze(1))


@pytest.mark.parametrize("impl", [cpp, triton_sampling], ids=["cpp", "triton"])
def test_invalid_rows_are_flagged(impl):
    logits = torch.randn(5, 300)
    logits[0, 17] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, :299] = float("-inf")  # one finite logit: always that token
    table = torch.tensor([[1.0, 0, 0.9, 0.0, 1.0, 0.0, 0.0], [0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0]]).repeat(3, 1)[:5]
    tokens, logprobs = impl.sample_fwd(logits, torch.rand(5), table, None, None, None)
    assert tokens.tolist()[:4] == [-1, -1, -1, 299]
    assert torch.isnan(logprobs[:3]).all() and logprobs[3] == 0 and tokens[4] >= 0


@pytest.mark.gpu_compile
def test_gpu_compile():
    def run():
        for dtype in (torch.float32, torch.bfloat16):
            logits, history, u = _case(300, dtype)
            table, ht, bi, bv, _ = _pack(PARAMS, logits, history)
            triton_sampling.sample_fwd(logits, u, table, ht, bi, bv)
            triton_sampling.sample_fwd(logits, u, table, None, None, None)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_sample_kernel"}
