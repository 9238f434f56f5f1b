"""Edge inputs for the public ops, one row per (op, edge): empty tensors and 0-d tensors (the result, or the
error type, equals torch's), and non-contiguous views (values and the gradients of a random output gradient
equal torch's). Each row is a factory returning (ours, theirs, args); theirs is torch's op or, where torch has
none, the composition in tritium.reference that specifies ours."""
import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium import reference


def _r(*shape):
    return torch.randn(*shape)


def _t(n, c, shape=None):
    return torch.randint(0, c, shape or (n,))


def _nc(*shape):
    """A non-contiguous view of the given shape: every other element of the last dim of a wider tensor."""
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]


def _fused_add(x, r, w):
    h = x + r
    return F.rms_norm(h, (x.shape[-1],), w, 1e-6), h


def _flce_twin(h, w, t, **kw):
    return F.cross_entropy(F.linear(h, w), t, **kw)


def _rope_tables(rd=8):
    return tritium.rope_tables(16, rd, base=100.0)


def _rope_row(make_q, make_k, positions):
    cos, sin = _rope_tables()
    return (lambda q, k: tritium.rope(q, k, cos, sin, positions),
            lambda q, k: reference.rope(q, k, cos, sin, positions), [make_q, make_k])


def _bn(x):
    C = x.shape[1]
    mean, var, w, b = torch.randn(C), torch.rand(C) + 0.5, torch.randn(C), torch.randn(C)
    return (lambda x_: tritium.batch_norm_act(x_, mean, var, w, b, 1e-5, "gelu_tanh"),
            lambda x_: reference.batch_norm_act(x_, mean, var, w, b, 1e-5, "gelu_tanh"), [x])


def _rnn(kind, x):
    torch.manual_seed(0)
    ours = getattr(tritium.nn, kind)(4, 3, batch_first=True)
    theirs = getattr(torch.nn, kind)(4, 3, batch_first=True)
    theirs.load_state_dict(ours.state_dict())
    return (lambda x_: ours(x_)[0]), (lambda x_: theirs(x_)[0]), [x]


# name -> factory of (ours, theirs, args)
EMPTY = {
    "rms_norm_rows": lambda: (lambda x, w: tritium.rms_norm(x, (5,), w), lambda x, w: F.rms_norm(x, (5,), w),
                              [_r(0, 5), _r(5)]),
    "rms_norm_width": lambda: (lambda x: tritium.rms_norm(x, (0,)), lambda x: F.rms_norm(x, (0,)), [_r(3, 0)]),
    "layer_norm_rows": lambda: (lambda x, w, b: tritium.layer_norm(x, (5,), w, b),
                                lambda x, w, b: F.layer_norm(x, (5,), w, b), [_r(2, 0, 5), _r(5), _r(5)]),
    "fused_add_rms_norm": lambda: (lambda x, r, w: tritium.fused_add_rms_norm(x, r, w, 1e-6), _fused_add,
                                   [_r(0, 6), _r(0, 6), _r(6)]),
    "softmax": lambda: (lambda x: tritium.softmax(x, -1), lambda x: F.softmax(x, -1), [_r(0, 7)]),
    "log_softmax_dim0": lambda: (lambda x: tritium.log_softmax(x, 0), lambda x: F.log_softmax(x, 0), [_r(0, 7)]),
    "softmin_width": lambda: (lambda x: tritium.softmin(x, -1), lambda x: F.softmin(x, -1), [_r(3, 0)]),
    "cross_entropy_mean": lambda: (tritium.cross_entropy, F.cross_entropy, [_r(0, 5), _t(0, 5)]),
    "cross_entropy_none": lambda: (lambda x, t: tritium.cross_entropy(x, t, reduction="none"),
                                   lambda x, t: F.cross_entropy(x, t, reduction="none"), [_r(0, 5), _t(0, 5)]),
    "flce_mean": lambda: (tritium.fused_linear_cross_entropy, _flce_twin, [_r(0, 4), _r(6, 4), _t(0, 6)]),
    "flce_sum": lambda: (lambda h, w, t: tritium.fused_linear_cross_entropy(h, w, t, reduction="sum"),
                         lambda h, w, t: _flce_twin(h, w, t, reduction="sum"), [_r(0, 4), _r(6, 4), _t(0, 6)]),
    "distillation_loss": lambda: (lambda s, t: tritium.distillation_loss(s, t, 2.0),
                                  lambda s, t: reference.distillation_loss(s, t, 2.0), [_r(0, 9), _r(0, 9)]),
    "linear_rows": lambda: (tritium.linear, F.linear, [_r(0, 5), _r(3, 5), _r(3)]),
    "linear_k0": lambda: (tritium.linear, F.linear, [_r(4, 0), _r(3, 0), _r(3)]),
    "swiglu": lambda: (tritium.swiglu, reference.swiglu, [_r(0, 8)]),
    "geglu_pair": lambda: (tritium.geglu, reference.geglu, [_r(0, 4), _r(0, 4)]),
    "glu": lambda: (tritium.glu, F.glu, [_r(0, 8)]),
    "prelu": lambda: (tritium.prelu, F.prelu, [_r(0, 3, 4), torch.rand(3)]),
    "dyt": lambda: (tritium.dyt, reference.dyt, [_r(0, 6), torch.tensor([0.5]), _r(6), _r(6)]),
    "swish_tensor_beta": lambda: (tritium.swish, reference.swish, [_r(0, 6), torch.tensor(1.3)]),
    "batch_norm_act": lambda: _bn(_r(0, 3, 4)),
    "flash_attention_queries": lambda: (lambda q, k, v: tritium.flash_attention(q, k, v, causal=True),
                                        lambda q, k, v: reference.flash_attention(q, k, v, causal=True),
                                        [_r(1, 2, 0, 8), _r(1, 2, 5, 8), _r(1, 2, 5, 8)]),
    "flash_attention_keys": lambda: (tritium.flash_attention, reference.flash_attention,
                                     [_r(1, 2, 3, 8), _r(1, 2, 0, 8), _r(1, 2, 0, 8)]),
    "sdpa_keys": lambda: (tritium.scaled_dot_product_attention, F.scaled_dot_product_attention,
                          [_r(1, 2, 3, 8), _r(1, 2, 0, 8), _r(1, 2, 0, 8)]),
    "rope_tokens": lambda: _rope_row(_r(0, 2, 8), _r(0, 1, 8), torch.zeros(0, dtype=torch.long)),
    "lstm_batch": lambda: _rnn("LSTM", _r(0, 3, 4)),
    "gru_seq": lambda: _rnn("GRU", _r(2, 0, 4)),
}

ZERO_D = {
    "softmax": lambda: (lambda x: tritium.softmax(x, 0), lambda x: F.softmax(x, 0), [torch.tensor(0.3)]),
    "log_softmax": lambda: (lambda x: tritium.log_softmax(x, -1), lambda x: F.log_softmax(x, -1),
                            [torch.tensor(-2.0)]),
    "softmin": lambda: (lambda x: tritium.softmin(x, 0), lambda x: F.softmin(x, 0), [torch.tensor(1.5)]),
    "cross_entropy_prob_target": lambda: (tritium.cross_entropy, F.cross_entropy, [_r(5), torch.softmax(_r(5), 0)]),
    "rms_norm": lambda: (lambda x: tritium.rms_norm(x, ()), lambda x: F.rms_norm(x, ()), [torch.tensor(0.7)]),
    "layer_norm": lambda: (lambda x: tritium.layer_norm(x, ()), lambda x: F.layer_norm(x, ()), [torch.tensor(0.7)]),
    "linear_weight": lambda: (tritium.linear, F.linear, [_r(3), _r(3)]),
    "linear_0d_input": lambda: (tritium.linear, F.linear, [torch.tensor(1.0), _r(2, 1)]),
    "prelu": lambda: (tritium.prelu, F.prelu, [torch.tensor(-0.5), torch.tensor([0.25])]),
    "swish": lambda: (tritium.swish, reference.swish, [torch.tensor(-0.5), torch.tensor(1.3)]),
    "dyt": lambda: (tritium.dyt, reference.dyt, [torch.tensor(0.4), torch.tensor(0.5), torch.tensor(2.0),
                                                 torch.tensor(0.1)]),
    "glu": lambda: (tritium.glu, F.glu, [torch.tensor(1.0)]),
    "sdpa": lambda: (tritium.scaled_dot_product_attention, F.scaled_dot_product_attention,
                     [torch.tensor(1.0)] * 3),
    "fused_linear_cross_entropy": lambda: (tritium.fused_linear_cross_entropy, _flce_twin,
                                           [_r(4), _r(6, 4), torch.tensor(2)]),
}

NON_CONTIGUOUS = {
    "rms_norm": lambda: (lambda x, w: tritium.rms_norm(x, (7,), w), lambda x, w: F.rms_norm(x, (7,), w),
                         [_nc(3, 7), _nc(7)]),
    "rms_norm_transposed": lambda: (lambda x: tritium.rms_norm(x, (5,)), lambda x: F.rms_norm(x, (5,)),
                                    [_r(5, 4).t()]),
    "layer_norm": lambda: (lambda x, w, b: tritium.layer_norm(x, (7,), w, b),
                           lambda x, w, b: F.layer_norm(x, (7,), w, b), [_nc(2, 3, 7), _nc(7), _nc(7)]),
    "fused_add_rms_norm": lambda: (lambda x, r, w: tritium.fused_add_rms_norm(x, r, w, 1e-6), _fused_add,
                                   [_nc(4, 6), _r(6, 4).t(), _nc(6)]),
    "softmax_transposed": lambda: (lambda x: tritium.softmax(x, -1), lambda x: F.softmax(x, -1), [_r(9, 4).t()]),
    "log_softmax_strided": lambda: (lambda x: tritium.log_softmax(x, 1), lambda x: F.log_softmax(x, 1),
                                    [_nc(2, 5, 3)]),
    "cross_entropy": lambda: (tritium.cross_entropy, F.cross_entropy, [_r(7, 5).t(), _t(5, 7)]),
    "cross_entropy_spatial": lambda: (tritium.cross_entropy, F.cross_entropy,
                                      [_r(2, 4, 6).transpose(1, 2), _t(2, 6, (2, 4))]),
    "flce": lambda: (lambda h, w, t, b: tritium.fused_linear_cross_entropy(h, w, t, b, chunk_size=3),
                     lambda h, w, t, b: F.cross_entropy(F.linear(h, w, b), t),
                     [_r(4, 7).t(), _nc(9, 4), _t(7, 9), _nc(9)]),
    "kl_div": lambda: (lambda a, b: tritium.kl_div(a, b, reduction="batchmean"),
                       lambda a, b: F.kl_div(a, b, reduction="batchmean"),
                       [torch.log_softmax(_r(6, 5), 0).t(), torch.softmax(_nc(5, 6), -1)]),
    "distillation_loss": lambda: (lambda s, t: tritium.distillation_loss(s, t, 2.0, 0.7),
                                  lambda s, t: reference.distillation_loss(s, t, 2.0, 0.7),
                                  [_nc(3, 11), _r(11, 3).t()]),
    "linear": lambda: (tritium.linear, F.linear, [_r(5, 3).t(), _nc(4, 5), _nc(4)]),
    "swiglu": lambda: (tritium.swiglu, reference.swiglu, [_nc(3, 10)]),
    "geglu_pair": lambda: (lambda g, u: tritium.geglu(g, u, approximate="tanh"),
                           lambda g, u: reference.geglu(g, u, approximate="tanh"), [_nc(3, 5), _r(5, 3).t()]),
    "prelu": lambda: (tritium.prelu, F.prelu, [_r(2, 6, 3).transpose(1, 2), torch.rand(3)]),
    "dyt": lambda: (tritium.dyt, reference.dyt, [_nc(4, 6), torch.tensor([0.5]), _nc(6), _nc(6)]),
    "batch_norm_act": lambda: _bn(_r(2, 5, 3).transpose(1, 2)),
    "flash_attention": lambda: (lambda q, k, v: tritium.flash_attention(q, k, v, causal=True, window=(3, 0)),
                                lambda q, k, v: reference.flash_attention(q, k, v, causal=True, window=(3, 0)),
                                [_r(1, 6, 4, 8).transpose(1, 2), _r(1, 9, 2, 8).transpose(1, 2),
                                 _nc(1, 2, 9, 8)]),
    "rope": lambda: _rope_row(_r(2, 5, 8).transpose(0, 1), _nc(5, 1, 8), torch.tensor([0, 3, 15, 2, 2])),
    "lstm": lambda: _rnn("LSTM", _r(5, 2, 4).transpose(0, 1)),
    "gru": lambda: _rnn("GRU", _nc(2, 5, 4)),
}


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    return [t for v in x for t in _tensors(v)] if isinstance(x, (tuple, list)) else []


def _run(ours, theirs, args, grads):
    """ours(*args) and theirs(*args): the same error type, or the same values (and, with grads, the same
    gradients of the float inputs for one random output gradient per output)."""
    def call(fn):
        ins = [a.detach().clone().requires_grad_(grads and a.is_floating_point()) for a in args]
        return ins, fn(*ins)

    try:
        t_ins, want = call(theirs)
    except Exception as e:  # noqa: BLE001 - whatever torch raises, we raise the same type
        with pytest.raises(type(e)):
            call(ours)
        return
    o_ins, got = call(ours)
    got_t, want_t = _tensors(got), _tensors(want)
    assert len(got_t) == len(want_t)
    for a, b in zip(got_t, want_t):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, equal_nan=True)
    if grads:
        dys = [torch.randn_like(b) for b in want_t]
        need = [i for i, a in enumerate(t_ins) if a.requires_grad]
        gw = torch.autograd.grad(want_t, [t_ins[i] for i in need], dys, allow_unused=True)
        gg = torch.autograd.grad(got_t, [o_ins[i] for i in need], dys, allow_unused=True)
        for i, a, b in zip(need, gg, gw):
            assert (a is None) == (b is None), f"gradient of input {i}"
            if a is not None:
                torch.testing.assert_close(a, b, msg=lambda m: f"gradient of input {i}: {m}")


@pytest.mark.parametrize("case", list(EMPTY))
def test_empty(case):
    torch.manual_seed(0)
    _run(*EMPTY[case](), grads=False)


@pytest.mark.parametrize("case", list(ZERO_D))
def test_zero_dim(case):
    torch.manual_seed(0)
    _run(*ZERO_D[case](), grads=False)


@pytest.mark.parametrize("case", list(NON_CONTIGUOUS))
def test_non_contiguous(case):
    torch.manual_seed(0)
    ours, theirs, args = NON_CONTIGUOUS[case]()
    assert any(not a.is_contiguous() for a in args), "the row must contain a non-contiguous view"
    _run(ours, theirs, args, grads=True)
