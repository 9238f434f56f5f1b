"""TRITIUM_BACKEND=reference routes each public op to its PyTorch reference: no tritium kernel runs (no
``tritium::`` op reaches the dispatcher) and the result is torch's bit for bit; the default backend does run
tritium's op, so the check would notice a switch that routes nothing."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tritium


class _Namespaces(TorchDispatchMode):
    """The namespaces (aten, tritium, ...) of the ops dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.namespace)
        return func(*args, **(kwargs or {}))


def _lstm_pair(cls):
    torch.manual_seed(1)
    ref = getattr(torch.nn, cls)(5, 7)
    ours = getattr(tritium.nn, cls)(5, 7)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 5)
    return lambda: ours(x)[0], lambda: ref(x)[0]


def _cases():
    x, w, b = torch.randn(4, 9), torch.randn(9), torch.randn(9)
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    target = torch.randint(0, 9, (4,))
    return {
        "softmax": (lambda: tritium.softmax(x, -1), lambda: F.softmax(x, -1)),
        "log_softmax": (lambda: tritium.log_softmax(x, 0), lambda: F.log_softmax(x, 0)),
        "rms_norm": (lambda: tritium.rms_norm(x, (9,), w), lambda: F.rms_norm(x, (9,), w)),
        "layer_norm": (lambda: tritium.layer_norm(x, (9,), w, b), lambda: F.layer_norm(x, (9,), w, b)),
        "cross_entropy": (lambda: tritium.cross_entropy(x, target), lambda: F.cross_entropy(x, target)),
        "sdpa": (lambda: tritium.scaled_dot_product_attention(q, k, v, is_causal=True),
                 lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
        "lstm": _lstm_pair("LSTM"),
        "gru": _lstm_pair("GRU"),
    }


@pytest.mark.parametrize("name", ["softmax", "log_softmax", "rms_norm", "layer_norm", "cross_entropy", "sdpa",
                                  "lstm", "gru"])
def test_reference_backend_runs_torch_and_default_runs_tritium(name, reference_backend):
    ours, theirs = _cases()[name]
    with torch.no_grad():
        with _Namespaces() as rec:
            out = ours()
        assert "tritium" not in rec.seen, f"the reference backend ran a tritium op for {name}"
        assert torch.equal(out, theirs())
        tritium.set_backend("kernels")   # the fixture restores the previous backend
        with _Namespaces() as rec:
            ours()
        assert "tritium" in rec.seen, f"the default backend ran no tritium op for {name}"
