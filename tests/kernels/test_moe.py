"""Mixture-of-experts expert kernels (forward, backward), Triton (interpreter) and C++, against the float64
reference (the eager loop over experts on the same grouped rows): odd sizes, experts that receive no token, every
token on one expert, top_k = E, every gradient (dx, dw13, dw2, the routing weights'), row counts on both sides of
the C++ kernel's float32 panel paths, bad offsets and shapes, and the GPU compile check."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium.kernels import moe
from tritium.ops.moe import group_by_expert
from tests.util import (assert_within_torch_error, check_gpu_compile, impl_cases, interpreter_bf16_dot, on_device,
                        torch_and_ref)

triton_moe = on_device(moe)
CASES, IDS = impl_cases(triton_moe)


@pytest.fixture(autouse=True, scope="module")
def _interpreter_bf16_dot():
    """bf16 dots in the interpreter as a GPU computes them (tests/util.py interpreter_bf16_dot)."""
    with interpreter_bf16_dot():
        yield


def _routing(kind, T, E, k, gen):
    """(T, k) distinct expert indices per token: "random"; "skip" (experts 1 and E - 1 get no token); "one"
    (every token's first choice is expert 0, k = 1 puts every token there); "all" (k = E)."""
    if kind == "skip":
        allowed = torch.tensor([e for e in range(E) if e not in (1, E - 1)])
        return allowed[torch.rand(T, len(allowed), generator=gen).argsort(-1)[:, :k]]
    if kind == "one":
        rest = 1 + torch.rand(T, E - 1, generator=gen).argsort(-1)[:, :k - 1]
        return torch.cat([torch.zeros(T, 1, dtype=torch.long), rest], 1)
    return torch.rand(T, E, generator=gen).argsort(-1)[:, :k]


def _inputs(dtype, T, D, F_, E, k, kind="random", seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen, dtype=torch.float64)
    w13 = torch.randn(E, 2 * F_, D, generator=gen, dtype=torch.float64) / D ** 0.5
    w2 = torch.randn(E, D, F_, generator=gen, dtype=torch.float64) / F_ ** 0.5
    idx = _routing(kind, T, E, k, gen)
    _, tokens, offsets = group_by_expert(idx, E)
    weights = torch.rand(T * k, generator=gen, dtype=torch.float64)
    dy = torch.randn(T, D, generator=gen, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w13, w2, weights, dy)], tokens, offsets


def experts_ref(tokens, offsets):
    """The eager loop over the grouped rows: y (T, D) from x, w13, w2, weights (the spec of moe_experts_fwd)."""
    def fn(x, w13, w2, weights):
        y = torch.zeros_like(x)
        F_ = w13.shape[1] // 2
        for e in range(w13.shape[0]):
            r0, r1 = int(offsets[e]), int(offsets[e + 1])
            tok = tokens[r0:r1]
            a = x[tok] @ w13[e].t()
            h = F.silu(a[:, :F_]) * a[:, F_:]
            y = y.index_add(0, tok, (h @ w2[e].t()) * weights[r0:r1, None])
        return y
    return fn


def check_moe(impl, dtype, T, D, F_, E, k, kind="random", seed=0):
    (x, w13, w2, weights, dy), tokens, offsets = _inputs(dtype, T, D, F_, E, k, kind, seed)
    y, a = impl.moe_experts_fwd(x, w13, w2, tokens, offsets, weights)
    dx, dw13, dw2, dweights = impl.moe_experts_bwd(dy, x, w13, w2, tokens, offsets, weights, a, True)
    fn = experts_ref(tokens, offsets)
    (ty, tg), (ry, rg) = torch_and_ref(fn, [x, w13, w2, weights], dy, dtype)
    assert_within_torch_error(y, ty, ry, "y")
    xt = x[tokens]
    assert_within_torch_error(a, torch.cat([xt[offsets[e]:offsets[e + 1]] @ w13[e].t() for e in range(E)]),
                              torch.cat([xt[offsets[e]:offsets[e + 1]].double() @ w13[e].double().t()
                                         for e in range(E)]), "a")
    for name, o, t, r in zip(("dx", "dw13", "dw2", "dweights"), (dx, dw13, dw2, dweights), tg, rg):
        assert_within_torch_error(o, t, r, name)
    dx2, dw13b, dw2b, dwb = impl.moe_experts_bwd(dy, x, w13, w2, tokens, offsets, weights, a, False)
    assert dx2.numel() == 0
    for got, want in ((dw13b, dw13), (dw2b, dw2), (dwb, dweights)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("kind,E,k", [("random", 5, 2), ("skip", 6, 2), ("one", 4, 1), ("one", 4, 3),
                                       ("all", 3, 3)])
def test_moe(impl_name, impl, dtype, kind, E, k):
    """Odd sizes (37 tokens, dim 19, ffn 11): several row and column blocks with masked tails."""
    check_moe(impl, dtype, 37, 19, 11, E, k, kind)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=lambda d: str(d)[6:])
def test_cpp_paths(dtype):
    """The C++ kernel's float32/float64 panels (an expert with 64 rows or more), at widths past one panel (64
    floats) with tails; an ffn of whole half panels (96), whose gate/up product has SwiGLU in its epilogue; the
    panel weight gradients split between the threads by rows (512 rows or more: 600 tokens on expert 0);
    16-bit: oneDNN."""
    check_moe(torch.ops.tritium, dtype, 300, 70, 37, 3, 2, "one")
    check_moe(torch.ops.tritium, dtype, 130, 67, 66, 2, 1, "random")
    check_moe(torch.ops.tritium, dtype, 600, 70, 96, 3, 2, "one")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("kind,F_,E,k", [("random", 96, 4, 2), ("random", 37, 5, 2), ("one", 37, 4, 1)])
def test_cpp_expert_schedule(dtype, threads, kind, F_, E, k):
    """The C++ kernel's two schedules: on two threads, experts whose rows split evenly (random routing) run whole on
    one thread each (every product of an expert on that thread, the per-row outputs summed per token afterwards);
    one expert holding every row (kind "one", k = 1), or one thread, runs the experts one at a time with the threads
    inside each product. Both within twice the eager loop's error, forward and every gradient; the forward without
    a backward (moe_experts_infer) gives the same y bit for bit."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_moe(torch.ops.tritium, dtype, 301, 70, F_, E, k, kind)
        (x, w13, w2, weights, _), tokens, offsets = _inputs(dtype, 301, 70, F_, E, k, kind)
        y, _ = torch.ops.tritium.moe_experts_fwd(x, w13, w2, tokens, offsets, weights)
        y0 = torch.ops.tritium.moe_experts_infer(x, w13, w2, tokens, offsets, weights)
        torch.testing.assert_close(y0, y, rtol=0, atol=0)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_cpp_tokens_without_rows(dtype):
    """Rows for only some tokens (a direct call of the op): the others get y = 0 and dx = 0, the rest match the
    eager loop; rows of one token in two experts are summed."""
    (x, w13, w2, weights, dy), _, _ = _inputs(dtype, 9, 19, 11, 2, 1)
    tokens = torch.tensor([0, 2, 5, 2, 3, 5, 7])
    offsets = torch.tensor([0, 3, 7])
    weights = weights.new_ones(7) * 0.5
    y, a = torch.ops.tritium.moe_experts_fwd(x, w13, w2, tokens, offsets, weights)
    dx, dw13, dw2, dweights = torch.ops.tritium.moe_experts_bwd(dy, x, w13, w2, tokens, offsets, weights, a, True)
    fn = experts_ref(tokens, offsets)
    (ty, tg), (ry, rg) = torch_and_ref(fn, [x, w13, w2, weights], dy, dtype)
    assert_within_torch_error(y, ty, ry, "y")
    for name, o, t, r in zip(("dx", "dw13", "dw2", "dweights"), (dx, dw13, dw2, dweights), tg, rg):
        assert_within_torch_error(o, t, r, name)
    idle = [1, 4, 6, 8]
    assert (y[idle] == 0).all() and (dx[idle] == 0).all()


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=IDS)
@pytest.mark.parametrize("F_", (11, 96))
def test_infer(impl_name, impl, dtype, F_):
    """moe_experts_infer (no backward to come): moe_experts_fwd's y bit for bit, without a; ffn 96 on the C++ float
    panels is the SwiGLU-epilogue path (which then writes no pre-activations), 11 the path with a SwiGLU pass;
    150 tokens put 64 rows or more on each expert (the panels)."""
    (x, w13, w2, weights, _), tokens, offsets = _inputs(dtype, 150, 19, F_, 2, 1)
    y, _ = impl.moe_experts_fwd(x, w13, w2, tokens, offsets, weights)
    y0 = impl.moe_experts_infer(x, w13, w2, tokens, offsets, weights)
    torch.testing.assert_close(y0, y, rtol=0, atol=0)


@pytest.mark.parametrize("grad", (False, True))
def test_public_moe_picks_infer(grad, monkeypatch):
    """tritium.moe takes moe_experts_infer exactly when no backward can follow (no grad mode, or nothing requiring
    grad), and the same output either way."""
    import importlib

    ops_moe = importlib.import_module("tritium.ops.moe")   # the module (tritium.ops.moe is also the function)

    gen = torch.Generator().manual_seed(1)
    x, rw = torch.randn(70, 16, generator=gen), torch.randn(4, 16, generator=gen)
    w13, w2 = torch.randn(4, 64, 16, generator=gen) / 4, torch.randn(4, 16, 32, generator=gen) / 6
    want = ops_moe.moe(x, rw, w13, w2, 2).output
    calls = []
    real = ops_moe.moe_experts_infer
    monkeypatch.setattr(ops_moe, "moe_experts_infer", lambda *a: calls.append(1) or real(*a))
    with torch.set_grad_enabled(grad):
        got = ops_moe.moe(x, rw, w13.requires_grad_(grad), w2, 2).output
    assert len(calls) == (0 if grad else 1)
    torch.testing.assert_close(got.detach(), want, rtol=0, atol=0)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_moe), ("cpp", torch.ops.tritium)])
def test_one_token_one_expert(impl_name, impl):
    """A single token routed to a single expert of one, dim and ffn 1."""
    check_moe(impl, torch.float32, 1, 1, 1, 1, 1)


def test_cpp_bad_input():
    (x, w13, w2, weights, dy), tokens, offsets = _inputs(torch.float32, 9, 5, 3, 3, 2)
    ops = torch.ops.tritium
    with pytest.raises(RuntimeError, match="offsets must run from 0 to R = 18"):
        ops.moe_experts_fwd(x, w13, w2, tokens, offsets - 1, weights)
    bad = offsets.clone()
    bad[1], bad[2] = 10, 4
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        ops.moe_experts_fwd(x, w13, w2, tokens, bad, weights)
    with pytest.raises(RuntimeError, match="shapes disagree"):
        ops.moe_experts_fwd(x, w13, w2[:, :, :2], tokens, offsets, weights)
    with pytest.raises(RuntimeError, match=r"tokens must be in \[0, 9\)"):
        ops.moe_experts_fwd(x, w13, w2, tokens + 9, offsets, weights)
    with pytest.raises(RuntimeError, match="weights must be"):
        ops.moe_experts_fwd(x, w13, w2, tokens, offsets, weights[:3])
    with pytest.raises(RuntimeError, match="must have x's dtype"):
        ops.moe_experts_fwd(x, w13.double(), w2, tokens, offsets, weights)


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every launch configuration the launchers pick (each dtype: the gather/store, SwiGLU-prologue/scatter,
    SwiGLU-backward and dx products, both weight gradients) compiles for sm_80/sm_90 without spills."""
    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            (x, w13, w2, weights, dy), tokens, offsets = _inputs(dtype, 70, 96, 160, 4, 2)
            y, a = moe.moe_experts_fwd(x, w13, w2, tokens, offsets, weights)
            moe.moe_experts_bwd(dy, x, w13, w2, tokens, offsets, weights, a, True)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_grouped_mm_kernel", "_grouped_tn_kernel"}
