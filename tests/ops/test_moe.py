"""tritium.moe and tritium.nn.MoE against tritium.reference.moe (the eager loop over experts): values, the
load-balancing and z losses, every gradient (x, router_weight, w13, w2) in float64 and within the tolerance rule
in float32 / bfloat16, softmax and sigmoid scores with and without renormalisation, experts without tokens, every
token on one expert, top_k = E, torch.compile(fullgraph=True), the module (shared expert, the reference twin) and
bad input."""
import pytest
import torch
import torch.nn.functional as F

import tritium
from tritium import reference
from tests.util import assert_within_torch_error, torch_and_ref

E, D, FFN = 5, 19, 11


def _router_for(x, E, gap=0.75, seed=0):
    """A router weight (E, D) giving each token logits that are a permutation of 0, gap, 2 gap, ... (plus a
    token-wide offset): the top-k choice is the same in every dtype (its gaps are far above bfloat16's rounding)."""
    gen = torch.Generator().manual_seed(seed)
    T, Dx = x.shape
    q, _ = torch.linalg.qr(torch.randn(Dx, Dx, generator=gen, dtype=torch.float64))
    basis = q[:, :E].t()                                  # (E, D) orthonormal rows
    perm = torch.rand(T, E, generator=gen).argsort(-1).double() * gap
    x_new = perm @ basis                                  # logits = x W_r^T = perm when W_r = basis
    return x_new, basis


def _inputs(T=37, E_=E, seed=0, skip=()):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    x, rw = _router_for(x, E_, seed=seed)
    if skip:   # experts in `skip` score lowest for every token: they receive no token when top_k <= E - len(skip)
        rw = rw.clone()
        x = x - 10.0 * rw[list(skip)].sum(0)
    w13 = torch.randn(E_, 2 * FFN, D, generator=gen, dtype=torch.float64) / D ** 0.5
    w2 = torch.randn(E_, D, FFN, generator=gen, dtype=torch.float64) / FFN ** 0.5
    return x, rw, w13, w2


def _all(fn, k, score, renorm):
    """A function of (x, rw, w13, w2) returning output, aux_loss and z_loss concatenated (one tensor for
    torch_and_ref), losses scaled up so their gradients weigh in."""
    def f(x, rw, w13, w2):
        y, aux, z = fn(x, rw, w13, w2, k, score, renorm, 0.5, 0.25)
        return torch.cat([y.reshape(-1), aux.reshape(1).to(y.dtype), z.reshape(1).to(y.dtype)])
    return f


@pytest.mark.parametrize("score,renorm", [("softmax", True), ("softmax", False), ("sigmoid", True),
                                          ("sigmoid", False)])
@pytest.mark.parametrize("k", (1, 2, E))
def test_float64_matches_reference(score, renorm, k):
    args = [t.requires_grad_() for t in _inputs()]
    dy = torch.randn(37 * D + 2, dtype=torch.float64)
    got = _all(tritium.moe, k, score, renorm)(*args)
    want = _all(reference.moe, k, score, renorm)(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, args, dy), torch.autograd.grad(want, args, dy)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", ["random-k2", "skip-k2", "one-expert", "topk-all"])
def test_tolerance_rule(dtype, case):
    """Output, losses and every gradient within twice the eager loop's own error in dtype."""
    if case == "skip-k2":
        args, k = _inputs(skip=(1, 3)), 2
    elif case == "one-expert":
        args, k = _inputs(E_=1), 1
    elif case == "topk-all":
        args, k = _inputs(), E
    else:
        args, k = _inputs(T=53, seed=3), 2
    n = args[0].shape[0] * D + 2
    dy = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (ty, tg), (ry, rg) = torch_and_ref(_all(reference.moe, k, "softmax", True), list(args), dy, dtype)
    ins = [a.to(dtype).requires_grad_() for a in args]
    y = _all(tritium.moe, k, "softmax", True)(*ins)
    gs = torch.autograd.grad(y, ins, dy.to(dtype))
    assert_within_torch_error(y.detach(), ty, ry, "output+losses")
    for name, o, t, r in zip(("dx", "drouter", "dw13", "dw2"), gs, tg, rg):
        assert_within_torch_error(o, t, r, name)


def test_experts_without_tokens_get_zero_grads():
    x, rw, w13, w2 = (t.requires_grad_() for t in _inputs(skip=(1, 3)))
    y, aux, z = tritium.moe(x, rw, w13, w2, 2)
    dw13, dw2 = torch.autograd.grad(y.sum(), [w13, w2])
    assert dw13[[1, 3]].abs().max() == 0 and dw2[[1, 3]].abs().max() == 0
    assert dw13[0].abs().max() > 0


def test_losses_by_hand():
    """Uniform scores (a zero router) and a known top-k: f_i = tokens' choices of i / T, P_i = 1 / E, so
    aux = coef * E * sum_i f_i / E = coef * k; z = coef * log(E)^2."""
    T, k = 8, 2
    x = torch.randn(T, D, dtype=torch.float64)
    rw = torch.zeros(E, D, dtype=torch.float64)
    w13, w2 = torch.randn(E, 2 * FFN, D, dtype=torch.float64), torch.randn(E, D, FFN, dtype=torch.float64)
    _, aux, z = tritium.moe(x, rw, w13, w2, k, aux_loss_coef=0.3, z_loss_coef=0.2)
    torch.testing.assert_close(aux, torch.tensor(0.3 * k, dtype=torch.float64))
    torch.testing.assert_close(z, torch.tensor(0.2 * torch.log(torch.tensor(float(E))).item() ** 2,
                                               dtype=torch.float64))
    # skewed: the switch-transformer formula computed directly
    rw = torch.randn(E, D, dtype=torch.float64)
    _, aux, z = tritium.moe(x, rw, w13, w2, k, aux_loss_coef=1.0, z_loss_coef=1.0)
    p = torch.softmax(x @ rw.t(), -1)
    f = F.one_hot(p.topk(k, -1).indices, E).sum((0, 1)).double() / T
    torch.testing.assert_close(aux, E * (f * p.mean(0)).sum())
    torch.testing.assert_close(z, torch.logsumexp(x @ rw.t(), -1).square().mean())


def test_gradcheck():
    args = [t[:5].clone() if i == 0 else t.clone() for i, t in enumerate(_inputs(T=7))]
    args = [a.requires_grad_() for a in args]
    assert torch.autograd.gradcheck(_all(tritium.moe, 2, "softmax", True), args)
    assert torch.autograd.gradcheck(_all(tritium.moe, 3, "sigmoid", False), args)


def test_batched_shape_and_noncontiguous():
    x, rw, w13, w2 = _inputs(T=24)
    x3 = x.view(2, 12, D).transpose(0, 1)            # (12, 2, D), not contiguous
    y, _, _ = tritium.moe(x3, rw, w13, w2, 2)
    want, _, _ = reference.moe(x3.contiguous(), rw, w13, w2, 2)
    assert y.shape == x3.shape
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)


def test_compile_fullgraph():
    x, rw, w13, w2 = (t.float() for t in _inputs())
    fn = torch.compile(lambda *a: tritium.moe(*a, 2), fullgraph=True)
    args = [t.requires_grad_() for t in (x, rw, w13, w2)]
    y, aux, z = fn(*args)
    want = reference.moe(*args, 2)
    for got, w in zip((y, aux, z), want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)
    g = torch.autograd.grad(y.sum() + aux + z, args)
    gw = torch.autograd.grad(want[0].sum() + want[1] + want[2], args)
    for a, b in zip(g, gw):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_reference_backend(monkeypatch):
    monkeypatch.setenv("TRITIUM_BACKEND", "reference")
    x, rw, w13, w2 = _inputs()
    torch.testing.assert_close(tritium.moe(x, rw, w13, w2, 2), reference.moe(x, rw, w13, w2, 2))


@pytest.mark.parametrize("shared", (False, True))
def test_module(shared):
    torch.manual_seed(0)
    m = tritium.nn.MoE(D, FFN, E, 2, score="sigmoid", shared_expert=shared, dtype=torch.float64)
    twin = tritium.nn.MoE(D, FFN, E, 2, score="sigmoid", shared_expert=shared, impl="reference",
                          dtype=torch.float64)
    twin.load_state_dict(m.state_dict())
    x = torch.randn(3, 11, D, dtype=torch.float64)
    out, ref = m(x), twin(x)
    assert out.output.shape == x.shape
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    (out.output.sum() + out.aux_loss + out.z_loss).backward()
    assert all(p.grad is not None for p in m.parameters())
    assert "num_experts=5" in repr(m)


def test_bad_input():
    x, rw, w13, w2 = _inputs()
    with pytest.raises(ValueError, match=r"w2 must be \(num_experts, dim, ffn_dim\) = \(5, 19, 11\)"):
        tritium.moe(x, rw, w13, w2[:, :, :4], 2)
    with pytest.raises(ValueError, match=r"w2 must be .* got shape \(4, 19, 11\)"):
        tritium.moe(x, rw, w13, w2[:4], 2)
    with pytest.raises(ValueError, match=r"w13 must be \(num_experts, 2 \* ffn_dim, dim\)"):
        tritium.moe(x, rw, w13[:, :5], w2, 2)
    with pytest.raises(ValueError, match=r"router_weight must be \(num_experts, dim\) = \(5, 19\)"):
        tritium.moe(x, rw[:3], w13, w2, 2)
    with pytest.raises(ValueError, match=r"x must be \(\*, dim\) = \(\*, 19\), got shape \(37, 18\)"):
        tritium.moe(x[:, :18], rw, w13, w2, 2)
    for k in (0, -1, E + 1, 1.5, True):
        with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, num_experts = 5\], got"):
            tritium.moe(x, rw, w13, w2, k)
    with pytest.raises(ValueError, match="score must be one of"):
        tritium.moe(x, rw, w13, w2, 2, score="relu")
    with pytest.raises(TypeError, match="w13 must be a floating-point tensor"):
        tritium.moe(x, rw, w13.long(), w2, 2)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, num_experts = 4\], got 5"):
        tritium.nn.MoE(8, 16, 4, 5)
    with pytest.raises(ValueError, match="top_k must be"):
        tritium.nn.MoE(8, 16, 4, 0)
    with pytest.raises(ValueError, match="num_experts must be a positive integer"):
        tritium.nn.MoE(8, 16, 0, 1)
    with pytest.raises(ValueError, match="impl must be"):
        tritium.nn.MoE(8, 16, 4, 1, impl="fast")


def test_mixed_dtypes_go_to_reference():
    """float32 experts with a bfloat16 router: the reference computes what torch would (F.linear raises on
    the mismatch as it does eagerly)."""
    x, rw, w13, w2 = _inputs()
    with pytest.raises(RuntimeError):
        tritium.moe(x.float(), rw.bfloat16(), w13.float(), w2.float(), 2)


def _dequantized_twin(m):
    """A float MoE holding m's quantized experts dequantized (what the quantized forward multiplies by)."""
    twin = tritium.nn.MoE(m.dim, m.ffn_dim, m.num_experts, m.top_k, m.score, m.renormalize, impl="reference",
                          aux_loss_coef=m.aux_loss_coef, z_loss_coef=m.z_loss_coef)
    with torch.no_grad():
        twin.router_weight.copy_(m.router_weight)
        twin.w13.copy_(torch.stack([q.weight.dequantize() for q in m.experts13]))
        twin.w2.copy_(torch.stack([q.weight.dequantize() for q in m.experts2]))
    return twin


@pytest.mark.parametrize("mode,group", [("int8", None), ("int8", 32), ("int4", 32)])
@pytest.mark.parametrize("k", (1, 2))
def test_quantized_experts_match_dequantized_twin(mode, group, k):
    """MoE.quantize_: the experts' weights become QuantizedLinear modules (the float stacks are released) and
    the forward, with float activations, equals the eager loop over the dequantized experts: output, both router
    losses, and the gradients of x and the router weight (the experts are frozen)."""
    torch.manual_seed(0)
    m = tritium.nn.MoE(64, 96, 6, k, aux_loss_coef=0.5, z_loss_coef=0.25)
    tritium.quantize_(m, mode, group)
    assert m.w13 is None and m.w2 is None and len(m.experts13) == 6
    assert not any(n.startswith(("w13", "w2")) for n, _ in m.named_parameters())
    assert {q.weight.bits for q in [*m.experts13, *m.experts2]} == {4 if mode == "int4" else 8}
    twin = _dequantized_twin(m)
    x = torch.randn(3, 13, 64, requires_grad=True)
    got, want = m(x), twin(x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(x)
    grads = [torch.autograd.grad((o.output * dy).sum() + o.aux_loss + o.z_loss, (x, mod.router_weight))
             for o, mod in ((got, m), (want, twin))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert "experts quantized" in repr(m)


def test_quantized_experts_bfloat16_and_idle_experts():
    """bfloat16 activations through the quantized experts stay within 2x of the eager loop's own bfloat16 error
    (both against the float64 loop over the same dequantized weights); an expert no token is routed to is never
    run; a token batch of one (a decode step) works."""
    torch.manual_seed(1)
    m = tritium.quantize_(tritium.nn.MoE(64, 96, 6, 2), "int4", 32)
    twin = _dequantized_twin(m)
    x = torch.randn(2, 9, 64)
    ref = twin.double()(x.double()).output
    eager = twin.bfloat16()(x.bfloat16()).output
    got = m.bfloat16()(x.bfloat16()).output
    assert got.dtype == torch.bfloat16
    assert (got.double() - ref).abs().max() <= 2 * (eager.double() - ref).abs().max()
    calls = []
    hooks = [q.register_forward_hook(lambda mod, i, o, e=e: calls.append(e)) for e, q in enumerate(m.experts13)]
    y = m(x[:1, :1].bfloat16()).output
    assert y.shape == (1, 1, 64) and len(calls) == 2   # top-2: two experts run, the other four are not read
    for h in hooks:
        h.remove()


def test_quantized_experts_bad_input():
    m = tritium.quantize_(tritium.nn.MoE(64, 96, 4, 2), "int8")
    with pytest.raises(ValueError, match=r"x must be \(\*, dim\) = \(\*, 64\), got shape \(3, 60\)"):
        m(torch.randn(3, 60))
    with pytest.raises(ValueError, match="experts13 and experts2 must hold one projection per expert"):
        tritium.ops.moe_ops.moe_quantized(torch.randn(3, 64), m.router_weight, m.experts13, m.experts2[:3], 2)
    with pytest.raises(ValueError, match=r"expert 1's projections must be \(2F, D\) = \(192, 64\)"):
        swapped = [m.experts13[0], m.experts2[0], *m.experts13[2:]]
        tritium.ops.moe_ops.moe_quantized(torch.randn(3, 64), m.router_weight, swapped, m.experts2, 2)


def test_quantize_model_with_moe_and_filter():
    """tritium.quantize_ on a model holding an MoE quantizes its experts (and its shared expert's linears) with
    the model's linear layers; a filter that rejects the MoE leaves its experts float."""
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(64, 64)
    model.moe = tritium.nn.MoE(64, 96, 4, 2, shared_expert=True)
    tritium.quantize_(model, "int8")
    assert isinstance(model.proj, tritium.nn.QuantizedLinear) and model.moe.experts13 is not None
    assert isinstance(model.moe.shared.down_proj, tritium.nn.QuantizedLinear)
    kept = torch.nn.Module()
    kept.moe = tritium.nn.MoE(64, 96, 4, 2)
    tritium.quantize_(kept, "int8", filter=lambda m, name: name != "moe")
    assert kept.moe.experts13 is None and kept.moe.w13 is not None
