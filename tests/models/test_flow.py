"""tritium.models.flow (issue 26): RealNVP on tritium ops against its plain-PyTorch twin (same state_dict, same
log-likelihoods and parameter gradients in float32), its log-determinant against autograd's Jacobian in
float64, inverse(forward(x)) == x, and a short two-moons run reaching a stated held-out likelihood."""
import math

import pytest
import torch

from tritium.models.flow import RealNVP, flow_step
from tests.models.test_zoo import _assert_grads, _pair
from tests.util import need


def _perturbed(model):
    """The couplings start at the identity (zero last layers): perturb every weight so the tests see a flow."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def test_flow_twin_log_prob_and_grads():
    ours, twin = _pair(lambda impl: _perturbed(RealNVP(dim=3, hidden=16, layers=4, impl=impl)))
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(1))
    la, lb = ours.log_prob(x), twin.log_prob(x)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    za, zb = ours(x)[0], twin(x)[0]
    torch.testing.assert_close(za, zb, rtol=1e-5, atol=1e-5)
    ours.nll(x).backward()
    twin.nll(x).backward()
    _assert_grads(ours, twin)
    sa = ours.sample(5, torch.Generator().manual_seed(2))
    torch.testing.assert_close(sa, twin.sample(5, torch.Generator().manual_seed(2)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["tritium", "torch"])
@pytest.mark.parametrize("dim", [2, 3, 5])
def test_logdet_is_the_jacobians(impl, dim):
    model = _perturbed(RealNVP(dim=dim, hidden=12, layers=5, impl=impl)).double()
    x = torch.randn(4, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
    _, logdet = model(x)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0][0], x[i])
        sign, want = torch.linalg.slogdet(jac)
        assert sign > 0
        torch.testing.assert_close(logdet[i], want, rtol=1e-10, atol=1e-10)
    assert logdet.abs().min() > 1e-3  # the perturbed flow is not volume-preserving


@pytest.mark.parametrize("impl", ["tritium", "torch"])
def test_inverse_of_forward(impl):
    model = _perturbed(RealNVP(dim=3, hidden=16, layers=6, impl=impl))
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    z, _ = model(x)
    assert (z - x).abs().max() > 0.1
    torch.testing.assert_close(model.inverse(z), x, rtol=1e-5, atol=1e-5)
    model = model.double()
    torch.testing.assert_close(model.inverse(model(x.double())[0]), x.double(), rtol=1e-12, atol=1e-12)


def test_identity_at_start_and_standard_normal_density():
    model = RealNVP(dim=2, hidden=8, layers=2)
    x = torch.randn(6, 2)
    z, logdet = model(x)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(6))
    want = -0.5 * (x * x).sum(-1) - math.log(2 * math.pi)
    torch.testing.assert_close(model.log_prob(x), want)


def test_bad_dim():
    with pytest.raises(ValueError, match="dim must be at least 2"):
        RealNVP(dim=1)


def test_short_training_lowers_the_nll():
    torch.manual_seed(0)
    model = RealNVP(dim=2, hidden=32, layers=4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 2, generator=gen) * torch.tensor([0.3, 2.0]) + torch.tensor([1.0, -1.0])
    before = model.nll(x).item()
    for _ in range(100):
        flow_step(model, opt, x)
    # a Gaussian with those scales has entropy log(2 pi e) + log(0.3 * 2) nats: the flow gets near it
    assert model.nll(x).item() < math.log(2 * math.pi * math.e) + math.log(0.6) + 0.15 < before


def test_flow_recipe(tmp_path):
    """A short two-moons run (600 steps): held-out NLL below 1.2 nats per point (a single Gaussian fitted to the
    moons has about 2.1); the PNG is written."""
    need("sklearn")
    from tritium.cli.train_gen import train_flow

    r = train_flow("tritium", steps=600, png=str(tmp_path / "f.png"))
    assert r["test_nll"] < 1.2 < r["gaussian_nll"], r
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
