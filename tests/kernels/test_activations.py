"""Activation, gated-unit, DyT, PReLU and BatchNorm-inference + activation kernels, Triton (interpreter) and C++,
against torch in float64."""
import pytest
import torch
import torch.nn.functional as F

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import activations
from tritium.ops.activations import ACT_NAMES, GATES, SELU_ALPHA, SELU_SCALE
from tests.util import (KERNEL_DTYPES, assert_within_torch_error, check_gpu_compile, impl_cases, on_device,
                        torch_and_ref)

triton_act = on_device(activations)
cpp = torch.ops.tritium
CASES, CASE_IDS = impl_cases(triton_act)
ROWS = 3
# More rows than the interpreter's 8 programs (kernels/_utils.py num_programs): the DyT, Swish-beta and PReLU
# backward programs then each loop over several rows and sum their parameter gradients, as on a GPU.
MANY_ROWS = 19
WIDTHS = (1, 7, 123, 781, 4097)

# (table name, kernel params (a, b, c), torch twin): every row of the table, with its parameter variants.
# celu's alpha is a power of two: torch's celu backward rounds 1/alpha to float32 even in float64.
ACT_CASES = [
    ("relu", (0, 0, 0), F.relu),
    ("leaky_relu", (0.01, 0, 0), F.leaky_relu),
    ("leaky_relu", (-0.3, 0, 0), lambda x: F.leaky_relu(x, -0.3)),
    ("elu", (1.3, 1.0, 1.0), lambda x: F.elu(x, 1.3)),
    ("elu", (SELU_ALPHA * SELU_SCALE, SELU_SCALE, 1.0), F.selu),
    ("elu", (0.5, 1.0, 2.0), lambda x: F.celu(x, 0.5)),
    ("sigmoid", (0, 0, 0), torch.sigmoid),
    ("tanh", (0, 0, 0), torch.tanh),
    ("softplus", (1.0, 20.0, 0), F.softplus),
    ("softplus", (2.0, 3.0, 0), lambda x: F.softplus(x, 2.0, 3.0)),
    ("gelu", (0, 0, 0), F.gelu),
    ("gelu_tanh", (0, 0, 0), lambda x: F.gelu(x, approximate="tanh")),
    ("silu", (0, 0, 0), F.silu),
    ("mish", (0, 0, 0), F.mish),
    ("logsigmoid", (0, 0, 0), F.logsigmoid),
    ("hardswish", (0, 0, 0), F.hardswish),
    ("swish", (1.7, 0, 0), lambda x: x * torch.sigmoid(1.7 * x)),
]
ACT_IDS = [f"{n}{i}" for i, (n, _, _) in enumerate(ACT_CASES)]
GATE_FNS = {"glu": torch.sigmoid, "swiglu": F.silu, "geglu": F.gelu,
            "geglu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def test_table_covers_every_kernel():
    """The Python table, the Triton ACT ids and the C++ registrations name the same activations."""
    assert set(ACT_NAMES) == set(triton_act.ACT_IDS) == {n for n, _, _ in ACT_CASES}
    assert set(GATES) == set(triton_act.GATE_IDS) == set(GATE_FNS)
    for name in ACT_NAMES:
        for suffix in ("_fwd", "_fwd_", "_bwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tritium::{name}{suffix}", "CPU")



def _x(shape, dtype, scale=3.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("act,params,twin", ACT_CASES, ids=ACT_IDS)
def test_activation(impl_name, impl, dtype, act, params, twin):
    for n in WIDTHS:
        x, dy = _x((ROWS, n), dtype), _x((ROWS, n), dtype, 1.0)
        y = getattr(impl, f"{act}_fwd")(x, *params)
        dx = getattr(impl, f"{act}_bwd")(dy, x, *params)
        (ty, (tg,)), (ry, (rg,)) = torch_and_ref(twin, [x], dy, dtype)
        assert_within_torch_error(y, ty, ry, f"{act} y n={n}")
        assert_within_torch_error(dx, tg, rg, f"{act} dx n={n}")
        # in place: the input itself is overwritten with the forward's result
        xi = x.clone()
        assert getattr(impl, f"{act}_fwd_")(xi, *params) is None
        torch.testing.assert_close(xi, y, rtol=0, atol=0)


# Special points: 0 (the ReLU family's gradient), the softplus threshold, saturation of sigmoid/tanh/softplus,
# GELU tails, hardswish's kinks, and NaN / inf.
SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-4, 1.0, -1.0, -3.0, 3.0, 5.0, 10.0, -10.0, 19.99, 20.0, 20.01,
           30.0, -30.0, 88.0, -88.0, 89.0, -89.0, 100.0, -100.0, 1e4, -1e4, float("nan"), float("inf"), -float("inf"),
           0.5, -0.5, 2.0]
# 64 values: torch's vectorised loop body handles all of them (its scalar tail loop gives dy instead of NaN
# for a NaN input in elu's and hardswish's gradients; the vectorised body, which sees all but < 1 vector of any
# real tensor, gives NaN, as we do)
assert len(SPECIAL) * 2 == 64


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_act), ("cpp", cpp)])
@pytest.mark.parametrize("act,params,twin", ACT_CASES, ids=ACT_IDS)
def test_special_points(impl_name, impl, act, params, twin):
    for dtype in (torch.float32, torch.float64) if impl_name == "cpp" else (torch.float32,):
        x = torch.tensor(SPECIAL * 2, dtype=dtype).view(1, -1)
        dy = torch.ones_like(x)
        xr = x.clone().requires_grad_(True)
        ty = twin(xr)
        (tg,) = torch.autograd.grad(ty, xr, dy)
        y = getattr(impl, f"{act}_fwd")(x, *params)
        dx = getattr(impl, f"{act}_bwd")(dy, x, *params)
        if act in ("gelu", "geglu") and dtype == torch.float32:
            # torch's float32 CPU gelu runs oneDNN, which gives NaN at +inf; its float64 path (the same
            # formula as ours) gives +inf. We follow the formula in every dtype.
            keep = x != float("inf")
            ty, y = ty.detach()[keep], y[keep]
        fin = ty.detach().isfinite()
        assert torch.equal(y.isnan(), ty.detach().isnan()), f"{act} NaN positions differ: {y} vs {ty}"
        assert torch.equal(y[~fin].nan_to_num(), ty.detach()[~fin].nan_to_num()), f"{act}: inf values differ"
        torch.testing.assert_close(y[fin], ty.detach()[fin], rtol=2e-6, atol=1e-6)
        gfin = tg.isfinite()
        assert torch.equal(dx.isnan(), tg.isnan()), f"{act} grad NaN positions differ:\n{dx}\n{tg}"
        torch.testing.assert_close(dx[gfin], tg[gfin], rtol=2e-5, atol=1e-6)
        if act in ("relu", "leaky_relu", "elu", "hardswish"):  # the gradient at exactly 0 is torch's choice
            at0 = x == 0
            assert torch.equal(dx[at0], tg[at0])


def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's values at each |v| (float64), subnormal spacing at the bottom."""
    fi = torch.finfo(dtype)
    return torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(fi.tiny)))) * fi.eps


def _gelu64(x):
    phi = 0.5 * (1 + torch.erf(x / 2 ** 0.5))
    return x * phi, phi + x * torch.exp(-x * x / 2) / (2 * torch.pi) ** 0.5


def _sigmoid64(x):
    s = torch.sigmoid(x)
    return s, s * (1 - s)


def _silu64(x):
    s = torch.sigmoid(x)
    return x * s, s + x * s * (1 - s)


# activation -> (its gated unit, float64 (f, f'), the range |x| <= r of the polynomial forms)
POLY16 = {"gelu": ("geglu", _gelu64, 3.0), "sigmoid": ("glu", _sigmoid64, 4.0), "silu": ("swiglu", _silu64, 4.0)}


def test_bfloat16_subnormal_outputs():
    """bfloat16 keeps float32's subnormals and torch's rounding does not flush them; the CPU's one-instruction
    conversion (vcvtne2ps2bf16, used where it has AVX512-BF16) does, so the kernels fall back for those vectors.
    Whole vectors of subnormal results (64 elements: the two-vector loop runs) must come out as torch's, for the
    activations and for a norm whose tiny weight makes its outputs subnormal."""
    tiny = torch.linspace(-2e-38, 2e-38, 64, dtype=torch.float32).to(torch.bfloat16).view(1, -1)
    assert (tiny.float().abs() < torch.finfo(torch.float32).tiny).float().mean() > 0.5
    for name, f in (("relu", F.relu), ("leaky_relu", F.leaky_relu), ("elu", F.elu), ("silu", F.silu)):
        params = {"elu": (1.0, 1.0, 1.0), "leaky_relu": (0.01, 0, 0)}.get(name, (0, 0, 0))
        out = getattr(cpp, f"{name}_fwd")(tiny, *params)
        assert torch.equal(out, f(tiny)), f"{name}: subnormal results differ from torch's"
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    w = torch.full((256,), 1e-38, dtype=torch.bfloat16)
    y = cpp.layer_norm_fwd(x, w, None, 1e-5)[0]
    ref = F.layer_norm(x.double(), (256,), w.double(), None, 1e-5)
    assert (y != 0).sum() > 900 and ((y.double() - ref).abs() <= 2.0 ** -133).all(), "layer_norm: flushed outputs"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", list(POLY16))
def test_16bit_polynomial_forms(dtype, act):
    """The 16-bit GELU, sigmoid and SiLU (C++) take polynomial forms for vectors whose lanes all lie in range: every
    value of the dtype in [-r - 1/2, r + 1/2] in ascending order (so most vectors lie wholly inside, a few straddle
    +-r and take the full forms), forward, gradient and the gated unit, within one ulp of the float64 value (plus
    the polynomials' own float32 error) and equal to its rounding in >= 99% of the points."""
    gated, f64, r = POLY16[act]
    grid = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).double()
    x64 = grid[grid.isfinite() & (grid.abs() <= r + 0.5)].sort().values
    x = x64.to(dtype).view(1, -1)
    dy = torch.linspace(-2, 2, x.numel(), dtype=torch.float64).to(dtype).view(1, -1)
    up = dy.double().flatten()
    f, d = f64(x64)
    dgate, dup = getattr(cpp, f"{gated}_bwd")(dy, x, dy, 0)
    # (output, float64 value, the factor multiplying f or f')
    cases = {"y": (getattr(cpp, f"{act}_fwd")(x, 0, 0, 0), f, 1.0),
             "dx": (getattr(cpp, f"{act}_bwd")(dy, x, 0, 0, 0), up * d, up.abs()),
             f"{gated} y": (getattr(cpp, f"{gated}_fwd")(x, dy, 0), f * up, up.abs()),
             f"{gated} dgate": (dgate, up * up * d, up * up), f"{gated} dup": (dup, up * f, up.abs())}
    for what, (out, ref, scale) in cases.items():
        out = out.double().flatten()
        # one ulp, plus the float32 polynomials' own error (1e-6 on f, 4e-6 on f': where f' crosses zero, GELU's
        # near x = -0.75, that is more than a 16-bit ulp of the tiny result)
        err = (out - ref).abs() - 1e-5 * scale
        assert (err <= _ulp(ref, dtype)).all(), f"{what}: worst error {(err / _ulp(ref, dtype)).max():.2f} ulp"
        exact = (out == ref.to(dtype).double()).double().mean().item()
        assert exact >= 0.99, f"{what}: only {exact:.4f} of the points round as float64 does"


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("gate", list(GATES))
def test_gated(impl_name, impl, dtype, gate):
    fwd, bwd = getattr(impl, f"{gate}_fwd"), getattr(impl, f"{gate}_bwd")
    f = GATE_FNS[gate]
    for h in (1, 7, 781):
        g, u, dy = _x((ROWS, h), dtype), _x((ROWS, h), dtype), _x((ROWS, h), dtype, 1.0)
        (ty, tg), (ry, rg) = torch_and_ref(lambda a, b: f(a) * b, [g, u], dy, dtype)
        # separate gate and up
        y = fwd(g, u, 0)
        dg, du = bwd(dy, g, u, 0)
        assert_within_torch_error(y, ty, ry, f"{gate} y")
        assert_within_torch_error(dg, tg[0], rg[0], f"{gate} dgate")
        assert_within_torch_error(du, tg[1], rg[1], f"{gate} dup")
        # fused layouts: one (rows, 2h) tensor, one (rows, 2h) gradient
        for layout, x in ((1, torch.cat([g, u], 1)), (2, torch.cat([u, g], 1))):
            y = fwd(x, None, layout)
            dx, empty = bwd(dy, x, None, layout)
            assert dx.shape == x.shape and empty.numel() == 0
            first, second = dx[:, :h], dx[:, h:]
            dg, du = (first, second) if layout == 1 else (second, first)
            assert_within_torch_error(y, ty, ry, f"{gate} fused y")
            assert_within_torch_error(dg, tg[0], rg[0], f"{gate} fused dgate")
            assert_within_torch_error(du, tg[1], rg[1], f"{gate} fused dup")


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=CASE_IDS)
def test_dyt(impl_name, impl, dtype):
    check_dyt(impl, dtype, ROWS + 2, (1, 7, 781, 4097))


def check_dyt(impl, dtype, rows, widths):
    for n in widths:
        x, dy = _x((rows, n), dtype), _x((rows, n), dtype, 1.0)
        alpha = torch.tensor([0.7], dtype=torch.float64).to(dtype)
        w, b = _x((n,), dtype, 1.0), _x((n,), dtype, 1.0)
        y = impl.dyt_fwd(x, alpha, w, b)
        dx, da, dw, db = impl.dyt_bwd(dy, x, alpha, w, True, True, True)
        fn = lambda x_, a_, w_, b_: w_ * torch.tanh(a_ * x_) + b_  # noqa: E731
        (ty, tg), (ry, rg) = torch_and_ref(fn, [x, alpha, w, b], dy, dtype)
        assert_within_torch_error(y, ty, ry, "y")
        for got, t, r, what in zip((dx, da, dw, db), tg, rg, ("dx", "dalpha", "dw", "db")):
            assert_within_torch_error(got, t, r, f"{what} n={n}")
        _, da0, dw0, db0 = impl.dyt_bwd(dy, x, alpha, w, False, False, False)
        assert da0.numel() == dw0.numel() == db0.numel() == 0


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=CASE_IDS)
def test_swish_learnable_beta(impl_name, impl, dtype):
    """swish with a one-element beta tensor: y, dx and dbeta (a reduction over every element)."""
    check_swish_beta(impl, dtype, ROWS + 2, (1, 7, 781, 4097))


def check_swish_beta(impl, dtype, rows, widths):
    for n in widths:
        x, dy = _x((rows, n), dtype), _x((rows, n), dtype, 1.0)
        beta = torch.tensor([1.3], dtype=torch.float64).to(dtype)
        y = impl.swish_beta_fwd(x, beta)
        dx, db = impl.swish_beta_bwd(dy, x, beta, True)
        (ty, tg), (ry, rg) = torch_and_ref(lambda x_, b_: x_ * torch.sigmoid(b_ * x_), [x, beta], dy, dtype)
        assert_within_torch_error(y, ty, ry, "y")
        assert_within_torch_error(dx, tg[0], rg[0], f"dx n={n}")
        assert_within_torch_error(db, tg[1], rg[1], f"dbeta n={n}")
        assert impl.swish_beta_bwd(dy, x, beta, False)[1].numel() == 0


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("per_row", [True, False])
def test_prelu(impl_name, impl, dtype, per_row):
    check_prelu(impl, dtype, per_row, 4, (1, 7, 781))


def check_prelu(impl, dtype, per_row, rows, widths):
    """per_row: rows are (batch, channel) pairs of a (2, C, n) input; else `rows` rows of C channels."""
    C = 5
    for n in widths:
        m = 2 * C if per_row else rows
        cols = n if per_row else C
        x, dy = _x((m, cols), dtype), _x((m, cols), dtype, 1.0)
        w = _x((C,), dtype, 0.5)
        y = impl.prelu_fwd(x, w, per_row)
        dx, dw = impl.prelu_bwd(dy, x, w, per_row, True)
        if per_row:  # rows are (batch, channel) pairs of a (2, C, n) input
            fn = lambda x_, w_: F.prelu(x_.view(2, C, n), w_).view(m, n)  # noqa: E731
        else:
            fn = F.prelu
        (ty, tg), (ry, rg) = torch_and_ref(fn, [x, w], dy, dtype)
        assert_within_torch_error(y, ty, ry, "y")
        assert_within_torch_error(dx, tg[0], rg[0], "dx")
        assert_within_torch_error(dw, tg[1], rg[1], "dw")


BN_ACTS = [None, "relu", "silu", "gelu", "sigmoid", "hardswish"]


@pytest.mark.parametrize("act", BN_ACTS, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("per_row", [True, False], ids=["per_row", "per_column"])
@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=CASE_IDS)
def test_batch_norm_act(impl_name, impl, dtype, per_row, residual, act):
    """y = f(x scale[c] + shift[c] (+ r)) and its gradients (x, r, scale, shift) against torch in float64."""
    C = 3
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    twin = reference.BN_ACTIVATIONS[act]
    act_id = -1 if act is None else ACT_NAMES.index(act)
    for n in (1, 7, 781):
        m = 2 * C if per_row else 4
        cols = n if per_row else C
        x, dy, r = _x((m, cols), dtype), _x((m, cols), dtype, 1.0), _x((m, cols), dtype)
        # scale / shift exactly representable in dtype: torch's twin below runs on them in dtype
        scale, shift = _x((C,), dtype, 0.5).to(acc), _x((C,), dtype, 0.5).to(acc)
        res = r if residual else None
        y = impl.batch_norm_act_fwd(x, scale, shift, res, per_row, act_id, 0.0, 0.0, 0.0)
        dx, dr, ds, dt = impl.batch_norm_act_bwd(dy, x, scale, shift, res, per_row, act_id, 0.0, 0.0, 0.0, True)

        def fn(x_, s_, t_, r_=None):
            if per_row:  # rows are (batch, channel) pairs of a (2, C, n) input
                z = x_.view(2, C, n) * s_[:, None] + t_[:, None]
                z = z.view(m, n)
            else:
                z = x_ * s_ + t_
            return twin(z + r_ if residual else z)

        args = [x, scale.to(dtype), shift.to(dtype)] + ([r] if residual else [])
        (ty, tg), (ry, rg) = torch_and_ref(fn, args, dy, dtype)
        assert_within_torch_error(y, ty, ry, "y")
        assert_within_torch_error(dx, tg[0], rg[0], "dx")
        assert_within_torch_error(ds.to(dtype), tg[1], rg[1], "dscale")
        assert_within_torch_error(dt.to(dtype), tg[2], rg[2], "dshift")
        if residual:
            assert_within_torch_error(dr, tg[3], rg[3], "dresidual")
        else:
            assert dr.numel() == 0


def check_many_rows(impl, dtype):
    """DyT, Swish-beta and per-column PReLU parameter gradients summed over MANY_ROWS rows, at widths of one and
    two column blocks."""
    check_dyt(impl, dtype, MANY_ROWS, (7, 1500))
    check_swish_beta(impl, dtype, MANY_ROWS, (7, 1500))
    check_prelu(impl, dtype, False, MANY_ROWS, (1,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_triton_rows_past_programs(dtype):
    check_many_rows(triton_act, dtype)


@pytest.mark.parametrize("impl_name,impl", [("triton", triton_act), ("cpp", cpp)])
def test_strided_rows(impl_name, impl):
    """Rows with a stride larger than the row (a slice of a wider tensor) are read in place."""
    base, dbase = torch.randn(5, 300), torch.randn(5, 300)
    x, dy = base[:, :257], dbase[:, 3:260]
    torch.testing.assert_close(impl.gelu_fwd(x, 0, 0, 0), F.gelu(x))
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.silu(xr), xr, dy)
    torch.testing.assert_close(impl.silu_bwd(dy, x, 0, 0, 0), g)
    xi = base.clone()
    impl.relu_fwd_(xi[:, :257], 0, 0, 0)  # in place on a strided view: only the view changes
    torch.testing.assert_close(xi[:, :257], F.relu(x))
    torch.testing.assert_close(xi[:, 257:], base[:, 257:])
    torch.testing.assert_close(impl.swiglu_fwd(x, dy, 0), F.silu(x) * dy)
    w, b = torch.randn(257), torch.randn(257)
    torch.testing.assert_close(impl.dyt_fwd(x, torch.tensor([0.5]), w, b), w * torch.tanh(0.5 * x) + b)


@pytest.mark.gpu_compile
@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: str(d)[6:])  # three shards of ~150 compiles
def test_gpu_compile(dtype):
    """Every kernel configuration the launchers make (each ACT, gate, flag and dtype) compiles for sm_80/90."""
    n = 1500

    def run():
        x = torch.randn(2, n).to(dtype)
        for name, params, _ in ACT_CASES:
            getattr(triton_act, f"{name}_fwd")(x, *params)
            getattr(triton_act, f"{name}_fwd_")(x.clone(), *params)
            getattr(triton_act, f"{name}_bwd")(x, x, *params)
        for gate in GATES:
            getattr(triton_act, f"{gate}_fwd")(x, None, 1)
            getattr(triton_act, f"{gate}_bwd")(x[:, : n // 2], x, None, 1)
        w = torch.randn(n).to(dtype)
        a = torch.tensor([0.5]).to(dtype)
        triton_act.dyt_fwd(x, a, w, w)
        triton_act.swish_beta_fwd(x, a)
        triton_act.swish_beta_bwd(x, x, a, True)
        for need in (True, False):
            triton_act.dyt_bwd(x, x, a, w, True, need, need)
        for per_row in (True, False):
            triton_act.prelu_fwd(x, w[:2] if per_row else w, per_row)
            for need in (True, False):
                triton_act.prelu_bwd(x, x, w[:2] if per_row else w, per_row, need)
            st = torch.randn(2 if per_row else n)
            for act in (-1, ACT_NAMES.index("relu"), ACT_NAMES.index("gelu")):
                for res in (None, x):
                    triton_act.batch_norm_act_fwd(x, st, st, res, per_row, act, 0.0, 0.0, 0.0)
                    for need in (True, False):
                        triton_act.batch_norm_act_bwd(x, x, st, st, res, per_row, act, 0.0, 0.0, 0.0, need)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {
        "_act_fwd_kernel", "_act_bwd_kernel", "_gated_fwd_kernel", "_gated_bwd_kernel", "_dyt_fwd_kernel",
        "_dyt_bwd_kernel", "_prelu_fwd_kernel", "_prelu_bwd_kernel", "_swish_beta_fwd_kernel",
        "_swish_beta_bwd_kernel", "_bn_act_fwd_kernel", "_bn_act_bwd_kernel"}
    acts = {c.constexprs["ACT"] for c in report if c.name == "_act_fwd_kernel"}
    assert acts == set(triton_act.ACT_IDS.values())
