"""The GPU compile check (tests/util.py check_gpu_compile) can fail: a kernel that spills registers and one that
needs more shared memory than a block may have are rejected; the occupancy arithmetic gives known values."""
import pytest
import torch

from tests.kernels import _bad_kernels
from tests.util import BLOCK_SHARED_LIMIT, GpuCompileError, blocks_per_sm, check_gpu_compile

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
