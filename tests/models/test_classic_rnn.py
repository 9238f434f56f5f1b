"""tritium.nn.LSTM / GRU / RNN against torch.nn.LSTM / GRU / RNN with the same weights: every option combination
(torch's RNN option grid: layers, bidirectional, batch_first, initial state, tanh and relu), values and every
gradient; the Triton scans (interpreter) against the C++ scans; drop-in behaviour."""
import itertools

import pytest
import torch

import tritium
from tritium.kernels import rnn as triton_rnn
from tests.util import assert_within_torch_error

# cell -> (tritium module, torch module, constructor keywords)
PAIRS = {"lstm": (tritium.nn.LSTM, torch.nn.LSTM, {}), "gru": (tritium.nn.GRU, torch.nn.GRU, {}),
         "rnn_tanh": (tritium.nn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
         "rnn_relu": (tritium.nn.RNN, torch.nn.RNN, {"nonlinearity": "relu"})}
I, H, B = 5, 7, 3


def _run(module, x, hx):
    """Output, final states and the gradients of a fixed random projection of all of them w.r.t. the input,
    the initial states and every parameter."""
    out, h = module(x, hx)
    states = list(h) if isinstance(h, tuple) else [h]
    g = torch.Generator().manual_seed(1)
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=t.dtype)).sum() for t in [out] + states)
    hx_list = [] if hx is None else (list(hx) if isinstance(hx, tuple) else [hx])
    grads = torch.autograd.grad(loss, [x] + hx_list + list(module.parameters()))
    return [out] + states + list(grads)


CASES = list(itertools.product(PAIRS, (1, 2), (False, True), (False, True), (False, True), (1, 50)))


@pytest.mark.parametrize("cell,layers,bidirectional,batch_first,init,T", CASES)
def test_matches_torch(cell, layers, bidirectional, batch_first, init, T):
    ours_cls, torch_cls, kw = PAIRS[cell]
    ref = torch_cls(I, H, layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
    ours = ours_cls(I, H, layers, bidirectional=bidirectional, batch_first=batch_first, **kw)
    ours.load_state_dict(ref.state_dict())  # same parameter names: a torch checkpoint loads as is
    D = 2 if bidirectional else 1
    x = torch.randn((B, T, I) if batch_first else (T, B, I))
    hx = None
    if init:
        hx = tuple(torch.randn(layers * D, B, H) for _ in range(2 if cell == "lstm" else 1))
        hx = hx if cell == "lstm" else hx[0]

    def inputs(dtype):
        xi = x.to(dtype).requires_grad_(True)
        if hx is None:
            return xi, None
        if cell == "lstm":
            return xi, tuple(h.to(dtype).requires_grad_(True) for h in hx)
        return xi, hx.to(dtype).requires_grad_(True)

    got = _run(ours, *inputs(torch.float32))
    theirs = _run(ref, *inputs(torch.float32))
    ref64 = _run(ref.double(), *inputs(torch.float64))
    names = ["output"] + ["h_n", "c_n"][:2 if cell == "lstm" else 1] + ["dx"] + (["dh0", "dc0"][:2 if cell == "lstm"
                                                                                   else 1] if init else [])
    names += [f"d{n}" for n, _ in ref.named_parameters()]
    assert len(got) == len(names)
    for name, a, b, r in zip(names, got, theirs, ref64):
        assert_within_torch_error(a, b, r, name)



@pytest.mark.parametrize("cell", PAIRS)
@pytest.mark.parametrize("bidirectional,batch_first", [(False, False), (True, True)])
def test_dropout_between_layers_matches_torch(cell, bidirectional, batch_first):
    """torch's `dropout` option (between layers, training mode only): with the same seed tritium draws the same
    masks as torch's RNN, so the outputs and every gradient agree (float64); in eval mode dropout is off."""
    ours_cls, torch_cls, kw = PAIRS[cell]
    ref = torch_cls(I, H, 3, dropout=0.5, bidirectional=bidirectional, batch_first=batch_first, **kw).double()
    ours = ours_cls(I, H, 3, dropout=0.5, bidirectional=bidirectional, batch_first=batch_first, **kw).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, 6, I, dtype=torch.float64)
    torch.manual_seed(3)
    theirs = _run(ref, x.clone().requires_grad_(True), None)
    torch.manual_seed(3)
    got = _run(ours, x.clone().requires_grad_(True), None)
    for i, (a, b) in enumerate(zip(got, theirs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"result {i}: {m}")
    ours.eval()
    ref.eval()
    off = _run(ours, x.clone().requires_grad_(True), None)
    torch.testing.assert_close(off[0], _run(ref, x.clone().requires_grad_(True), None)[0], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(off[0], got[0])  # the training-mode masks changed the output

@pytest.mark.parametrize("cell", PAIRS)
def test_unbatched_and_errors(cell):
    ours_cls, torch_cls, kw = PAIRS[cell]
    ref = torch_cls(I, H, 2, **kw)
    ours = ours_cls(I, H, 2, **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, I)
    out, h = ours(x)
    ref_out, ref_h = ref(x)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(h if isinstance(h, tuple) else [h], ref_h if isinstance(ref_h, tuple) else [ref_h]):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError):
        ours(torch.randn(2, 3, 4, I))
    with pytest.raises(RuntimeError):  # wrong input size, as torch
        ours(torch.randn(6, 2, I + 1))
    bad = torch.randn(2, 2, H)  # 3-D state for unbatched input
    with pytest.raises(RuntimeError):
        ours(x, (bad, bad) if cell == "lstm" else bad)


@pytest.mark.parametrize("cell", PAIRS)
def test_packed_sequence_and_patch(cell):
    """PackedSequence runs torch's implementation (explicitly); patch() swaps torch modules for the twins."""
    ours_cls, torch_cls, kw = PAIRS[cell]
    ref = torch_cls(I, H, **kw)
    model = torch.nn.Sequential(torch_cls(I, H, **kw))
    model[0].load_state_dict(ref.state_dict())
    replaced = tritium.patch(model)
    assert replaced == [("0", torch_cls)] and type(model[0]) is ours_cls
    packed = torch.nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, I), [4, 2])
    out, _ = model[0](packed)
    ref_out, _ = ref(packed)
    torch.testing.assert_close(out.data, ref_out.data)


@pytest.mark.parametrize("cell", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes_values_and_grads(dtype, cell):
    """bfloat16 (computed in float32, rounded once) and float64: output and every gradient within the tolerance
    rule of torch's own layer in that dtype, two bidirectional layers."""
    ours_cls, torch_cls, kw = PAIRS[cell]
    ref = torch_cls(I, H, 2, bidirectional=True, **kw).to(dtype)
    ours = ours_cls(I, H, 2, bidirectional=True, **kw).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ref64 = torch_cls(I, H, 2, bidirectional=True, **kw).double()
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    x = torch.randn(9, B, I, dtype=torch.float64).to(dtype)
    proj = torch.randn(9, B, 2 * H, dtype=torch.float64)   # a fixed linear loss: its gradient is proj
    outs = []
    for m, xi in ((ours, x.clone()), (ref, x.clone()), (ref64, x.double())):
        xi.requires_grad_(True)
        out = m(xi)[0]
        g = torch.autograd.grad((out * proj.to(out.dtype)).sum(), [xi] + list(m.parameters()))
        outs.append([out.detach()] + list(g))
    names = ["output", "dx"] + [f"d{n}" for n, _ in ref.named_parameters()]
    for name, a, b, c in zip(names, *outs):
        assert_within_torch_error(a, b, c, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    ref = torch.nn.LSTM(I, H, bidirectional=True).to(dtype)
    ours = tritium.nn.LSTM(I, H, bidirectional=True).to(dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(9, B, I, dtype=torch.float64)
    out = ours(x.to(dtype))[0]
    ref64 = torch.nn.LSTM(I, H, bidirectional=True).double()
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    # the reference takes x rounded to dtype: torch's error is its own, not the input rounding's
    assert_within_torch_error(out, ref(x.to(dtype))[0], ref64(x.to(dtype).double())[0], "output")


@pytest.mark.parametrize("reverse", [False, True])
def test_triton_scans_match_cpp(reverse):
    """The Triton scan launchers (the GPU path, run by the interpreter) against the C++ scans."""
    T, Bs, Hs = 3, 2, 7
    cpp = torch.ops.tritium
    xproj = torch.randn(T, Bs, 4 * Hs)
    w = torch.randn(4 * Hs, Hs) * 0.3
    h0, c0 = torch.randn(Bs, Hs), torch.randn(Bs, Hs)
    got, want = triton_rnn.lstm_scan_fwd(xproj, w, h0, c0, reverse), cpp.lstm_scan_fwd(xproj, w, h0, c0, reverse)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dhs, dcT = torch.randn(T, Bs, Hs), torch.randn(Bs, Hs)
    got = triton_rnn.lstm_scan_bwd(dhs, dcT, w, h0, c0, want[1], want[2], reverse)
    for a, b in zip(got, cpp.lstm_scan_bwd(dhs, dcT, w, h0, c0, want[1], want[2], reverse)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xg, wg, bg = torch.randn(T, Bs, 3 * Hs), torch.randn(3 * Hs, Hs) * 0.3, torch.randn(3 * Hs)
    got, want = triton_rnn.gru_scan_fwd(xg, wg, bg, h0, reverse), cpp.gru_scan_fwd(xg, wg, bg, h0, reverse)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    got = triton_rnn.gru_scan_bwd(dhs, wg, h0, want[0], want[1], reverse)
    for a, b in zip(got, cpp.gru_scan_bwd(dhs, wg, h0, want[0], want[1], reverse)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    xr, wr = torch.randn(T, Bs, Hs), torch.randn(Hs, Hs) * 0.3
    for relu in (False, True):
        got, want = triton_rnn.rnn_scan_fwd(xr, wr, h0, reverse, relu), cpp.rnn_scan_fwd(xr, wr, h0, reverse, relu)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        got = triton_rnn.rnn_scan_bwd(dhs, wr, h0, want, reverse, relu)
        for a, b in zip(got, cpp.rnn_scan_bwd(dhs, wr, h0, want, reverse, relu)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", PAIRS)
def test_compile_fullgraph(cell):
    """torch.compile(fullgraph=True) traces through the scans (fake kernels) and gives the eager result, values
    and gradients. Dynamo refuses every RNNBase module (torch's own included) unless allow_rnn is set."""
    m = PAIRS[cell][0](I, H, batch_first=True, bidirectional=True, **PAIRS[cell][2])
    x = torch.randn(B, 4, I, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out = compiled(x)[0]
    ref = m(x)[0]
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])
