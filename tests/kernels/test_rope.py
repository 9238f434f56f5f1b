"""RoPE: the kernels (C++ and Triton interpreter) and the public rope / rope_tables / RotaryEmbedding, against
the float64 reference: both layouts, partial rotary dim, arbitrary positions, GQA head counts, gradients,
gradcheck, torch.compile(fullgraph=True), and the GPU compile check."""
import math

import pytest
import torch

import tritium
from tests.util import assert_within_torch_error, check_gpu_compile, on_device
from tritium import reference
from tritium.kernels import rope

triton_rope = on_device(rope)

cpp = torch.ops.tritium
IMPLS = [("cpp", cpp, (torch.float32, torch.bfloat16, torch.float16, torch.float64)),
         ("triton", triton_rope, (torch.float32, torch.bfloat16, torch.float16))]
CASES = [(n, i, d) for n, i, ds in IMPLS for d in ds]


def _tables(P, R):
    return tritium.rope_tables(P, R, base=500.0)


@pytest.mark.parametrize("impl_name,impl,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, _, d in CASES])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
@pytest.mark.parametrize("hq,hk,d,r", [(4, 1, 64, 64), (3, 3, 80, 32), (8, 2, 18, 10)])
def test_kernel(impl_name, impl, dtype, interleaved, hq, hk, d, r):
    N, P = 13, 50
    cos, sin = _tables(P, r)
    # rounded to dtype first: the float64 reference sees the values the kernel and torch see
    q = torch.randn(N, hq, d, dtype=torch.float64).to(dtype).double()
    k = torch.randn(N, hk, d, dtype=torch.float64).to(dtype).double()
    pos = torch.randint(0, P, (N,))
    qo, ko = impl.rope_fwd(q.to(dtype), k.to(dtype), cos, sin, pos, interleaved, False)
    # torch's own error in dtype: the reference composition run in the dtype (rounding inputs, float32 math)
    tq, tk = reference.rope(q.to(dtype), k.to(dtype), cos, sin, pos, interleaved)
    rq, rk = reference.rope(q, k, cos.double(), sin.double(), pos, interleaved)
    assert_within_torch_error(qo, tq, rq, "q")
    assert_within_torch_error(ko, tk, rk, "k")
    # inverse rotation undoes the forward (the backward's kernel): the round trip's error is at most 2x that of
    # torch's composition run both ways in dtype (the inverse is the rotation by -sin)
    bq, bk = impl.rope_fwd(qo, ko, cos, sin, pos, interleaved, True)
    tbq, tbk = reference.rope(tq, tk, cos, -sin, pos, interleaved)
    assert_within_torch_error(bq, tbq, q, "q round trip")
    assert_within_torch_error(bk, tbk, k, "k round trip")


@pytest.mark.parametrize("impl_name,impl", [("cpp", cpp), ("triton", triton_rope)])
def test_strided_tokens(impl_name, impl):
    """q and k sliced out of a fused qkv projection (token stride > heads * head_dim) are read in place."""
    N, H, D = 9, 4, 32
    qkv = torch.randn(N, 3 * H, D)
    q, k = qkv[:, :H], qkv[:, H:2 * H]
    cos, sin = _tables(20, D)
    pos = torch.arange(N)
    qo, ko = impl.rope_fwd(q, k, cos, sin, pos, False, False)
    rq, rk = reference.rope(q, k, cos, sin, pos)
    torch.testing.assert_close(qo, rq)
    torch.testing.assert_close(ko, rk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half", "interleaved"])
def test_rope_public_values_and_grads(dtype, interleaved):
    B, T, H, Hk, D, R = 2, 11, 4, 2, 64, 48
    cos, sin = _tables(64, R)
    q = torch.randn(B, T, H, D, dtype=torch.float64)
    k = torch.randn(B, T, Hk, D, dtype=torch.float64)
    pos = torch.stack([torch.arange(T) + 5, torch.randint(0, 64, (T,))])  # ragged/decode-style positions
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    res = {}
    for name, fn, d in (("ours", tritium.rope, dtype), ("torch", reference.rope, dtype),
                        ("ref", reference.rope, torch.float64)):
        qi, ki = q.to(d).requires_grad_(), k.to(d).requires_grad_()
        c, s = (cos, sin) if d != torch.float64 else (cos.double(), sin.double())
        oq, ok = fn(qi, ki, c, s, pos, interleaved)
        res[name] = (oq.detach(), ok.detach()) + torch.autograd.grad((oq, ok), (qi, ki), (gq.to(d), gk.to(d)))
    for i, (o, t, r) in enumerate(zip(res["ours"], res["torch"], res["ref"])):
        assert_within_torch_error(o, t, r, f"output {i}")


def test_rope_default_positions_and_3d():
    cos, sin = _tables(32, 16)
    q, k = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 1, 16)
    a = tritium.rope(q, k, cos, sin)
    b = tritium.rope(q, k, cos, sin, torch.arange(7).expand(2, 7))
    torch.testing.assert_close(a, b)
    # packed (tokens, heads, dim) with per-token positions, as a decode step of 2 sequences
    q3, k3 = q[:, -1], k[:, -1]
    pos = torch.tensor([6, 6])
    o3 = tritium.rope(q3, k3, cos, sin, pos)
    torch.testing.assert_close(o3[0], a[0][:, -1])
    torch.testing.assert_close(o3[1], a[1][:, -1])


def test_rope_gradcheck_and_compile():
    cos, sin = _tables(16, 6)
    q = torch.randn(1, 5, 2, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 5, 1, 8, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([[3, 1, 4, 1, 5]])
    assert torch.autograd.gradcheck(lambda q, k: tritium.rope(q, k, cos, sin, pos, True), (q, k))
    # only q used downstream: k's gradient arrives as None
    g, = torch.autograd.grad(tritium.rope(q, k, cos, sin, pos)[0].sum(), (q,))
    assert g.shape == q.shape

    def f(q, k):
        a, b = tritium.rope(q, k, cos, sin, pos)
        return a.sum() + b.sum()

    qf, kf = q.float().detach().requires_grad_(), k.float().detach().requires_grad_()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(qf, kf)
    torch.testing.assert_close(out, f(qf, kf))


def test_rope_errors():
    cos, sin = _tables(8, 16)
    q, k = torch.randn(1, 4, 2, 16), torch.randn(1, 4, 2, 16)
    with pytest.raises(ValueError):
        tritium.rope(q, k[:, :3], cos, sin)
    with pytest.raises(ValueError):
        tritium.rope(q[..., :8], k[..., :8], cos, sin)      # rotary dim > head dim
    with pytest.raises(TypeError):
        tritium.rope(q, k, cos, sin, torch.zeros(1, 4))      # float positions
    with pytest.raises(ValueError):
        tritium.rope(q, k, cos, sin, torch.zeros(4, dtype=torch.long))  # wrong positions shape
    with pytest.raises(RuntimeError, match="out of range"):
        tritium.rope(q, k, cos, sin, torch.full((1, 4), 8))


def test_rope_tables_scalings():
    R, P = 64, 300
    c, s = tritium.rope_tables(P, R, 10000.0)
    inv = 1.0 / 10000.0 ** (torch.arange(0, R, 2, dtype=torch.float64) / R)
    ang = torch.arange(P, dtype=torch.float64)[:, None] * inv
    torch.testing.assert_close(c, ang.cos().float())
    torch.testing.assert_close(s, ang.sin().float())
    c, _ = tritium.rope_tables(P, R, 10000.0, {"type": "linear", "factor": 4.0})
    torch.testing.assert_close(c, (ang / 4).cos().float())
    # Llama-3: high frequencies (short wavelengths) untouched, low frequencies divided by the factor
    l3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
    c, _ = tritium.rope_tables(P, R, 10000.0, l3)
    torch.testing.assert_close(c[:, 0], ang[:, 0].cos().float())
    torch.testing.assert_close(c[:, -1], (ang[:, -1] / 8).cos().float())
    # YaRN: the same two limits, and cos, sin scaled by 0.1 ln(factor) + 1
    c, s = tritium.rope_tables(P, R, 10000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})
    m = 0.1 * math.log(4.0) + 1
    torch.testing.assert_close(c[:, 0], (ang[:, 0].cos() * m).float())
    torch.testing.assert_close(c[:, -1], ((ang[:, -1] / 4).cos() * m).float())
    # NTK-aware: a larger base
    c, _ = tritium.rope_tables(P, R, 10000.0, {"type": "ntk", "factor": 2.0})
    torch.testing.assert_close(c, tritium.rope_tables(P, R, 10000.0 * 2.0 ** (R / (R - 2)))[0])
    with pytest.raises(ValueError):
        tritium.rope_tables(P, R, 10000.0, {"type": "bogus"})


def test_rotary_embedding_module():
    m = tritium.nn.RotaryEmbedding(32, max_position_embeddings=128, scaling={"type": "linear", "factor": 2.0})
    assert m.state_dict() == {}
    q, k = torch.randn(2, 9, 4, 64), torch.randn(2, 9, 2, 64)
    cos, sin = tritium.rope_tables(128, 32, scaling={"type": "linear", "factor": 2.0})
    torch.testing.assert_close(m(q, k), tritium.rope(q, k, cos, sin))
    # the tables are non-persistent buffers (out of the state_dict, following .to())
    assert dict(m.named_buffers()).keys() == {"cos", "sin"}
    assert torch.equal(m.cos, cos) and torch.equal(m.sin, sin)
    assert m.to(torch.float64).cos.dtype == torch.float64
    assert "rotary_dim=32" in repr(m)


@pytest.mark.gpu_compile
def test_gpu_compile():
    def run():
        cos, sin = _tables(32, 64)
        for dtype in (torch.float32, torch.bfloat16):
            for d, hq, hk in ((64, 8, 2), (128, 32, 8), (80, 4, 4)):
                q, k = torch.randn(3, hq, d, dtype=dtype), torch.randn(3, hk, d, dtype=dtype)
                for inter in (False, True):
                    triton_rope.rope_fwd(q, k, cos, sin, torch.arange(3), inter, False)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_rope_kernel"}
