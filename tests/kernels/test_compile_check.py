"""The GPU compile check (tests/util.py check_gpu_compile) can fail: a kernel that spills registers and one that
needs more shared memory than a block may have are rejected; the occupancy arithmetic gives known values."""
import pytest
import torch

from tests.kernels import _bad_kernels
from tests.util import BLOCK_SHARED_LIMIT, GpuCompileError, blocks_per_sm, check_gpu_compile, compile_specs

pytestmark = pytest.mark.gpu_compile


def test_forced_spill_fails():
    x, y = torch.randn(8192), torch.empty(8192)
    with pytest.raises(GpuCompileError, match="spills"):
        check_gpu_compile(lambda: _bad_kernels.spilling_kernel[(1,)](x, y, BLOCK=8192, num_warps=1), archs=(80,))


def test_over_limit_shared_memory_fails():
    m, n, k = 128, 128, 64
    a, b, c = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)

    def run():
        _bad_kernels.big_shared_kernel[(1,)](a, b, c, k, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, num_warps=8, num_stages=5)

    with pytest.raises(GpuCompileError, match=f"over sm_90's per-block limit of {BLOCK_SHARED_LIMIT[90]} B"):
        check_gpu_compile(run, archs=(90,))


def test_blocks_per_sm():
    assert blocks_per_sm(80, num_warps=4, regs=32, shared=0) == 16       # warps: 64 / 4
    assert blocks_per_sm(80, num_warps=8, regs=128, shared=0) == 2       # registers: 65536 / (128 * 256)
    assert blocks_per_sm(90, num_warps=4, regs=41, shared=0) == 10       # 41 -> 48 a thread: 42 warps of 1536
    assert blocks_per_sm(80, num_warps=4, regs=32, shared=100 * 1024) == 1  # shared: 164 KiB / 101 KiB
    assert blocks_per_sm(90, num_warps=1, regs=16, shared=0) == 32       # the 32-block cap
    assert BLOCK_SHARED_LIMIT == {80: 166912, 90: 232448}


def test_launch_spec_specialises_as_a_gpu_launch():
    """The checked configuration is the one a GPU launch compiles: Triton's binder turns an integer 1 into a
    constant and marks 16-divisible pointers and integers (which lets loads vectorise); other values stay plain."""
    a, b, c = torch.randn(16, 16), torch.randn(16, 16), torch.empty(16, 16)
    odd = torch.randn(17)[1:].view(4, 4)  # data 4 bytes past an allocation: not 16-byte aligned

    def spec(a, k):
        specs = compile_specs(lambda: _bad_kernels.big_shared_kernel[(1,)](a, b, c, k, BLOCK_M=16, BLOCK_N=16,
                                                                           BLOCK_K=16), execute=False)
        assert len(specs) == 1
        return specs[0]

    s = spec(a, 32)
    assert s["signature"]["K"] == "i32" and s["signature"]["A"] == "*fp32"
    assert {i for i, _ in s["attrs"]} == {0, 1, 2, 3}  # A, B, C and K = 32 are 16-divisible
    assert all(attr == [["tt.divisibility", 16]] for _, attr in s["attrs"])
    s = spec(odd, 1)
    assert s["signature"]["K"] == "constexpr" and s["constexprs"]["K"] == 1
    assert {i for i, _ in s["attrs"]} == {1, 2}
