"""tritium.models.diffusion (issue 26): the U-Net on tritium ops against its plain-PyTorch twin (same state_dict,
same outputs and parameter gradients in float32), the noise schedules' closed forms against their definitions,
DDIM (deterministic at eta = 0, ancestral sampling at eta = 1 over every step) and a short training run."""
import math

import pytest
import torch

from tritium.models.diffusion import (DDPM, SCHEDULES, Schedule, UNet, cosine_alpha_bar, ddim_timesteps,
                                      ddpm_step, timestep_embedding)
from tests.models.test_zoo import _assert_grads, _pair, _read_png
from tests.util import need


def test_unet_twin_outputs_and_grads():
    ours, twin = _pair(lambda impl: UNet(channels=8, groups=4, impl=impl))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 3, 250, 999, 17])
    ya, yb = ours(x, t), twin(x, t)
    assert ya.shape == (5, 1, 8, 8)
    torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
    g = torch.randn(ya.shape, generator=gen)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    _assert_grads(ours, twin)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_ddpm_twin_loss_and_grads():
    ours, twin = _pair(lambda impl: DDPM(channels=8, groups=4, timesteps=100, impl=impl))
    assert list(ours.state_dict()) == [k for k in ours.state_dict() if k.startswith("unet.")]  # no schedule
    gen = torch.Generator().manual_seed(2)
    x0 = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    t, noise = torch.randint(100, (6,), generator=gen), torch.randn(6, 1, 8, 8, generator=gen)
    la, lb = ours.loss(x0, t, noise), twin.loss(x0, t, noise)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.backward()
    lb.backward()
    _assert_grads(ours, twin)


def test_unet_bfloat16_against_float32():
    """A U-Net cast to bfloat16 runs (the float32 timestep embedding cast to the weights' dtype) on the fused
    GroupNorm + SiLU; its output's error against the float32 model is at most twice the bfloat16 twin's (plus a
    small atol), and its backward reaches every parameter with finite gradients."""
    import copy

    ours, twin = _pair(lambda impl: UNet(channels=8, groups=4, impl=impl))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, 8, 8, generator=gen)
    t = torch.tensor([0, 3, 250, 999, 17])
    want = twin(x, t).detach()
    ours16, twin16 = ours.to(torch.bfloat16), copy.deepcopy(twin).to(torch.bfloat16)
    ya = ours16(x.bfloat16(), t)
    assert ya.dtype == torch.bfloat16
    err = (ya.float() - want).abs().max().item()
    err_twin = (twin16(x.bfloat16(), t).float() - want).abs().max().item()
    assert err <= 2 * err_twin + 1e-3, (err, err_twin)
    ya.float().square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ours16.parameters())


def test_timestep_embedding():
    t = torch.tensor([0, 1, 500])
    e = timestep_embedding(t, 6)
    f = torch.tensor([10000.0 ** (-i / 3) for i in range(3)])
    torch.testing.assert_close(e, torch.cat([torch.sin(t[:, None] * f), torch.cos(t[:, None] * f)], 1))
    assert timestep_embedding(t, 7).shape == (3, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()


@pytest.mark.parametrize("kind", SCHEDULES)
def test_schedule_closed_forms(kind):
    T = 300
    s = Schedule.make(T, kind)
    assert s.betas.dtype == torch.float64 and s.timesteps == T
    assert (s.betas > 0).all() and (s.betas < 1).all()
    ab = torch.tensor([math.prod(1 - b for b in s.betas[:t + 1].tolist()) for t in range(T)], dtype=torch.float64)
    torch.testing.assert_close(s.alphas_cumprod, ab, rtol=1e-12, atol=0)
    assert s.alphas_cumprod_prev[0] == 1 and (s.alphas_cumprod_prev[1:] == s.alphas_cumprod[:-1]).all()
    if kind == "linear":
        assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
        torch.testing.assert_close(s.betas.diff(), torch.full((T - 1,), (0.02 - 1e-4) / (T - 1), dtype=torch.float64))
    else:  # alpha_bar follows the cosine until the last step, whose beta (1: alpha_bar(T) = 0) is clipped
        t = torch.arange(1, T + 1, dtype=torch.float64)
        want = torch.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
        assert s.betas[:-1].max() < 0.999 and s.betas[-1] == 0.999
        torch.testing.assert_close(s.alphas_cumprod[:-1], want[:-1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(cosine_alpha_bar(t, T), want)
    # the posterior q(x_{t-1} | x_t, x_0), by completing the square of q(x_t | x_{t-1}) q(x_{t-1} | x_0):
    # precision 1 / (1 - ab_prev) + alpha_t / beta_t; mean (sqrt(ab_prev) x0 / (1 - ab_prev) + sqrt(alpha_t) x_t /
    # beta_t) / precision
    a, b, abp = s.alphas[1:], s.betas[1:], s.alphas_cumprod_prev[1:]
    prec = 1 / (1 - abp) + a / b
    torch.testing.assert_close(s.posterior_variance[1:], 1 / prec, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef1[1:], abp.sqrt() / (1 - abp) / prec, rtol=1e-10, atol=0)
    torch.testing.assert_close(s.posterior_mean_coef2[1:], a.sqrt() / b / prec, rtol=1e-10, atol=0)
    # at t = 0 the posterior is x_0 itself
    assert s.posterior_variance[0] == 0 and s.posterior_mean_coef2[0] == 0
    assert s.posterior_mean_coef1[0].item() == pytest.approx(1, abs=1e-12)


def test_q_sample_moments():
    model = DDPM(channels=8, groups=4, timesteps=50, schedule="linear")
    x0 = torch.full((20000, 1, 1, 1), 0.5)
    t = torch.full((20000,), 30)
    xt = model.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    ab = model.schedule.alphas_cumprod[30].item()
    assert abs(xt.mean().item() - 0.5 * math.sqrt(ab)) < 0.02
    assert abs(xt.var().item() - (1 - ab)) < 0.03


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    seq = ddim_timesteps(1000, 50)
    assert len(seq) == 50 and seq[0] == 999 and seq[-1] == 0 and seq == sorted(seq, reverse=True)
    assert ddim_timesteps(10, 1) == [9]


def _sampler_model():
    torch.manual_seed(0)
    model = DDPM(channels=8, groups=4, timesteps=40).eval()
    with torch.no_grad():  # a non-trivial noise predictor (the zero-initialised-free default is small)
        for p in model.parameters():
            p.mul_(3)
    return model


def test_ddim_eta0_deterministic():
    model = _sampler_model()
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    a = model.ddim_sample(4, steps=10, eta=0.0, generator=torch.Generator().manual_seed(2), x_T=x_T)
    b = model.ddim_sample(4, steps=10, eta=0.0, generator=torch.Generator().manual_seed(3), x_T=x_T)
    assert torch.equal(a, b) and a.shape == (4, 1, 8, 8) and 0 <= a.min() and a.max() <= 1
    c = model.ddim_sample(4, steps=10, eta=1.0, generator=torch.Generator().manual_seed(3), x_T=x_T)
    assert not torch.allclose(a, c)  # eta > 0 draws noise
    d = model.ddim_sample(4, steps=20, eta=0.0, x_T=x_T)
    assert not torch.allclose(a, d)


def test_ddim_eta1_all_steps_is_ancestral():
    """DDIM with eta = 1 over every timestep has sigma_t^2 = beta_tilde_t and the posterior mean, and draws its
    noise in the same order: the same images as ancestral DDPM sampling."""
    model = _sampler_model()
    a = model.ddpm_sample(4, generator=torch.Generator().manual_seed(5))
    b = model.ddim_sample(4, steps=40, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert a.std() > 0.05
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="schedule must be one of"):
        DDPM(schedule="quadratic")
    with pytest.raises(ValueError, match=r"steps must be in \[1, 40\], got 41"):
        _sampler_model().ddim_sample(2, steps=41)


def test_short_training_lowers_the_loss():
    """Training on one fixed batch of structured images (a noise-prediction task with a learnable answer): the
    loss at fixed timesteps and noise falls well below its start in 60 steps."""
    torch.manual_seed(0)
    model = DDPM(channels=8, groups=4, timesteps=100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.arange(64).view(1, 1, 8, 8) % 8 < 4).float().repeat(16, 1, 1, 1) * 2 - 1
    t, noise = torch.randint(100, (16,), generator=gen), torch.randn(16, 1, 8, 8, generator=gen)
    with torch.no_grad():
        before = model.loss(x0, t, noise).item()
    for _ in range(60):
        ddpm_step(model, opt, x0, torch.randint(100, (16,), generator=gen), torch.randn(16, 1, 8, 8, generator=gen))
    with torch.no_grad():
        after = model.loss(x0, t, noise).item()
    assert after < 0.5 * before, (before, after)


def test_ddpm_recipe_samples(tmp_path):
    """A short recipe run on the digits (200 steps, 100 DDIM samples): the loss falls and the PNG grid holds
    10 x 10 samples."""
    need("sklearn")
    from tritium.cli.train_gen import train_ddpm

    r = train_ddpm("tritium", steps=200, samples=100, ddim_steps=10, channels=16, png=str(tmp_path / "s.png"))
    assert r["final_loss"] < 0.6 * r["first_loss"], r
    assert _read_png(tmp_path / "s.png").shape == (10 * 34 + 2, 10 * 34 + 2)


@pytest.mark.parametrize("argv,want", [
    (["--model", "ddpm", "--ddim-steps", "2000"], "--ddim-steps: at most 1000"),
    (["--model", "ddpm", "--schedule", "quadratic"], "--schedule: invalid choice: 'quadratic'"),
    (["--model", "flow", "--steps", "0"], "--steps"),
])
def test_train_command_line_errors(argv, want, capfd):
    """A bad option of tritium train's ddpm / flow / seq2seq recipes: status 2 and one error line naming it,
    before any training."""
    from tritium.cli import main

    assert main(["train", *argv]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritium: error: ") and want in lines[0], lines
