"""The CPU products (linear_small, mm_pooled, the packed pair, SwiGLU in the epilogue) against float64 references,
and tritium.linear, the drop-in for F.linear (values, gradients, layouts, errors, patch, compile)."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401
from tritium.ops.linear import MAX_ROWS, linear_small, small_rows_ok
from tests.util import CPU_DTYPES, assert_within_torch_error, torch_and_ref


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9, 16, 37])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 7), (100, 33), (577, 576), (33, 1536)])
def test_linear_small_matches_reference(dtype, m, n, k):
    x = torch.randn(m, k, dtype=torch.float64).to(dtype)
    w = (torch.randn(n, k, dtype=torch.float64) / k ** 0.5).to(dtype)
    ref = x.double() @ w.double().t()
    assert_within_torch_error(linear_small(x, w), x @ w.t(), ref, "y")


@pytest.mark.parametrize("m,n,k", [(130, 21, 576), (45, 9, 1536), (301, 5, 100)])
def test_linear_small_rows_past_one_l2_chunk(m, n, k):
    """More rows than one pass over the weights takes (x is read in chunks that fit in L2)."""
    x = torch.randn(m, k, dtype=torch.float64).float()
    w = (torch.randn(n, k, dtype=torch.float64) / k ** 0.5).float()
    assert_within_torch_error(linear_small(x, w), x @ w.t(), x.double() @ w.double().t(), "y")


def test_linear_small_strided_x_and_empty():
    x = torch.randn(3, 64)[:, ::2]   # non-contiguous rows
    w = torch.randn(10, 32)
    torch.testing.assert_close(linear_small(x, w), x @ w.t())
    assert linear_small(torch.randn(0, 32), w).shape == (0, 10)
    torch.testing.assert_close(linear_small(torch.randn(2, 0), torch.randn(5, 0)), torch.zeros(2, 5))


def test_linear_small_bad_input():
    with pytest.raises(RuntimeError, match="must agree on K"):
        linear_small(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        linear_small(torch.randn(2, 8), torch.randn(4, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        linear_small(torch.randn(2, 8), torch.randn(8, 4).t())


def test_small_rows_routing_and_compile():
    w = torch.randn(10, 16)
    assert MAX_ROWS[torch.float32] is None and small_rows_ok(torch.randn(4096, 16), w)   # float32: any rows
    wb = w.bfloat16()
    assert small_rows_ok(torch.randn(MAX_ROWS[torch.bfloat16], 16).bfloat16(), wb)
    assert not small_rows_ok(torch.randn(MAX_ROWS[torch.bfloat16] + 1, 16).bfloat16(), wb)
    assert not small_rows_ok(torch.randn(0, 16), w)
    assert not small_rows_ok(torch.randn(1, 16), w.t().contiguous().t())
    assert not small_rows_ok(torch.randn(1, 16, dtype=torch.complex64), w)
    x = torch.randn(2, 16)
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(linear_small, fullgraph=True)(x, w), x @ w.t())


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("m", [5, 64, 130])
@pytest.mark.parametrize("layout", ["w.t()", "w", "strided"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_mm_pooled_matches_reference(dtype, m, layout, with_bias):
    """mm_pooled (the RNN projection's a @ b + bias): panel_gemm for float/double from 64 rows with b as torch
    stores a weight (w.t() in the forward, w in the input gradient), BLAS otherwise."""
    from tritium.ops.linear import mm_pooled

    k, n = 77, 70
    a = torch.randn(m, k, dtype=torch.float64).to(dtype)
    if layout == "w.t()":
        b = torch.randn(n, k, dtype=torch.float64).to(dtype).t()
    elif layout == "w":
        b = torch.randn(k, n, dtype=torch.float64).to(dtype)
    else:
        b = torch.randn(k, 2 * n, dtype=torch.float64).to(dtype)[:, ::2]
    bias = torch.randn(n, dtype=torch.float64).to(dtype) if with_bias else None
    ref = a.double() @ b.double() + (bias.double() if with_bias else 0)
    theirs = a @ b + (bias if with_bias else 0)
    assert_within_torch_error(mm_pooled(a, b, bias), theirs, ref, "mm_pooled")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m,n,k", [(511, 70, 33), (512, 70, 33), (1537, 200, 129), (1000, 1, 1), (700, 7, 65)])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_wgrad_matches_reference(dtype, m, n, k, strided, bias):
    """linear_wgrad (the weight and bias gradients dy^T x, dy's column sums): panel_gemm_tn for float/double from
    512 rows (reduction split between the threads, 192-row blocks of dy^T, a partial last chunk and panel), BLAS
    and a sum below that and for other dtypes; rows of stride > width read in place."""
    from tritium.ops.linear import linear_wgrad

    dy64, x64 = torch.randn(m, n, dtype=torch.float64), torch.randn(m, k, dtype=torch.float64)
    dy, x = dy64.to(dtype), x64.to(dtype)
    if strided:
        dy = torch.cat([dy, dy], 1)[:, :n]
        x = torch.cat([x, x], 1)[:, k:]
    dw, db = linear_wgrad(dy, x, bias)
    assert_within_torch_error(dw, dy.t() @ x, dy.double().t() @ x.double(), "dw")
    if bias:
        assert_within_torch_error(db, dy.sum(0), dy.double().sum(0), "db")
    else:
        assert db.shape == (0,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["a.t()", "b.t()", "rows"])
@pytest.mark.parametrize("m", [37, 203])
def test_mm_acc_adds_the_product(dtype, layout, m):
    """mm_acc_ (the chunked cross-entropy's weight gradient, info_nce's key gradient): c += a @ b, for 16-bit a, b
    into a float32 c (the product rounded to the input dtype as torch's matmul rounds it, then added in float32);
    float/double on the panels from 64 rows (a transposed a through panel_gemm_tn_rows, its threads splitting c's
    rows: 203 leaves a partial register tile), else c.addmm_; either operand may be a transpose; called twice it
    adds twice."""
    from tritium.ops.linear import mm_acc_

    k, n = 300, 29
    a64, b64 = torch.randn(m, k, dtype=torch.float64), torch.randn(k, n, dtype=torch.float64)
    a, b = a64.to(dtype), b64.to(dtype)
    if layout == "a.t()":
        a = a.t().contiguous().t()
    elif layout == "b.t()":
        b = b.t().contiguous().t()
    cdt = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    c0 = torch.randn(m, n, dtype=torch.float64)
    c = c0.to(cdt, copy=True)
    mm_acc_(c, a, b)
    mm_acc_(c, a, b)
    ref = c0 + 2 * (a.double() @ b.double())
    theirs = c0.to(cdt) + 2 * (a @ b).to(cdt)
    assert_within_torch_error(c, theirs, ref, "mm_acc_")


def test_mm_acc_fake_and_errors():
    from tritium.ops.linear import mm_acc_

    a, b = torch.randn(5, 7, dtype=torch.bfloat16), torch.randn(7, 3, dtype=torch.bfloat16)
    torch.library.opcheck(mm_acc_, (torch.zeros(5, 3), a, b))
    with pytest.raises(RuntimeError, match="c must be float32 for 16-bit"):
        mm_acc_(torch.zeros(5, 3, dtype=torch.bfloat16), a, b)
    with pytest.raises(RuntimeError, match="c must be a contiguous \\(5, 3\\)"):
        mm_acc_(torch.zeros(3, 5).t(), a, b)
    with pytest.raises(RuntimeError, match="a must be \\(M, K\\) and b \\(K, N\\)"):
        mm_acc_(torch.zeros(5, 3), a, b[:6])
    with pytest.raises(RuntimeError, match="b must have a's dtype"):
        mm_acc_(torch.zeros(5, 3), a, b.float())


def test_linear_wgrad_fake_and_errors():
    from tritium.ops.linear import linear_wgrad

    dy, x = torch.randn(600, 9), torch.randn(600, 13)
    torch.library.opcheck(linear_wgrad, (dy, x, True))
    torch.library.opcheck(linear_wgrad, (dy[:5], x[:5], False))
    dw, db = linear_wgrad(torch.randn(600, 0), x, True)
    assert dw.shape == (0, 13) and db.shape == (0,)
    dw, db = linear_wgrad(dy, torch.randn(600, 0), True)
    assert dw.shape == (9, 0)
    torch.testing.assert_close(db, dy.sum(0))
    with pytest.raises(RuntimeError, match="dy must be \\(M, N\\) and x \\(M, K\\)"):
        linear_wgrad(dy, x[:-1], True)
    with pytest.raises(RuntimeError, match="x must have dy's dtype"):
        linear_wgrad(dy, x.double(), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("k", [4096, 5000])
@pytest.mark.parametrize("transposed", [False, True])
def test_linear_packed_long_reduction(dtype, k, transposed):
    """Reductions past 4096 run in 2048-long blocks of the panels (the last one partial), the blocks after the
    first adding into the output, the bias added once; pack_linear also packs w.t() of a contiguous (K, N) matrix
    in place (the cross-entropy's input gradient g @ W)."""
    from tritium.ops.linear import linear_packed, pack_linear

    m, n = 70, 100
    x = torch.randn(m, k, dtype=torch.float64)
    v = torch.randn(k, n, dtype=torch.float64)
    b = torch.randn(n, dtype=torch.float64)
    w = v.t() if transposed else v.t().contiguous()  # (N, K) either way
    ref = x @ v + b
    theirs = x.to(dtype) @ v.to(dtype) + b.to(dtype)
    wd = v.to(dtype).t() if transposed else w.to(dtype)
    assert_within_torch_error(linear_packed(x.to(dtype), pack_linear(wd), n, b.to(dtype)), theirs, ref,
                              "linear_packed")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_packed_ops_fake_kernels_match(dtype):
    """pack_linear / linear_packed: fake (meta) kernels agree with the CPU kernels (the panel width is the
    build's vector width, asked of the kernel)."""
    from tritium.ops.linear import linear_packed, pack_linear

    w, x, b = torch.randn(70, 33, dtype=dtype), torch.randn(5, 33, dtype=dtype), torch.randn(70, dtype=dtype)
    torch.library.opcheck(pack_linear, (w,))
    torch.library.opcheck(linear_packed, (x, pack_linear(w), 70, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("m", [1, 7, 130])
@pytest.mark.parametrize("k", [1, 33])
def test_linear_packed_swiglu_matches_reference(dtype, m, k):
    """linear_packed_swiglu (SwiGLU in the product's epilogue, on pack_linear_glu's interleaved panels) against
    tritium.swiglu of the product in float64, within torch's own error of the unfused float computation."""
    from tritium.ops.linear import _panel_width, linear_packed_swiglu, pack_linear_glu

    f = 3 * (_panel_width(dtype) // 2)  # three panels: the interleaving must keep every gate with its up row
    w = torch.randn(2 * f, k, dtype=torch.float64)
    x = torch.randn(m, k, dtype=torch.float64)
    ref = tritium.swiglu(x @ w.t())
    theirs = tritium.swiglu(x.to(dtype) @ w.to(dtype).t())
    ours = linear_packed_swiglu(x.to(dtype), pack_linear_glu(w.to(dtype)), 2 * f)
    assert ours.shape == (m, f)
    assert_within_torch_error(ours, theirs, ref, "linear_packed_swiglu")


def test_linear_packed_swiglu_fakes_and_errors():
    from tritium.ops.linear import _panel_width, glu_pack_ok, linear_packed_swiglu, pack_linear_glu

    h = _panel_width(torch.float32) // 2
    w, x = torch.randn(4 * h, 9), torch.randn(5, 9)
    torch.library.opcheck(pack_linear_glu, (w,))
    torch.library.opcheck(linear_packed_swiglu, (x, pack_linear_glu(w), 4 * h))
    assert glu_pack_ok(w) and not glu_pack_ok(torch.randn(2 * h + 2, 9))
    with pytest.raises(RuntimeError, match="must be a multiple of"):
        pack_linear_glu(torch.randn(2 * h + 2, 9))
    with pytest.raises(RuntimeError, match="n must be even"):
        linear_packed_swiglu(x, pack_linear_glu(w), 4 * h - 1)
    with pytest.raises(RuntimeError, match="packed weight must be"):
        linear_packed_swiglu(torch.randn(5, 8), pack_linear_glu(w), 4 * h)


# ---- tritium.linear: the drop-in for F.linear ----
LINEAR_CASES = [
    # input shape, weight shape, bias
    ((130, 33), (70, 33), True),          # 2-D, from 64 rows: the panel path
    ((4, 50, 33), (70, 33), False),       # 3-D, no bias
    ((2, 3, 40, 17), (129, 17), True),    # 4-D, N past two panels
    ((10, 33), (20, 33), True),           # below 64 rows: F.linear
    ((33,), (20, 33), True),              # 1-D input
    ((0, 33), (20, 33), True),            # no rows
    ((130, 0), (20, 0), True),            # K = 0
    ((130, 33), (0, 33), False),          # N = 0
    ((2, 300, 17), (200, 17), True),      # from 512 rows: the weight gradient on panel_gemm_tn
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=[str(i) for i in range(len(LINEAR_CASES))])
def test_linear_matches_torch(case, dtype):
    """Values and every gradient (input, weight, bias) within 2x torch's own error against float64."""
    xs, ws, has_bias = case
    args = [torch.randn(xs, dtype=torch.float64), torch.randn(ws, dtype=torch.float64)]
    if has_bias:
        args.append(torch.randn(ws[0], dtype=torch.float64))
    dy = torch.randn(*xs[:-1], ws[0], dtype=torch.float64)
    (t_out, t_gs), (r_out, r_gs) = torch_and_ref(F.linear, args, dy, dtype)
    ins = [a.to(dtype).requires_grad_(True) for a in args]
    out = tritium.linear(*ins)
    gs = torch.autograd.grad(out, ins, dy.to(dtype))
    assert_within_torch_error(out.detach(), t_out, r_out, "output")
    for i, (g, tg, rg) in enumerate(zip(gs, t_gs, r_gs)):
        assert_within_torch_error(g, tg, rg, f"grad {i}")


def test_linear_layouts_and_errors_match_torch():
    x, w, b = torch.randn(100, 40), torch.randn(30, 40), torch.randn(30)
    # a transposed weight, a non-contiguous input: the same values as torch
    wt = torch.randn(40, 30).t()
    torch.testing.assert_close(tritium.linear(x, wt, b), F.linear(x, wt, b))
    xt = torch.randn(40, 100).t()
    torch.testing.assert_close(tritium.linear(xt, w, b), F.linear(xt, w, b), rtol=1e-5, atol=1e-5)
    # bad input raises what torch raises
    for args in ((x, torch.randn(30, 41), b), (x, w, torch.randn(31)), (torch.tensor(1.0), w, b),
                 (x.double(), w, b)):
        with pytest.raises(Exception) as theirs:
            F.linear(*args)
        with pytest.raises(type(theirs.value)):
            tritium.linear(*args)


def test_linear_module_patch_and_compile():
    """tritium.nn.Linear is a torch.nn.Linear (state_dict, repr); patch swaps it in; fullgraph compile works."""
    model = torch.nn.Sequential(torch.nn.Linear(24, 48), torch.nn.ReLU(), torch.nn.Linear(48, 8))
    x = torch.randn(3, 40, 24)
    ref = model(x)
    names = tritium.patch(model)
    assert ("0", torch.nn.Linear) in names and isinstance(model[0], tritium.nn.Linear)
    assert isinstance(model[0], torch.nn.Linear)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(lambda t: tritium.linear(t, model[0].weight, model[0].bias), fullgraph=True)
    x2 = torch.randn(130, 24, requires_grad=True)
    y = compiled(x2)
    torch.testing.assert_close(y, F.linear(x2, model[0].weight, model[0].bias), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    torch.testing.assert_close(x2.grad, model[0].weight.sum(0).expand(130, -1), rtol=1e-5, atol=1e-5)


# ---- tritium.linear's rule (linear_plan, the "linear" route): which products run on the panels ----
@pytest.fixture
def routes_on():
    tritium.set_routes(True)
    yield
    tritium.set_routes(False)


# rows x in x out -> (forward, input gradient, weight gradient) on the panels, with the routes on (float32)
PLANS = [
    ((64, 64, 64), (False, False, False)),          # small: F.linear
    ((256, 128, 4), (False, False, False)),
    ((2048, 512, 512), (False, False, False)),      # below PLAN_ROWS rows
    ((4096, 64, 128), (False, False, False)),       # below ROUTE_BELOW["linear"] multiply-adds
    ((4096, 32, 1024), (False, False, False)),      # short reductions, 32 columns: a partial panel
    ((4096, 256, 128), (True, True, False)),        # a small weight: its gradient on torch's
    ((4096, 128, 130), (False, True, False)),       # 130 columns: a partial last panel; 130 -> 128 fills them
    ((4096, 1024, 1024), (True, True, True)),
    ((8192, 576, 1536), (True, True, True)),
]
# where the AVX2 build's 16-float panels plan otherwise: 32 columns fill two of them
NARROW_PLANS = {(4096, 32, 1024): (False, True, False)}


@pytest.mark.parametrize("shape,plan", PLANS, ids=[str(s) for s, _ in PLANS])
def test_linear_plan_picks_the_intended_path(routes_on, shape, plan):
    from tritium.ops.linear import _panel_width, linear_plan

    if _panel_width(torch.float32) == 16:
        plan = NARROW_PLANS.get(shape, plan)
    assert linear_plan(*shape) == plan
    tritium.set_routes(False)   # routes off: every product from 64 rows on the panels (what the tests exercise)
    assert linear_plan(*shape) == (True, True, True)
    assert linear_plan(63, *shape[1:]) == (False, False, False)


def _tritium_op_counts(fn) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key: e.count for e in prof.key_averages() if e.key.startswith("tritium::")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(4096, 256, 128), (4096, 128, 130), (4096, 512, 512), (2048, 64, 64)],
                         ids=str)
def test_linear_routed_products_match_float64(routes_on, dtype, shape):
    """With the routes on each product runs where linear_plan says (tritium::mm_pooled for the forward and the
    input gradient, tritium::linear_wgrad for the weight's, none of them: F.linear), and the values and every
    gradient are within 2x torch's own error against float64 whichever path each took."""
    from tritium.ops.linear import linear_plan

    m, k, n = shape
    plan = linear_plan(m, k, n, dtype)
    args = [torch.randn(2, m // 2, k, dtype=torch.float64), torch.randn(n, k, dtype=torch.float64) / k ** 0.5,
            torch.randn(n, dtype=torch.float64)]
    dy = torch.randn(2, m // 2, n, dtype=torch.float64)
    (t_out, t_gs), (r_out, r_gs) = torch_and_ref(F.linear, args, dy, dtype)
    ins = [a.to(dtype).requires_grad_(True) for a in args]
    got = {}

    def run():
        out = tritium.linear(*ins)
        got["out"], got["gs"] = out.detach(), torch.autograd.grad(out, ins, dy.to(dtype))

    counts = _tritium_op_counts(run)
    assert counts.get("tritium::mm_pooled", 0) == plan[0] + plan[1]
    assert counts.get("tritium::linear_wgrad", 0) == plan[2]
    assert_within_torch_error(got["out"], t_out, r_out, "output")
    for i, (g, tg, rg) in enumerate(zip(got["gs"], t_gs, r_gs)):
        assert_within_torch_error(g, tg, rg, f"grad {i}")


def test_linear_plan_in_info(routes_on):
    from tritium.utils import cpu_paths

    assert cpu_paths()["linear"].startswith("F.linear below 4096 rows or 67108864 rows x in x out")
    tritium.set_routes(False)
    assert cpu_paths()["linear"] == "panel GEMM for every product from 64 rows (routes off: TRITIUM_ROUTES=off)"


def test_linear_plan_avx2_build_follows_the_rule():
    """The AVX2 build (TRITIUM_CPU_DISABLE=avx512 loads it on any x86 CPU) has its own 16-float panels (a 6 x 2
    register tile) and the same per-product rule with the routes on; every product on the panels with them off."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, tritium\nfrom tritium.ops.linear import _panel_width, linear_plan\nimport torch\n"
            "tritium.set_routes(True)\non = [linear_plan(8192, 1024, 1024), linear_plan(2048, 512, 512), "
            "linear_plan(4096, 32, 1024)]\ntritium.set_routes(False)\n"
            "print(json.dumps([_panel_width(torch.float32), on, linear_plan(8192, 1024, 1024)]))")
    env = dict(os.environ, TRITIUM_CPU_DISABLE="avx512")
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True,
                         timeout=300).stdout
    width, on, off = json.loads(out.strip().splitlines()[-1])
    if width >= 64:
        pytest.skip("no AVX2 build here: TRITIUM_CPU_DISABLE=avx512 still loaded a 64-float panel width")
    assert width == 16
    assert on == [[True, True, True], [False, False, False], [False, True, False]] and off == [True, True, True]
