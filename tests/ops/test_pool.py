"""tritium's CPU output pool (csrc/pool.cpp): large outputs reuse freed blocks; tensors stay ordinary."""
import io
import subprocess
import sys

import pytest
import torch

import tritium

BIG = (1024, 1024)  # 4 MiB of float32: above the 2 MiB pool threshold


@pytest.fixture
def pool():
    before = tritium.pool_stats()["limit_bytes"]
    tritium.set_pool_limit(1 << 30)  # the same limit whatever TRITIUM_CPU_POOL_MB the environment sets
    tritium.empty_cache()
    yield
    tritium.set_pool_limit(before)


def test_freed_output_is_reused(pool):
    x = torch.randn(BIG)
    y = tritium.relu(x)
    ptr = y.data_ptr()
    del y
    assert tritium.pool_stats()["cached_bytes"] >= 4 << 20
    hits = tritium.pool_stats()["hits"]
    y2 = tritium.leaky_relu(x, 0.5)
    assert tritium.pool_stats()["hits"] == hits + 1
    assert y2.data_ptr() == ptr
    torch.testing.assert_close(y2, torch.nn.functional.leaky_relu(x, 0.5), atol=0, rtol=0)


def test_live_outputs_never_share_a_block(pool):
    x = torch.randn(BIG)
    outs = [tritium.relu(x + i) for i in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4
    for i, o in enumerate(outs):
        torch.testing.assert_close(o, torch.relu(x + i))


def test_pool_tensors_are_ordinary(pool):
    x = torch.randn(BIG)
    y = tritium.silu(x)
    ref = torch.nn.functional.silu(x)
    buf = io.BytesIO()
    torch.save(y, buf)
    buf.seek(0)
    torch.testing.assert_close(torch.load(buf), y)
    y.resize_(2048, 1024)  # grows past the block: a resizable storage
    torch.testing.assert_close(y[:1024], ref, atol=1e-6, rtol=1e-6)
    y.resize_(7)
    assert y.shape == (7,)


def test_limit_and_empty_cache(pool):
    x = torch.randn(BIG)
    tritium.set_pool_limit(0)
    del_me = tritium.relu(x)
    del del_me
    assert tritium.pool_stats()["cached_bytes"] == 0
    tritium.set_pool_limit(1 << 30)
    ys = [tritium.relu(x) for _ in range(3)]
    del ys
    assert tritium.pool_stats()["cached_bytes"] >= 12 << 20
    tritium.set_pool_limit(4 << 20)  # trims at once
    assert tritium.pool_stats()["cached_bytes"] <= 4 << 20
    tritium.empty_cache()
    assert tritium.pool_stats()["cached_bytes"] == 0
    with pytest.raises(RuntimeError, match="bytes must be >= 0"):
        tritium.set_pool_limit(-1)


def test_full_pool_makes_room_for_the_size_in_use(pool):
    """At the limit, a freed block of the size in use evicts the least recently used other sizes' blocks (a
    workload's sizes replace the last one's) instead of being returned to the system itself."""
    tritium.set_pool_limit(10 << 20)
    old = [tritium.relu(torch.randn(1024, 1024)) for _ in range(2)]  # two 4 MiB blocks: 8 of 10 MiB cached
    del old
    assert tritium.pool_stats()["cached_bytes"] == 8 << 20
    x = torch.randn(2048, 1024)  # 8 MiB outputs: the size in use now
    y = tritium.relu(x)
    del y  # kept: the 4 MiB blocks go
    assert tritium.pool_stats()["cached_bytes"] == 8 << 20
    hits = tritium.pool_stats()["hits"]
    for _ in range(3):
        y = tritium.relu(x)
        del y
    assert tritium.pool_stats()["hits"] == hits + 3
    # a block larger than the whole limit is never kept, and evicts nothing
    big = tritium.relu(torch.randn(4096, 1024))  # 16 MiB
    del big
    assert tritium.pool_stats()["cached_bytes"] == 8 << 20


def test_env_turns_the_pool_off():
    code = (
        "import torch, tritium\n"
        "x = torch.randn(1024, 1024)\n"
        "for _ in range(3): tritium.relu(x)\n"
        "s = tritium.pool_stats()\n"
        "assert s['limit_bytes'] == 0 and s['hits'] == 0 and s['misses'] == 0, s\n"
    )
    env = {"TRITIUM_CPU_POOL_MB": "0", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_outputs_are_poisoned_in_the_tests():
    """tests/conftest.py turns on the pool's test mode: an output element no kernel wrote reads NaN. A kernel that
    writes all of its output is unaffected (the rows of a big softmax, pooled, are all finite)."""
    assert torch.ops.tritium_runtime.pool_poison()
    x = torch.randn(1024, 1024)   # a 4 MiB output: from the pool
    for _ in range(2):            # the second call reuses the first's freed block
        y = tritium.softmax(x, -1)
        assert torch.isfinite(y).all()
        del y
