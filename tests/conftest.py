"""Test setup: Triton runs in its interpreter on CPU tensors (set before triton is imported anywhere), or on a real
GPU when TRITIUM_TEST_DEVICE names one (e.g. cuda: then TRITON_INTERPRET is removed; tests/util.py's DEVICE)."""
import os

if os.environ.get("TRITIUM_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Every output of a C++ kernel starts as NaN (csrc/pool.cpp's test mode), so an element a kernel leaves unwritten
# fails its test whatever the memory held before, in any test order.
os.environ.setdefault("TRITIUM_CPU_POOL_POISON", "1")
# Small inputs reach the kernels (not torch's own ops, where ops/_library.py's ROUTE_BELOW sends them by default):
# the tests' small shapes are there to test the kernels. tests/ops/test_routes.py turns the routes back on.
os.environ.setdefault("TRITIUM_ROUTES", "off")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tests.hypothesis_profile  # noqa: E402,F401  (derandomised hypothesis; torch seeded per example)

import tritium  # noqa: E402

if importlib.util.find_spec("tritium.kernels") is None:
    # Not installed, only built in place (make gpu-check on a machine where nothing is installed): pyproject's
    # package-dir mapping of tritium.kernels to the repository's kernels/, applied by hand.
    tritium.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    """The sm_80/sm_90 compile checks record launches under the interpreter: on a real GPU the kernel tests
    themselves compile and run every configuration, so the checks are skipped there."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="the GPU compile check needs the Triton interpreter (TRITON_INTERPRET=1)")
    for item in items:
        if "gpu_compile" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def reference_backend():
    """Run a test with TRITIUM_BACKEND=reference semantics, restoring the backend afterwards."""
    import tritium

    old = tritium.get_backend()
    tritium.set_backend("reference")
    yield
    tritium.set_backend(old)


def _round_bf16_like_the_gpu():
    """Triton 3.9's interpreter converts float32 -> bfloat16 by truncation, while every GPU backend (and
    torch) rounds to nearest even; left alone, each bf16 store under the interpreter is off by up to one ulp
    more than on hardware, and the tolerance rule (2x torch's own error) would flag the interpreter, not the
    kernel. Route that one conversion through torch's rounding."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            as_bf16 = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interpreter.TensorHandle(as_bf16.view(torch.uint16).numpy(), tl.bfloat16)
        return original(self, src, dst_type)

    builder.cast_impl = cast_impl
    builder.create_fp_trunc = lambda self, src, dst_type: self.cast_impl(src, dst_type)


if os.environ.get("TRITON_INTERPRET") == "1":
    _round_bf16_like_the_gpu()
