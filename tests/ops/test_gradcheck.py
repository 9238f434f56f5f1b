"""float64 gradcheck of the differentiable public ops whose own test files do not gradcheck every variant, one
row per case: a factory returning (fn, inputs) with the float64 leaves to check. `sample` has no gradient: its
float64 path is checked against reference.sample instead."""
import pytest
import torch

import tritium
from tests.util import assert_within_torch_error
from tritium import reference
from tritium.ops.sampling import SamplingParams, seeded_uniform


def _leaves(*shapes, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).requires_grad_(True) for s in shapes]


def _flash(**kw):
    def make():
        q, k, v = _leaves((1, 4, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8))  # GQA 2, L < S
        return (lambda q_, k_, v_: tritium.flash_attention(q_, k_, v_, **kw)), (q, k, v)
    return make


def _rope(interleaved, rotary):
    def make():
        cos, sin = tritium.rope_tables(16, rotary, base=100.0)
        cos, sin = cos.double(), sin.double()
        q, k = _leaves((5, 4, 8), (5, 2, 8))
        pos = torch.tensor([3, 0, 15, 7, 7])
        return (lambda q_, k_: tritium.rope(q_, k_, cos, sin, pos, interleaved)), (q, k)
    return make


def _flce(**kw):
    def make():
        h, w, b = _leaves((6, 5), (9, 5), (9,))
        t = torch.tensor([1, 8, -100, 0, 4, 4])
        return (lambda h_, w_, b_: tritium.fused_linear_cross_entropy(h_, w_, t, b_, chunk_size=4, **kw)), (h, w, b)
    return make


def _distill(target):
    def make():
        s, te = _leaves((2, 3, 11), (2, 3, 11), scale=2.0)
        te = te.detach()  # the teacher gets no gradient (documented): the student's is checked
        t = torch.tensor([[1, -100, 10], [0, 5, 5]]) if target else None
        return (lambda s_: tritium.distillation_loss(s_, te, 1.5, 0.6, t)), (s,)
    return make


def _rnn(cls, bidirectional, num_layers):
    """tritium.nn.LSTM / GRU / RNN (the functional lstm/gru/rnn_* behind them) with its parameters as gradcheck
    inputs."""
    def make():
        torch.manual_seed(0)
        m = cls(3, 4, num_layers=num_layers, bidirectional=bidirectional).double()
        names = [n for n, _ in m.named_parameters()]
        x = _leaves((4, 2, 3))[0]

        def fn(x_, *ps):
            out = torch.func.functional_call(m, dict(zip(names, ps)), (x_,))
            return out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))
        return fn, (x, *(p.detach().clone().requires_grad_(True) for p in m.parameters()))
    return make


def _batch_norm_act(activation, residual):
    def make():
        x, w, b, r = _leaves((2, 3, 4), (3,), (3,), (2, 3, 4))
        mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
        with torch.no_grad():  # clear of relu's kink, where finite differences are meaningless
            x[x.abs() < 0.05] += 0.2
        if residual:
            return (lambda x_, w_, b_, r_: tritium.batch_norm_act(x_, mean, var, w_, b_, 1e-5, activation, r_),
                    (x, w, b, r))
        return (lambda x_, w_, b_: tritium.batch_norm_act(x_, mean, var, w_, b_, 1e-5, activation)), (x, w, b)
    return make


def _linear():
    x, w, b = _leaves((2, 3, 5), (4, 5), (4,))
    return tritium.linear, (x, w, b)


GRADCHECK = {
    "flash_plain": _flash(),
    "flash_causal": _flash(causal=True),
    "flash_window_softcap": _flash(window=(2, 1), softcap=2.0, scale=0.4),
    "flash_lse": _flash(causal=True, return_lse=True),
    "rope_half": _rope(False, 8),
    "rope_interleaved_partial": _rope(True, 4),
    "flce_mean": _flce(),
    "flce_sum_smooth": _flce(reduction="sum", label_smoothing=0.2),
    "flce_none": _flce(reduction="none"),
    "distill": _distill(False),
    "distill_target": _distill(True),
    "lstm": _rnn(tritium.nn.LSTM, False, 1),
    "lstm_bidir_2layer": _rnn(tritium.nn.LSTM, True, 2),
    "gru": _rnn(tritium.nn.GRU, False, 1),
    "gru_bidir_2layer": _rnn(tritium.nn.GRU, True, 2),
    "rnn_tanh": _rnn(tritium.nn.RNN, False, 1),
    "rnn_relu_bidir_2layer": _rnn(lambda *a, **k: tritium.nn.RNN(*a, nonlinearity="relu", **k), True, 2),
    "batch_norm_act_relu": _batch_norm_act("relu", False),
    "batch_norm_act_gelu_residual": _batch_norm_act("gelu_tanh", True),
    "linear": _linear,
}


@pytest.mark.parametrize("case", list(GRADCHECK))
def test_gradcheck(case):
    torch.manual_seed(0)
    fn, inputs = GRADCHECK[case]()
    assert torch.autograd.gradcheck(fn, inputs)


def test_sample_float64_path():
    """float64 logits (the C++ kernel's float64 instantiation): the tokens reference.sample draws with the same
    uniforms, and logprobs of the raw log_softmax. Rows are sampled in float32 whatever the logits' dtype
    (csrc/sampling.cpp), so the logprobs are held to 2x the error of torch's float32 log_softmax."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 3
    params = [SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=rp, seed=100 + i)
              for i, (t, k, p, m, rp) in enumerate([(1.0, 0, 1.0, 0.0, 1.0), (0.7, 5, 1.0, 0.0, 1.0),
                                                    (1.3, 0, 0.8, 0.0, 1.0), (1.0, 0, 1.0, 0.05, 1.0),
                                                    (0.0, 0, 1.0, 0.0, 1.0), (0.9, 10, 0.9, 0.0, 1.4)])]
    history = [[1, 2], [], [3], [49, 49], [0], [7, 8, 9]]
    tokens, logprobs = tritium.sample(logits, params, history)
    uniform = torch.tensor([seeded_uniform(p.seed, len(h)) for p, h in zip(params, history)], dtype=torch.float32)
    rows = [dict(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                 repetition_penalty=p.repetition_penalty, presence_penalty=p.presence_penalty,
                 frequency_penalty=p.frequency_penalty, logit_bias=p.logit_bias) for p in params]
    want_t, want_lp = reference.sample(logits, uniform, rows, history)
    assert torch.equal(tokens, want_t)
    rows_t = torch.arange(6), tokens
    assert_within_torch_error(logprobs, torch.log_softmax(logits.float(), -1)[rows_t],
                              torch.log_softmax(logits, -1)[rows_t], "logprobs")
