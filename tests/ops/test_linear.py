"""linear_small (the decode step's skinny x @ w.T) against a float64 reference, at odd sizes and every dtype."""
import pytest
import torch

import tritium  # noqa: F401
from tritium.ops.linear import MAX_ROWS, linear_small, small_rows_ok
from tests.util import CPU_DTYPES, assert_within_torch_error


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
