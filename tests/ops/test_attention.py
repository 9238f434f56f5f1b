"""tritium.scaled_dot_product_attention as a drop-in for torch's, and tritium.flash_attention's extras:
values and gradients, fallbacks, errors, gradcheck, torch.compile(fullgraph=True)."""
import re

import pytest
import torch
import torch.nn.functional as F

import tritium
from tests.util import assert_within_torch_error
from tritium import reference


def _compare(fn_ours, fn_torch, inputs, dtype, grad=True):
    """ours vs torch in dtype vs torch in float64: values and every gradient within 2x torch's error. The inputs
    and the output gradient (random, so a wrong sum over keys or heads cannot cancel) are rounded to dtype first:
    the float64 reference sees the values the dtype runs see, and torch's error is its own, not the rounding's."""
    res = {}
    inputs = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    dy = None
    for name, fn, d in (("ours", fn_ours, dtype), ("torch", fn_torch, dtype), ("ref", fn_torch, torch.float64)):
        ins = [t.to(d).requires_grad_(grad and t.is_floating_point()) for t in inputs]
        out = fn(*ins)
        if dy is None:
            dy = torch.randn(out.shape, dtype=torch.float64).to(dtype)
        gs = torch.autograd.grad(out, [t for t in ins if t.requires_grad], dy.to(d)) if grad else ()
        res[name] = (out.detach(),) + tuple(gs)
    for i, (o, t, r) in enumerate(zip(res["ours"], res["torch"], res["ref"])):
        assert_within_torch_error(o, t, r, f"output {i}")


SDPA_CASES = [
    # q shape, k shape, v shape, kwargs
    ((2, 4, 17, 32), (2, 4, 17, 32), (2, 4, 17, 32), {}),
    ((2, 4, 17, 32), (2, 4, 40, 32), (2, 4, 40, 32), dict(is_causal=True)),         # top-left, L < S
    ((1, 2, 40, 64), (1, 2, 17, 64), (1, 2, 17, 64), dict(is_causal=True)),         # L > S
    ((1, 8, 33, 64), (1, 2, 33, 64), (1, 2, 33, 64), dict(enable_gqa=True, is_causal=True)),
    ((1, 8, 33, 32), (1, 1, 50, 32), (1, 1, 50, 32), dict(enable_gqa=True)),         # MQA
    ((3, 17, 80), (3, 29, 80), (3, 29, 48), dict(scale=0.3)),                       # 3-D, Ev != E
    ((1, 2, 5, 128), (1, 2, 7, 128), (1, 2, 7, 128), dict(scale=2.0)),
    # odd head dims, keys past one 512-key block with an odd remainder (the 16-bit pair panels' tails)
    ((1, 3, 70, 33), (1, 3, 601, 33), (1, 3, 601, 17), {}),
    ((1, 2, 603, 64), (1, 2, 603, 64), (1, 2, 603, 64), dict(is_causal=True)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", SDPA_CASES, ids=[str(i) for i in range(len(SDPA_CASES))])
def test_sdpa_matches_torch(case, dtype):
    qs, ks, vs, kw = case
    inputs = [torch.randn(s, dtype=torch.float64) for s in (qs, ks, vs)]
    _compare(lambda q, k, v: tritium.scaled_dot_product_attention(q, k, v, **kw),
             lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kw), inputs, dtype)


@pytest.mark.parametrize("kind", ["bool_ls", "bool_b1ls", "float_bhls", "float_1s", "bool_dead_rows"])
def test_sdpa_masks(kind):
    B, H, L, S, D = 2, 3, 19, 23, 32
    inputs = [torch.randn(B, H, L, D, dtype=torch.float64), torch.randn(B, H, S, D, dtype=torch.float64),
              torch.randn(B, H, S, D, dtype=torch.float64)]
    if kind == "bool_ls":
        mask = torch.rand(L, S) > 0.3
    elif kind == "bool_b1ls":
        mask = torch.rand(B, 1, L, S) > 0.5
    elif kind == "float_bhls":
        mask = torch.randn(B, H, L, S, dtype=torch.float64)
    elif kind == "float_1s":
        mask = torch.randn(1, S, dtype=torch.float64)
    else:  # whole rows masked: torch gives 0 for them (values and gradients)
        mask = torch.rand(L, S) > 0.5
        mask[::3] = False
    dy = torch.randn(B, H, L, D, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        # inputs, mask and output gradient rounded to dtype: the float64 reference sees the same values
        m = mask if mask.dtype == torch.bool else mask.to(dtype)
        m64 = mask if mask.dtype == torch.bool else m.double()
        res = {}
        for name, fn, d, mm in (("ours", tritium.scaled_dot_product_attention, dtype, m),
                                ("torch", F.scaled_dot_product_attention, dtype, m),
                                ("ref", F.scaled_dot_product_attention, torch.float64, m64)):
            ins = [t.to(dtype).to(d).requires_grad_() for t in inputs]
            out = fn(*ins, attn_mask=mm)
            res[name] = (out.detach(),) + torch.autograd.grad(out, ins, dy.to(dtype).to(d))
        for i, (o, t, r) in enumerate(zip(res["ours"], res["torch"], res["ref"])):
            assert_within_torch_error(o, t, r, f"{kind} {dtype} output {i}")
        if kind == "bool_dead_rows":
            assert torch.equal(res["ours"][0][:, :, ::3], torch.zeros_like(res["ours"][0][:, :, ::3]))


def test_sdpa_non_contiguous_views():
    """(batch, seq, heads, dim) projections transposed to (batch, heads, seq, dim), and a strided last dim."""
    q, k, v = (torch.randn(2, 21, 4, 32) for _ in range(3))
    args = [t.transpose(1, 2) for t in (q, k, v)]
    torch.testing.assert_close(tritium.scaled_dot_product_attention(*args, is_causal=True),
                               F.scaled_dot_product_attention(*args, is_causal=True))
    wide = torch.randn(2, 4, 21, 64)[..., ::2]  # last-dim stride 2: copied once, explicitly
    torch.testing.assert_close(tritium.scaled_dot_product_attention(wide, wide, wide),
                               F.scaled_dot_product_attention(wide, wide, wide))


def test_sdpa_float64_and_gradcheck():
    q = torch.randn(1, 2, 6, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.randn(6, 9, dtype=torch.float64)
    f = lambda q, k, v: tritium.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa
    torch.testing.assert_close(f(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True))
    assert torch.autograd.gradcheck(f, (q, k, v))
    g = lambda q, k, v: tritium.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa
    assert torch.autograd.gradcheck(g, (q, k, v))


def test_sdpa_fallbacks_are_torch():
    """dropout, a mask that needs a gradient, broadcast batch dims and 5-D inputs go to torch itself."""
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    torch.manual_seed(1)
    a = tritium.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(1)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b)
    m = torch.randn(7, 7, requires_grad=True)
    tritium.scaled_dot_product_attention(q, k, v, attn_mask=m).sum().backward()
    assert m.grad is not None
    q5 = torch.randn(2, 1, 2, 7, 16)
    torch.testing.assert_close(tritium.scaled_dot_product_attention(q5, q5, q5),
                               F.scaled_dot_product_attention(q5, q5, q5))
    kb = torch.randn(1, 2, 7, 16)
    torch.testing.assert_close(tritium.scaled_dot_product_attention(q, kb, kb),
                               F.scaled_dot_product_attention(q, kb, kb))


def test_sdpa_empty():
    q = torch.randn(2, 3, 0, 16)
    k = torch.randn(2, 3, 5, 16)
    assert tritium.scaled_dot_product_attention(q, k, k).shape == (2, 3, 0, 16)


@pytest.mark.parametrize("bad", ["head_dim", "causal_and_mask", "gqa_without_flag", "mask_dtype", "mask_shape",
                                 "dtype_mix"])
def test_sdpa_errors_match_torch(bad):
    q, k, v = (torch.randn(1, 4, 5, 16) for _ in range(3))
    kw = {}
    if bad == "head_dim":
        k = torch.randn(1, 4, 5, 8)
    elif bad == "causal_and_mask":
        kw = dict(is_causal=True, attn_mask=torch.ones(5, 5, dtype=torch.bool))
    elif bad == "gqa_without_flag":
        k = v = torch.randn(1, 2, 5, 16)
    elif bad == "mask_dtype":
        kw = dict(attn_mask=torch.ones(5, 5, dtype=torch.int64))
    elif bad == "mask_shape":
        kw = dict(attn_mask=torch.ones(3, 5, dtype=torch.bool))
    else:
        v = v.double()
    try:
        expected = F.scaled_dot_product_attention(q, k, v, **kw)
    except Exception as theirs:  # noqa: BLE001 - whatever torch raises, we raise the same type
        with pytest.raises(type(theirs)):
            tritium.scaled_dot_product_attention(q, k, v, **kw)
    else:
        # torch's CPU kernel choice decides whether some combinations (is_causal with a mask) raise; where
        # torch answers, the drop-in must give torch's answer
        torch.testing.assert_close(tritium.scaled_dot_product_attention(q, k, v, **kw), expected)


# ---- flash_attention ----
FLASH_CASES = [
    dict(causal=True),                                   # bottom-right when L < S
    dict(window=(8, 0)),
    dict(window=(5, 5)),
    dict(softcap=2.0, causal=True),
    dict(causal=True, window=(6, -1), scale=0.2),
]


@pytest.mark.parametrize("kw", FLASH_CASES, ids=[str(i) for i in range(len(FLASH_CASES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_flash_attention_matches_reference(kw, dtype):
    """Against torch's composition (reference.flash_attention, the spec) in the dtype and in float64."""
    inputs = [torch.randn(2, 4, 13, 32, dtype=torch.float64), torch.randn(2, 2, 29, 32, dtype=torch.float64),
              torch.randn(2, 2, 29, 32, dtype=torch.float64)]
    _compare(lambda q, k, v: tritium.flash_attention(q, k, v, **kw),
             lambda q, k, v: reference.flash_attention(q, k, v, **kw), inputs, dtype)


def test_flash_attention_reference_is_sdpa_with_a_mask():
    """The spec itself: bottom-right causal + window equal torch SDPA given the same boolean mask."""
    q, k, v = torch.randn(1, 2, 7, 16, dtype=torch.float64), *(torch.randn(1, 2, 12, 16, dtype=torch.float64)
                                                              for _ in range(2))
    i = torch.arange(7)[:, None] + 5
    j = torch.arange(12)[None, :]
    mask = (j <= i) & (j >= i - 3)
    torch.testing.assert_close(reference.flash_attention(q, k, v, causal=True, window=(3, -1)),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_flash_attention_lse_and_gradcheck():
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 8, dtype=torch.float64, requires_grad=True)
    out, lse = tritium.flash_attention(q, k, v, causal=True, softcap=3.0, window=(4, 0), return_lse=True)
    ro, rl = reference.flash_attention(q, k, v, causal=True, softcap=3.0, window=(4, 0), return_lse=True)
    torch.testing.assert_close(out, ro)
    torch.testing.assert_close(lse, rl)
    assert lse.dtype == torch.float64 and lse.shape == (1, 2, 5)

    def f(q, k, v):
        o, l_ = tritium.flash_attention(q, k, v, causal=True, softcap=3.0, window=(4, 0), return_lse=True)
        return o, l_

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_flash_attention_dead_rows():
    """Query rows that see no key (causal with L > S, bottom-right): output 0, lse -inf, zero gradients."""
    q = torch.randn(1, 1, 6, 16, requires_grad=True)
    k, v = torch.randn(1, 1, 3, 16), torch.randn(1, 1, 3, 16)
    out, lse = tritium.flash_attention(q, k, v, causal=True, return_lse=True)
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 16)) and torch.isinf(lse[0, 0, :3]).all()
    out.sum().backward()
    assert torch.equal(q.grad[0, 0, :3], torch.zeros(3, 16))


@pytest.mark.parametrize("bad,exc", [("3d", ValueError), ("heads", ValueError), ("dtype", TypeError),
                                     ("softcap", ValueError), ("window", ValueError)])
def test_flash_attention_errors(bad, exc):
    q, k, v = (torch.randn(1, 4, 5, 16) for _ in range(3))
    kw = {}
    if bad == "3d":
        q = q[0]
    elif bad == "heads":
        k = v = torch.randn(1, 3, 5, 16)
    elif bad == "dtype":
        v = v.half()
    elif bad == "softcap":
        kw = dict(softcap=-1.0)
    else:
        kw = dict(window=(1.5, 2))
    with pytest.raises(exc):
        tritium.flash_attention(q, k, v, **kw)


def test_compile_fullgraph():
    def f(q, k, v, mask):
        a = tritium.flash_attention(q, k, v, causal=True, window=(4, 0), softcap=5.0)
        b = tritium.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return a + b

    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    mask = torch.rand(9, 9) > 0.2
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v, mask)
    torch.testing.assert_close(out, f(q, k, v, mask))
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(f(q, k, v, mask).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,backward", [("float32", False), ("float32", True), ("bfloat16", True)])
def test_peak_extra_memory_is_linear_in_seq(dtype, backward):
    """Issue bar: peak extra memory O(seq), measured — doubling seq at most doubles it, and it stays far below the
    (heads, seq, seq) score matrix an O(seq^2) implementation holds (fresh processes, see tritium.bench.memory)."""
    from tritium.bench.memory import peak_extra_bytes

    m2048 = peak_extra_bytes(2048, dtype, "tritium", backward)
    m4096 = peak_extra_bytes(4096, dtype, "tritium", backward)
    scores = 8 * 4096 * 4096 * 4
    assert 0 < m4096 <= 2 * m2048, f"{m2048 / 2**20:.1f} MiB at 2048 -> {m4096 / 2**20:.1f} MiB at 4096"
    assert m4096 < scores / 4


def test_flash_attention_head_dim_one_transposed():
    """Head dim 1 from a transposed (batch, heads, 1, seq) tensor: its last stride is seq, yet torch calls it
    contiguous (a size-1 dim's stride does not count), so .contiguous() would not give the kernels a unit stride."""
    q, k, v = (torch.randn(1, 2, 1, n, dtype=torch.float64).transpose(-1, -2).requires_grad_() for n in (5, 7, 7))
    assert q.is_contiguous() and q.stride(-1) == 5
    out = tritium.flash_attention(q, k, v, causal=True)
    ref = reference.flash_attention(q, k, v, causal=True)
    torch.testing.assert_close(out, ref)
    dy = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, (q, k, v), dy), torch.autograd.grad(ref, (q, k, v), dy))


def test_flash_attention_window_none_is_no_window():
    """window=None (the default) is no window, as paged_attention_decode's window=None; also in the reference."""
    q, k, v = torch.randn(1, 2, 6, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    for causal in (False, True):
        none = tritium.flash_attention(q, k, v, causal=causal, window=None)
        assert torch.equal(none, tritium.flash_attention(q, k, v, causal=causal, window=(-1, -1)))
        assert torch.equal(none, tritium.flash_attention(q, k, v, causal=causal))
        torch.testing.assert_close(reference.flash_attention(q, k, v, causal=causal, window=None), none)


@pytest.mark.parametrize("window", [3, (1,), (1, 2, 3), (1.5, 2), (True, 0), "ab", {1: 2}], ids=repr)
def test_flash_attention_window_error_names_the_argument(window):
    q = k = v = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match=r"flash_attention: window must be None \(no window\) or a \(left, right\)"
                                         r" pair of ints .*, got " + re.escape(repr(window))):
        tritium.flash_attention(q, k, v, window=window)


def _paged_case():
    bs, hkv, d, n = 4, 2, 16, 7
    k_pool, v_pool = torch.randn(3, bs, hkv, d), torch.randn(3, bs, hkv, d)
    tables = torch.tensor([[2, 0]], dtype=torch.int32)
    return torch.randn(1, 4, d), k_pool, v_pool, tables, torch.tensor([n], dtype=torch.int32)


def test_paged_window_none_and_int():
    from tritium.inference import paged_attention_decode

    q, k_pool, v_pool, tables, sl = _paged_case()
    for window in (None, 3, 7, 100):
        torch.testing.assert_close(paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.25, window=window),
                                   reference.paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.25, None,
                                                                    window))
    # window at least the sequence length is no window
    torch.testing.assert_close(paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.25, window=7),
                               paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.25, window=None))


@pytest.mark.parametrize("window", [0, -1, 2.5, (3, 0), True, "3"], ids=repr)
def test_paged_window_error_names_the_argument(window):
    from tritium.inference import paged_attention_decode

    q, k_pool, v_pool, tables, sl = _paged_case()
    with pytest.raises(ValueError, match=r"paged_attention_decode: window must be None \(no window\) or an int >= 1"
                                         r".*, got " + re.escape(repr(window))):
        paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.25, window=window)
