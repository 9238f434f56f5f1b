"""Kernels that are wrong for a GPU on purpose, for tests/kernels/test_compile_check.py: the compile check must
reject them (imported by name in the compile subprocess, so they live in a module of their own)."""
import triton
import triton.language as tl


@triton.jit
def spilling_kernel(X, Y, BLOCK: tl.constexpr):
    # the whole block stays live across the reduction: BLOCK / (32 * num_warps) values per thread, far more
    # than the 255 registers a thread may have
    offs = tl.arange(0, BLOCK)
    x = tl.load(X + offs)
    s = tl.sum(x * x, axis=0)
    tl.store(Y + offs, x / s)


@triton.jit
def big_shared_kernel(A, B, C, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # a float32 matmul whose pipelined A and B tiles (num_stages of them) exceed any SM's shared memory
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(A + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(B + (k + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(C + rm[:, None] * BLOCK_N + rn[None, :], acc)
