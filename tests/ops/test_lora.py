"""The public lora_linear and tritium.nn.LoRALinear: values and gradients (dx, dA, dB) against the float64 reference
at odd sizes, rank 1, every dtype and 3-D inputs; the dropout with a fixed mask; gradcheck, torch.compile
(fullgraph=True), non-contiguous inputs; bad inputs; what goes to the reference; merge / unmerge; opcheck."""
import pytest
import torch

import tritium
from tritium import reference
from tests.util import assert_within_torch_error, torch_and_ref

IN, OUT = 45, 37
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _layer(r, dtype=torch.float32, bias=True, in_f=IN, out_f=OUT):
    """weight, bias, lora_A, lora_B in float64 rounded through dtype (B not zero: the adapter does something)."""
    w = torch.randn(out_f, in_f, dtype=torch.float64) / in_f ** 0.5
    b = torch.randn(out_f, dtype=torch.float64) if bias else None
    a = torch.randn(r, in_f, dtype=torch.float64) / in_f ** 0.5
    bb = torch.randn(out_f, r, dtype=torch.float64)
    return [None if t is None else t.to(dtype) for t in (w, b, a, bb)]


# ---- values and gradients ----
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("r", (1, 8, 19))
@pytest.mark.parametrize("shape", ((1,), (70,), (3, 29)), ids=("1row", "70rows", "3x29"))
@pytest.mark.parametrize("bias", (True, False), ids=("bias", "nobias"))
def test_values_and_grads(dtype, r, shape, bias):
    w, b, a, bb = _layer(r, dtype, bias)
    x = torch.randn(*shape, IN, dtype=torch.float64).to(dtype)
    dy = torch.randn(*shape, OUT, dtype=torch.float64)
    s = 32 / r

    def fn(x_, a_, b_, tri=False):
        f = tritium.lora_linear if tri else reference.lora_linear
        return f(x_, w.to(x_.dtype), None if b is None else b.to(x_.dtype), a_, b_, s)

    xl, al, bl = (t.clone().requires_grad_() for t in (x, a, bb))
    y = fn(xl, al, bl, tri=True)
    grads = torch.autograd.grad(y, (xl, al, bl), dy.to(dtype))
    (ty, tg), (ry, rg) = torch_and_ref(fn, [x, a, bb], dy, dtype)
    assert_within_torch_error(y, ty, ry, "y")
    for name, o, t, ref in zip(("dx", "dA", "dB"), grads, tg, rg):
        assert_within_torch_error(o, t, ref, name)


def test_long_reductions():
    """float32 on the panels with reductions past 4096 (in 4099 for y, out 4101 for dx): the base product runs in
    blocks of the reduction and the rank-r term joins the first block's register tiles."""
    w, b, a, bb = _layer(5, torch.float32, True, 4099, 4101)
    x, dy = torch.randn(70, 4099), torch.randn(70, 4101)

    def fn(x_, a_, b_, tri=False):
        f = tritium.lora_linear if tri else reference.lora_linear
        return f(x_, w.to(x_.dtype), b.to(x_.dtype), a_, b_, 2.0)

    xl, al, bl = (t.clone().requires_grad_() for t in (x, a, bb))
    y = fn(xl, al, bl, tri=True)
    grads = torch.autograd.grad(y, (xl, al, bl), dy)
    (ty, tg), (ry, rg) = torch_and_ref(fn, [x, a, bb], dy, torch.float32)
    assert_within_torch_error(y, ty, ry, "y")
    for name, o, t, ref in zip(("dx", "dA", "dB"), grads, tg, rg):
        assert_within_torch_error(o, t, ref, name)


def test_dropout_fixed_mask():
    """With p > 0 while training: the mask is reference.lora_dropout_mask's draw from torch's generator (the same
    seed gives the reference's result and gradients), x * mask / (1 - p) feeds the adapter only (the base term sees
    all of x), and about p of the adapter's inputs are dropped; in eval mode no dropout."""
    p, s = 0.3, 1.5
    w, b, a, bb = _layer(6)
    x = torch.randn(2, 50, IN)
    dy = torch.randn(2, 50, OUT)
    xl, al, bl = (t.clone().requires_grad_() for t in (x, a, bb))
    torch.manual_seed(7)
    y = tritium.lora_linear(xl, w, b, al, bl, s, p, training=True)
    got = torch.autograd.grad(y, (xl, al, bl), dy)
    torch.manual_seed(7)
    mask = reference.lora_dropout_mask(x, p)
    assert 0.25 < 1 - mask.mean().item() < 0.35 and set(mask.unique().tolist()) == {0.0, 1.0}
    # the formula written out with that mask, in float64
    xd, ad, bd = (t.double().clone().requires_grad_() for t in (x, a, bb))
    want = xd @ w.double().t() + b.double() + s * ((xd * mask.double() / (1 - p)) @ ad.t()) @ bd.t()
    ref = torch.autograd.grad(want, (xd, ad, bd), dy.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-4, atol=1e-4)   # float32 sums of 50 to 100 terms
    for g, e in zip(got, ref):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)
    torch.manual_seed(7)
    torch.testing.assert_close(y, reference.lora_linear(x, w, b, a, bb, s, p, training=True))
    # eval: no dropout, no draw
    state = torch.get_rng_state()
    torch.testing.assert_close(tritium.lora_linear(x, w, b, a, bb, s, p, training=False),
                               reference.lora_linear(x, w, b, a, bb, s))
    assert torch.equal(state, torch.get_rng_state())


# ---- gradcheck, compile, layouts ----
@pytest.mark.parametrize("r", (1, 3))
def test_gradcheck(r):
    w, b, a, bb = _layer(r, torch.float64, in_f=6, out_f=5)
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    a.requires_grad_()
    bb.requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, bb: tritium.lora_linear(x, w, b, a, bb, 0.7), (x, a, bb))
    # with a dropout mask: the same draw every call (seeded)

    def dropped(x, a, bb):
        torch.manual_seed(3)
        return tritium.lora_linear(x, w, None, a, bb, 0.7, 0.4)

    assert torch.autograd.gradcheck(dropped, (x, a, bb))


def test_compile_fullgraph():
    """Forward and backward of a LoRALinear (with dropout in eval and without) in one graph, equal to eager."""
    layer = tritium.nn.LoRALinear(IN, OUT, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 11, IN, requires_grad=True)

    def f(x):
        return layer(x).square().sum()

    loss = torch.compile(f, fullgraph=True)(x)
    got = torch.autograd.grad(loss, (x, layer.lora_A, layer.lora_B))
    eloss = f(x)
    want = torch.autograd.grad(eloss, (x, layer.lora_A, layer.lora_B))
    torch.testing.assert_close(loss, eloss)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
    layer.lora_dropout = 0.1
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


@pytest.mark.parametrize("rows,out_f,r", [(64, 37, 16), (65, 38, 17), (129, 1, 64), (3, 33, 65), (130, 200, 5)],
                         ids=("1tile", "tile+1", "2tiles+1-r64", "r65", "odd"))
def test_bf16_adapter_grads(rows, out_f, r):
    """The bfloat16 backward's adapter products (gs = s dy B, dB = dy^T xs, dA = gs^T x; csrc/lora.cpp's one pass
    over dy in 64-row tiles on AVX512-BF16 up to r = 64, ATen's GEMMs past it or without the instruction) against
    float64 at row counts around the tiles, odd row and column counts, and dy with a row stride past its width.
    The scale is a power of two (alpha / r = 32 / 16): gs is then rounded to bfloat16 once in every path (torch's
    own (dy @ B) * s too), so dA's error is its product's and not a double rounding's luck."""
    w, _, a, bb = _layer(r, torch.bfloat16, False, IN, out_f)
    x = torch.randn(rows, IN).to(torch.bfloat16)
    dy = torch.randn(rows, out_f + 7).to(torch.bfloat16)[:, 3:3 + out_f]
    s = 2.0
    _, xs = torch.ops.tritium.lora_linear_fwd(x, w, None, a, bb, None, s)
    _, dA, dB = torch.ops.tritium.lora_linear_bwd(dy, x, w, a, bb, None, xs, s, True)
    d = [t.double() for t in (dy, bb, xs, x)]
    gs = s * d[0] @ d[1]
    gs_t = (dy @ bb) * s
    assert_within_torch_error(dB, (dy.t() @ xs), d[0].t() @ d[2], "dB")
    assert_within_torch_error(dA, gs_t.t() @ x, gs.t() @ d[3], "dA")


def test_non_contiguous():
    """x as a slice of a wider tensor and transposed, a transposed weight and adapters, an expanded output
    gradient: values and gradients equal the reference's."""
    w, b, a, bb = _layer(5)
    for x in (torch.randn(9, 2 * IN)[:, 1:1 + IN], torch.randn(IN, 9).t()):
        wt, at, bt = w.t().contiguous().t(), a.t().contiguous().t(), bb.t().contiguous().t()
        leaves = [t.clone().requires_grad_() for t in (x, at, bt)]
        refs = [t.clone().requires_grad_() for t in (x, a, bb)]
        out = tritium.lora_linear(leaves[0], wt, b, leaves[1], leaves[2], 2.0)
        want = reference.lora_linear(refs[0], w, b, refs[1], refs[2], 2.0)
        torch.testing.assert_close(out, want)
        for g, e in zip(torch.autograd.grad(out.sum(), leaves), torch.autograd.grad(want.sum(), refs)):
            torch.testing.assert_close(g, e)


# ---- what goes to the reference ----
def test_reference_backend(reference_backend, monkeypatch):
    """TRITIUM_BACKEND=reference: no kernel runs, the results are the reference's (bit for bit)."""
    import tritium.ops.lora as mod

    def no_kernel(*args):
        raise AssertionError("a kernel ran under the reference backend")

    monkeypatch.setattr(mod, "lora_linear_fwd", no_kernel)
    w, b, a, bb = _layer(3)
    x = torch.randn(5, IN)
    assert torch.equal(tritium.lora_linear(x, w, b, a, bb, 2.0), reference.lora_linear(x, w, b, a, bb, 2.0))


def test_uncovered_go_to_reference(monkeypatch):
    """Float32 adapters on a bfloat16 base (PEFT's default for 16-bit models), a trainable base weight or bias (their
    gradients computed), an empty x: the reference."""
    import tritium.ops.lora as mod

    def no_kernel(*args):
        raise AssertionError("a kernel ran")

    monkeypatch.setattr(mod, "lora_linear_fwd", no_kernel)
    w, b, a, bb = _layer(3)
    x = torch.randn(5, IN)
    torch.testing.assert_close(tritium.lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a, bb, 2.0),
                               reference.lora_linear(x.bfloat16(), w.bfloat16(), b.bfloat16(), a, bb, 2.0))
    wg = w.clone().requires_grad_()
    out = tritium.lora_linear(x, wg, b, a, bb, 2.0)
    (dw,) = torch.autograd.grad(out.sum(), (wg,))
    torch.testing.assert_close(dw, torch.ones(5, OUT).t() @ x)
    bg = b.clone().requires_grad_()
    (db,) = torch.autograd.grad(tritium.lora_linear(x, w, bg, a, bb, 2.0).sum(), (bg,))
    torch.testing.assert_close(db, torch.full((OUT,), 5.0))
    assert tritium.lora_linear(torch.randn(0, IN), w, b, a, bb, 2.0).shape == (0, OUT)
    with torch.no_grad():   # no gradient wanted: a weight that requires grad is frozen for this call
        monkeypatch.undo()
        torch.testing.assert_close(tritium.lora_linear(x, wg, b, a, bb, 2.0),
                                   reference.lora_linear(x, w, b, a, bb, 2.0))


# ---- bad inputs ----
def _bad_cases():
    w, b, a, bb = _layer(3)
    x = torch.randn(4, IN)
    f = tritium.lora_linear
    qw = tritium.ops.quant.QuantizedWeight.quantize(torch.randn(OUT, 64), "int8")
    return [
        ("int8 weight", lambda: f(x, w.to(torch.int8), b, a, bb, 1.0), TypeError,
         r"lora_linear: weight must be a floating-point tensor or a quantized weight, got a torch.int8 tensor"),
        ("QuantizedWeight x width", lambda: f(x, qw, b, a, bb, 1.0), ValueError,
         r"quantized_linear: x must be \(\*, in_features\) = \(\*, 64\), got shape \(4, 45\)"),
        ("x not a tensor", lambda: f([1.0], w, b, a, bb, 1.0), TypeError, "x must be a Tensor"),
        ("x integer", lambda: f(x.long(), w, b, a, bb, 1.0), TypeError, "x must be a floating-point tensor"),
        ("x width", lambda: f(torch.randn(4, IN + 1), w, b, a, bb, 1.0), ValueError,
         r"x must be \(\*, in_features\) = \(\*, 45\), got shape \(4, 46\)"),
        ("weight 1-D", lambda: f(x, w[0], b, a, bb, 1.0), ValueError, r"weight must be \(out_features, in_features\)"),
        ("lora_A width", lambda: f(x, w, b, a[:, 1:], bb, 1.0), ValueError,
         r"lora_A must be \(r, in_features\) = \(r >= 1, 45\), got shape \(3, 44\)"),
        ("lora_A rank 0", lambda: f(x, w, b, a[:0], bb[:, :0], 1.0), ValueError, r"lora_A must be \(r, in_features\)"),
        ("lora_B shape", lambda: f(x, w, b, a, bb.t(), 1.0), ValueError,
         r"lora_B must be \(out_features, r\) = \(37, 3\), got shape \(3, 37\)"),
        ("bias shape", lambda: f(x, w, b[1:], a, bb, 1.0), ValueError, r"bias must be \(out_features,\) = \(37,\)"),
        ("scaling", lambda: f(x, w, b, a, bb, "2"), TypeError, "scaling must be a real number, got str"),
        ("dropout", lambda: f(x, w, b, a, bb, 1.0, 1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
        ("module r", lambda: tritium.nn.LoRALinear(4, 5, r=0), ValueError, "LoRALinear: r must be a positive integer"),
        ("module dropout", lambda: tritium.nn.LoRALinear(4, 5, lora_dropout=-0.1), ValueError,
         r"LoRALinear: dropout must be in \[0, 1\)"),
    ]


BAD = _bad_cases()


@pytest.mark.parametrize("i", range(len(BAD)), ids=[case[0] for case in BAD])
def test_bad_inputs(i):
    _, call, exc, match = BAD[i]
    with pytest.raises(exc, match=match):
        call()


# ---- the module ----
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=lambda d: str(d)[6:])
def test_module(dtype):
    """LoRALinear.from_linear shares the layer's frozen weight and bias, starts equal to it (B = 0), trains only the
    adapter; merge() gives the same outputs through the plain weight, unmerge() the base weight back."""
    base = torch.nn.Linear(IN, OUT).to(dtype)
    w0 = base.weight.detach().clone()
    layer = tritium.nn.LoRALinear.from_linear(base, r=4, lora_alpha=16, lora_dropout=0.0)
    assert isinstance(layer, torch.nn.Linear) and layer.weight is base.weight and layer.bias is base.bias
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert layer.scaling == 4.0 and layer.lora_A.dtype == dtype and "r=4" in repr(layer)
    x = torch.randn(7, IN, dtype=dtype)
    torch.testing.assert_close(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    y = layer(x)
    layer.merge()
    assert layer.merged and "merged" in repr(layer)
    tol = dict(rtol=5e-2, atol=1e-1) if dtype == torch.bfloat16 else {}   # the merged weight rounded to bf16
    torch.testing.assert_close(layer(x), y, **tol)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, **tol)
    torch.testing.assert_close(layer(x), y, **tol)
    rs = tritium.nn.LoRALinear(IN, OUT, r=4, lora_alpha=16, use_rslora=True)
    assert rs.scaling == 8.0
    assert set(rs.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}


# ---- the cache of packed frozen weights (csrc/linear.cpp) ----
@pytest.fixture
def pack_cache():
    """An empty cache of packed frozen weights with a 1 GiB limit, emptied again afterwards; yields its stats with
    hits and misses counted from here (the process's counters are cumulative)."""
    limit = tritium.pack_cache_stats()["limit_bytes"]
    torch.ops.tritium_runtime.set_pack_cache_limit(1 << 30)
    torch.ops.tritium_runtime.pack_cache_clear()
    base = tritium.pack_cache_stats()

    def stats():
        now = tritium.pack_cache_stats()
        return {**now, "hits": now["hits"] - base["hits"], "misses": now["misses"] - base["misses"]}
    yield stats
    torch.ops.tritium_runtime.set_pack_cache_limit(limit)
    torch.ops.tritium_runtime.pack_cache_clear()


def _step(layer, x, dy):
    """y and (dx, dA, dB) of one forward and backward of the layer."""
    xl = x.clone().requires_grad_()
    y = layer(xl)
    return [y.detach(), *torch.autograd.grad(y, (xl, layer.lora_A, layer.lora_B), dy)]


def _uncached(layer, x, dy):
    """_step with the cache off: the base weight packed afresh for both of its products."""
    limit = tritium.pack_cache_stats()["limit_bytes"]
    torch.ops.tritium_runtime.set_pack_cache_limit(0)
    try:
        return _step(layer, x, dy)
    finally:
        torch.ops.tritium_runtime.set_pack_cache_limit(limit)


def _same(got, want):
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_pack_cache_reuse_and_invalidation(pack_cache):
    """A float32 LoRALinear on the panels (70 rows) packs its frozen base weight once for the forward and once for
    dx, then reuses both; every in-place change of the weight (merge / unmerge, an in-place op under no_grad,
    load_state_dict) and a new tensor put in its place repack it: results always equal those of a run with the
    cache off, bit for bit, and differ from the stale weight's."""
    layer = tritium.nn.LoRALinear(IN, OUT, r=4, lora_alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x, dy = torch.randn(70, IN), torch.randn(70, OUT)
    first = _step(layer, x, dy)
    assert pack_cache()["misses"] == 2 and pack_cache()["entries"] == 2
    _same(_step(layer, x, dy), first)
    assert pack_cache()["hits"] == 2 and pack_cache()["misses"] == 2
    _same(first, _uncached(layer, x, dy))

    def changed(what):
        got = _step(layer, x, dy)
        _same(got, _uncached(layer, x, dy))
        assert not torch.equal(got[0], first[0]) and not torch.equal(got[1], first[1]), what
        return got

    layer.merge()
    layer.merged = False          # the merged weight through the LoRA op (as if the adapter were still separate)
    changed("merge")
    layer.merged = True
    layer.unmerge()
    _same(_step(layer, x, dy)[:1], _uncached(layer, x, dy)[:1])
    with torch.no_grad():
        layer.weight.mul_(2.0)
    changed("in-place mul_")
    sd = {k: v.clone() for k, v in layer.state_dict().items()}
    sd["weight"] = torch.randn(OUT, IN)
    layer.load_state_dict(sd)
    changed("load_state_dict")
    layer.weight = torch.nn.Parameter(torch.randn(OUT, IN), requires_grad=False)
    changed("a new weight tensor")
    assert pack_cache()["entries"] <= 2 * 5


def test_pack_cache_skips_trainable_and_respects_limit(pack_cache):
    """A base weight that requires grad (the op called directly) is never cached; a cache limit below one packing
    keeps nothing (each call packs its own)."""
    w, b, a, bb = _layer(3)
    x = torch.randn(70, IN)
    torch.ops.tritium.lora_linear_fwd(x, w.requires_grad_(), b, a, bb, None, 1.0)
    assert pack_cache()["entries"] == 0 and pack_cache()["misses"] == 0
    torch.ops.tritium_runtime.set_pack_cache_limit(64)
    y, _ = torch.ops.tritium.lora_linear_fwd(x, w.detach(), b, a, bb, None, 1.0)
    assert pack_cache()["entries"] == 0 and pack_cache()["misses"] == 1
    torch.ops.tritium_runtime.set_pack_cache_limit(0)
    torch.testing.assert_close(torch.ops.tritium.lora_linear_fwd(x, w.detach(), b, a, bb, None, 1.0)[0], y,
                               rtol=0, atol=0)


# ---- torch.library.opcheck of the two ops (the samples tests/ops/test_opcheck.py's SAMPLES needs) ----
def _g(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(True)


def _r(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


OPCHECK = {
    "lora_linear_fwd": lambda: [(_g(6, 5), _r(7, 5), _r(7), _g(2, 5), _g(7, 2), None, 1.5),
                                (_g(6, 5), _r(7, 5), None, _g(1, 5), _g(7, 1), (_r(6, 5) > 0).float(), 2.0),
                                (_g(3, 4, dtype=torch.float64), _r(2, 4, dtype=torch.float64), None,
                                 _g(3, 4, dtype=torch.float64), _g(2, 3, dtype=torch.float64), None, 0.5)],
    "lora_linear_bwd": lambda: [(_r(6, 7), _r(6, 5), _r(7, 5), _r(2, 5), _r(7, 2), None, _r(6, 2), 1.5, True),
                                (_r(6, 7), _r(6, 5), _r(7, 5), _r(2, 5), _r(7, 2), (_r(6, 5) > 0).float(), _r(6, 2),
                                 1.5, False)],
}


@pytest.mark.parametrize("name", sorted(OPCHECK))
def test_opcheck(name):
    op = getattr(torch.ops.tritium, name).default
    for args in OPCHECK[name]():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))
