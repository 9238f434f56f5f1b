"""The op plumbing in tritium.ops._library: define_op's argument rules, kernel_ok's common checks and the one
stride rule (unit_last) every family's kernels are fed by."""
import pytest
import torch

import tritium
from tritium.ops._library import define_op, kernel_ok, unit_last


def test_define_op_rejects_two_cuda_kernels():
    """A composite op is its own CUDA kernel: a cuda= kernel besides it is refused before anything registers."""
    with pytest.raises(ValueError, match="composite"):
        define_op("never_registered(Tensor x) -> Tensor", lambda x: x, cuda="norms:rms_norm_fwd",
                  composite=lambda x: x)
    assert not hasattr(torch.ops.tritium, "never_registered")


def test_kernel_ok():
    x = torch.randn(3, 4)
    assert kernel_ok(x) and kernel_ok(x, torch.randn(4)) and kernel_ok(x.double(), torch.randn(2).double())
    assert kernel_ok(x.half()) and kernel_ok(x.bfloat16())
    assert not kernel_ok(x, torch.randn(4).double())          # another dtype
    assert not kernel_ok(x, torch.randn(4, device="meta"))    # another device
    assert not kernel_ok(x, None)                             # callers leave out absent optional tensors
    assert not kernel_ok(x.to(torch.int32))                   # a dtype without kernels
    assert not kernel_ok(torch.randn(0, 4))                   # empty
    assert not kernel_ok(x.to("meta"))                        # a device without kernels
    assert not kernel_ok([1.0, 2.0])                          # not a tensor
    tritium.set_backend("reference")
    try:
        assert not kernel_ok(x)
    finally:
        tritium.set_backend("kernels")


def test_unit_last():
    """A unit last stride by a view where one exists (a one-element last dim), by a copy only where not."""
    x = torch.randn(4, 6)[:, 1:5]
    assert unit_last(x) is x                                  # any row stride
    t = torch.randn(4, 6).t()                                 # (6, 4), last stride 6
    assert unit_last(t).stride(-1) == 1 and torch.equal(unit_last(t), t)
    one = torch.randn(2, 3, 1, 5).transpose(-1, -2)           # (2, 3, 5, 1), last stride 5, "contiguous"
    u = unit_last(one)
    assert u.stride(-1) == 1 and u.data_ptr() == one.data_ptr() and torch.equal(u, one)
    e = torch.randn(3, 0)
    assert unit_last(e) is e
