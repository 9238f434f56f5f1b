"""append_kv and paged_attention_decode, Triton (interpreter) and C++, against dense attention over the same
tokens (float64 reference; tolerance: 2x torch's own error in the dtype + atol)."""
import pytest
import torch

import tritium  # noqa: F401  (loads the C++ kernels)
from tritium import reference
from tritium.kernels import paged
from tests.util import assert_within_torch_error, check_gpu_compile, on_device

triton_paged = on_device(paged)

cpp = torch.ops.tritium


def _cache(lens, bs, hkv, d, dtype, spare=3):
    """Pools holding random tokens for sequences of the given lengths in shuffled blocks, and their tables."""
    nblocks = [-(-n // bs) for n in lens]
    total = sum(nblocks) + spare
    k_pool = torch.randn(total, bs, hkv, d, dtype=torch.float64).to(dtype)
    v_pool = torch.randn(total, bs, hkv, d, dtype=torch.float64).to(dtype)
    perm = torch.randperm(total)
    tables = torch.zeros(len(lens), max(nblocks + [1]) + 1, dtype=torch.int32)  # wider than needed
    c = 0
    for i, n in enumerate(nblocks):
        tables[i, :n] = perm[c:c + n].to(torch.int32)
        c += n
    return k_pool, v_pool, tables, torch.tensor(lens, dtype=torch.int32)


def _dense(q, k_pool, v_pool, tables, lens, scale, softcap, window, dtype):
    """The same attention computed by torch ops in `dtype` (torch's own error) over the gathered tokens."""
    B, Hq, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    out = torch.zeros(B, Hq, D, dtype=dtype)
    for b, n in enumerate(lens.tolist()):
        blocks = tables[b, : -(-n // bs)].long()
        k = k_pool[blocks].reshape(-1, Hkv, D)[:n].to(dtype)
        v = v_pool[blocks].reshape(-1, Hkv, D)[:n].to(dtype)
        if window is not None:
            k, v = k[max(n - window, 0):], v[max(n - window, 0):]
        k = k.repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
        v = v.repeat_interleave(Hq // Hkv, 1).transpose(0, 1)
        s = (q[b].to(dtype).unsqueeze(1) @ k.transpose(1, 2)).squeeze(1) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        out[b] = (torch.softmax(s.float(), -1).to(dtype).unsqueeze(1) @ v).squeeze(1)
    return out


def _check(impl, lens, bs, hq, hkv, d, dtype, softcap=None, window=None):
    k_pool, v_pool, tables, sl = _cache(lens, bs, hkv, d, dtype)
    q = torch.randn(len(lens), hq, d, dtype=torch.float64).to(dtype)
    scale = d ** -0.5
    out = impl.paged_attention_decode(q, k_pool, v_pool, tables, sl, scale, softcap, window)
    ref = reference.paged_attention_decode(q.double(), k_pool.double(), v_pool.double(), tables, sl, scale,
                                           softcap, window)
    theirs = _dense(q, k_pool, v_pool, tables, sl, scale, softcap, window, dtype)
    assert_within_torch_error(out, theirs, ref, f"lens={lens} bs={bs} {hq}/{hkv}x{d}")


TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("bs", (1, 16, 256))
def test_triton_decode(dtype, bs):
    _check(triton_paged, [1, 7, 70], bs, 4, 2, 40, dtype)


# Large head dims (one BLOCK_D of 128 / 256) in each 16-bit dtype, GQA 4 and a block boundary inside a sequence
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("d", (128, 256))
def test_triton_decode_head_dims(d, dtype):
    _check(triton_paged, [5, 40], 16, 8, 2, d, dtype)


@pytest.mark.parametrize("softcap,window", [(20.0, None), (None, 5), (5.0, 33)])
def test_triton_decode_softcap_window(softcap, window):
    _check(triton_paged, [3, 45], 16, 2, 1, 64, torch.float32, softcap, window)


@pytest.mark.parametrize("dtype", TRITON_DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("bs", (1, 16, 256))
# query heads per KV head: a whole register group (4 at head dim 64, 2 at 128), whole groups plus a remainder
# (7 at 64, 3 at 128), a remainder only (3 at 64: SmolLM2), one (any head dim)
@pytest.mark.parametrize("hq,hkv,d", [(8, 2, 64), (14, 2, 64), (9, 3, 64), (6, 2, 128), (4, 4, 128), (16, 1, 40),
                                      (12, 12, 7)])
def test_cpp_decode(dtype, bs, hq, hkv, d):
    """Mixed lengths up to 5000 (one long sequence is split across threads and merged by logsumexp)."""
    _check(cpp, [1, 17, 300, 5000], bs, hq, hkv, d, dtype)


@pytest.mark.parametrize("softcap,window", [(30.0, None), (None, 1), (None, 700), (10.0, 4096)])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_cpp_decode_softcap_window(softcap, window, dtype):
    _check(cpp, [1, 90, 5000], 16, 8, 2, 64, dtype, softcap, window)


@pytest.mark.parametrize("impl", [triton_paged, cpp], ids=["triton", "cpp"])
def test_decode_empty_sequence_and_strided_q(impl):
    """A zero-length sequence gives zeros; q may be a strided view (a slice of a fused qkv projection)."""
    k_pool, v_pool, tables, sl = _cache([0, 20], 16, 2, 32, torch.float32)
    qkv = torch.randn(2, 8, 32)
    q = qkv[:, :4]
    out = impl.paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.2, None, None)
    ref = reference.paged_attention_decode(q.double(), k_pool.double(), v_pool.double(), tables, sl, 0.2)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", [triton_paged, cpp], ids=["triton", "cpp"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("bs", (1, 16))
def test_append_kv_writes_exactly_the_slots(impl, dtype, bs):
    """Poison the pools; after append_kv exactly the named slots hold the new rows, everything else is intact;
    slot -1 (padding) writes nothing; k/v may be strided views."""
    nb, hkv, d, T = 10, 3, 20, 9
    poison = torch.full((nb, bs, hkv, d), float("nan"), dtype=dtype)
    poison[0, 0, 0, 0] = 7.0
    k_pool, v_pool = poison.clone(), poison.clone() * 2
    kv = torch.randn(T, 2 * hkv, d, dtype=torch.float64).to(dtype)
    k, v = kv[:, :hkv], kv[:, hkv:]
    slots = torch.randperm(nb * bs)[:T]
    slots[3] = -1
    expect_k, expect_v = k_pool.clone(), v_pool.clone()
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            expect_k[s // bs, s % bs] = k[t]
            expect_v[s // bs, s % bs] = v[t]
    impl.append_kv(k, v, k_pool, v_pool, slots)
    torch.testing.assert_close(k_pool, expect_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_pool, expect_v, rtol=0, atol=0, equal_nan=True)


def test_public_ops_validate_and_fall_back():
    from tritium.inference import append_kv, paged_attention_decode

    k_pool, v_pool, tables, sl = _cache([5], 4, 2, 8, torch.float32)
    q = torch.randn(1, 4, 8)
    with pytest.raises(ValueError, match="block_tables"):
        paged_attention_decode(q, k_pool, v_pool, tables.long(), sl, 1.0)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_attention_decode(torch.randn(1, 3, 8), k_pool, v_pool, tables, sl, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        paged_attention_decode(q.double(), k_pool, v_pool, tables, sl, 1.0)
    with pytest.raises(ValueError, match="window"):
        paged_attention_decode(q, k_pool, v_pool, tables, sl, 1.0, window=0)
    with pytest.raises(ValueError, match="slot_mapping"):
        append_kv(torch.randn(2, 2, 8), torch.randn(2, 2, 8), k_pool, v_pool, torch.tensor([0, 1], dtype=torch.int32))
    # non-unit head_dim stride in the pools: the reference, same result
    kp_nc = torch.empty(k_pool.shape[:-1] + (16,))[..., ::2]
    kp_nc.copy_(k_pool)
    out = paged_attention_decode(q, kp_nc, v_pool, tables, sl, 0.3)
    torch.testing.assert_close(out, paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.3))


def test_compile_fullgraph():
    from tritium.inference import paged_attention_decode

    k_pool, v_pool, tables, sl = _cache([5, 33], 16, 2, 32, torch.float32)
    q = torch.randn(2, 4, 32)
    f = torch.compile(lambda *a: paged_attention_decode(*a, 0.25), fullgraph=True)
    torch.testing.assert_close(f(q, k_pool, v_pool, tables, sl),
                               paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.25))


@pytest.mark.gpu_compile
def test_gpu_compile():
    """Every paged kernel configuration compiles for sm_80/sm_90 (fp32 IEEE dots, 16-bit dots, flags)."""

    def run():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            k_pool, v_pool, tables, sl = _cache([3, 40], 16, 2, 64, dtype)
            q = torch.randn(2, 8, 64).to(dtype)
            triton_paged.paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.125, None, None)
            triton_paged.append_kv(q[:, :2], q[:, 2:4], k_pool, v_pool, torch.tensor([0, 5]))
        triton_paged.paged_attention_decode(q, k_pool, v_pool, tables, sl, 0.125, 30.0, 8)

    report = check_gpu_compile(run)
    assert {c.name for c in report} == {"_paged_decode_kernel", "_paged_merge_kernel", "_append_kv_kernel"}
