"""A denoising diffusion model on tritium ops (issue 26): a small U-Net and the DDPM process on scikit-learn's
8x8 digits.

- ``UNet``: conv3x3 stem; residual blocks (GroupNorm + SiLU -> conv3x3, plus the timestep embedding projected
  to the channels, -> GroupNorm + SiLU -> conv3x3, plus the 1x1-projected input); two stride-2 downsampling
  convolutions (8x8 -> 4x4 -> 2x2), two middle blocks, nearest-neighbour upsampling with the skip connections
  concatenated, and a GroupNorm + SiLU -> conv3x3 head predicting the noise. The timestep enters as the
  sinusoidal embedding of the Transformer paper through Linear -> SiLU -> Linear.
- ``Schedule``: the DDPM noise schedule (``"linear"``: betas from 1e-4 to 0.02 spread over T steps as in Ho et
  al.; ``"cosine"``: Nichol and Dhariwal's alpha_bar(t) = cos^2((t / T + s) / (1 + s) * pi / 2) normalised, betas
  clipped at 0.999) with the closed forms DDPM needs, in float64: alpha_bar, q(x_t | x_0) and the posterior
  q(x_{t-1} | x_t, x_0)'s mean coefficients and variance.
- ``DDPM``: the U-Net with a schedule: ``loss`` is the noise-prediction MSE at random timesteps (Ho et al.'s
  simple loss); ``ddpm_sample`` is ancestral sampling over all T steps (the posterior variance beta_tilde);
  ``ddim_sample`` is DDIM over a subsequence of the steps (``eta=0``: deterministic given x_T; ``eta=1`` over all
  steps draws the same noise as ancestral sampling and gives the same images). Both clip the predicted x_0 to
  [-1, 1] and take the noise consistent with the clipped x_0.

``impl="tritium"`` runs every GroupNorm with its SiLU as one tritium.group_norm pass (forward and backward),
the timestep MLP on tritium.nn.Linear and tritium.silu and the loss on tritium.mse_loss; ``impl="torch"`` is the
same module tree on torch ops (nn.GroupNorm then F.silu), with the same state_dict. The convolutions are torch's
in both (tritium has no 2-D convolution): at 8x8 they are most of a training step (their forward and backward
about three quarters of it), which bounds what the fused GroupNorm + SiLU can gain there; its GroupNorms at 2x2
(the middle blocks) are below ROUTE_DEFAULT and go to torch's own ops (tritium bench models --model ddpm).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .zoo import _ZooImpl

SCHEDULES = ("linear", "cosine")


def _gn_silu(impl: str):
    """SiLU(GroupNorm(x)) with the parameters of an nn.GroupNorm: tritium's one pass, or torch's two ops."""
    if impl == "tritium":
        import tritium

        return lambda gn, x: tritium.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps, "silu")
    return lambda gn, x: F.silu(F.group_norm(x, gn.num_groups, gn.weight, gn.bias, gn.eps))


def _mse(impl: str):
    if impl == "tritium":
        import tritium

        return tritium.mse_loss
    return F.mse_loss


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """The sinusoidal embedding (B,) -> (B, dim): [sin(t * f_i), cos(t * f_i)] with f_i = max_period^(-i / half)
    for i < half = dim // 2 (a zero column appended when dim is odd)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class ResBlock(_ZooImpl):
    """x -> GN+SiLU -> conv3x3 (+ Linear(SiLU(temb)) per channel) -> GN+SiLU -> conv3x3, plus skip(x) (a 1x1 conv
    when the channel count changes)."""

    def __init__(self, cin: int, cout: int, tdim: int, groups: int, impl: str = "tritium"):
        super().__init__(impl)
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = self.ops.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.gn_silu = _gn_silu(impl)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:  # temb: SiLU already applied, (B, tdim)
        h = self.conv1(self.gn_silu(self.norm1, x))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.gn_silu(self.norm2, h))
        return h + self.skip(x)


class UNet(_ZooImpl):
    """(B, in_ch, S, S) noisy images and (B,) integer timesteps -> (B, in_ch, S, S) predicted noise; S divisible
    by 4. Channels: ``channels`` at S, 2x at S/2 and S/4; GroupNorm with ``groups`` groups throughout."""

    def __init__(self, in_channels: int = 1, channels: int = 32, groups: int = 8, impl: str = "tritium"):
        super().__init__(impl)
        c, tdim = channels, 4 * channels
        self.channels = c
        self.time1 = self.ops.Linear(c, tdim)
        self.time2 = self.ops.Linear(tdim, tdim)
        self.conv_in = nn.Conv2d(in_channels, c, 3, padding=1)
        self.down1 = ResBlock(c, c, tdim, groups, impl)
        self.pool1 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.down2 = ResBlock(c, 2 * c, tdim, groups, impl)
        self.pool2 = nn.Conv2d(2 * c, 2 * c, 3, stride=2, padding=1)
        self.mid1 = ResBlock(2 * c, 2 * c, tdim, groups, impl)
        self.mid2 = ResBlock(2 * c, 2 * c, tdim, groups, impl)
        self.up2 = ResBlock(4 * c, 2 * c, tdim, groups, impl)
        self.up1 = ResBlock(3 * c, c, tdim, groups, impl)
        self.norm_out = nn.GroupNorm(groups, c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        self.gn_silu = _gn_silu(impl)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = timestep_embedding(t, self.channels).to(self.time1.weight.dtype)   # float32 -> the model's dtype
        temb = self.ops.silu(self.time2(self.ops.silu(self.time1(emb))))
        h1 = self.down1(self.conv_in(x), temb)                                         # (B, c, S, S)
        h2 = self.down2(self.pool1(h1), temb)                                          # (B, 2c, S/2, S/2)
        h = self.mid2(self.mid1(self.pool2(h2), temb), temb)                           # (B, 2c, S/4, S/4)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h2], 1), temb)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2.0, mode="nearest"), h1], 1), temb)
        return self.conv_out(self.gn_silu(self.norm_out, h))


@dataclass
class Schedule:
    """The DDPM quantities of a beta schedule, float64, each (T,): betas, alphas = 1 - betas, alphas_cumprod
    (alpha_bar_t), alphas_cumprod_prev (alpha_bar_{t-1}, 1 at t = 0), posterior_variance (beta_tilde_t =
    beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)) and the posterior mean's coefficients of x_0 and x_t."""

    betas: Tensor
    alphas: Tensor
    alphas_cumprod: Tensor
    alphas_cumprod_prev: Tensor
    posterior_variance: Tensor
    posterior_mean_coef1: Tensor
    posterior_mean_coef2: Tensor

    @classmethod
    def make(cls, timesteps: int = 1000, kind: str = "linear", beta_start: float = 1e-4, beta_end: float = 0.02,
             s: float = 0.008) -> "Schedule":
        if kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
        if timesteps < 1:
            raise ValueError(f"timesteps must be at least 1, got {timesteps}")
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        else:
            betas = 1 - cosine_alpha_bar(torch.arange(1, timesteps + 1), timesteps, s) / cosine_alpha_bar(
                torch.arange(timesteps), timesteps, s)
            betas = betas.clamp(max=0.999)
        alphas = 1 - betas
        ab = torch.cumprod(alphas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return cls(betas, alphas, ab, ab_prev, betas * (1 - ab_prev) / (1 - ab), betas * ab_prev.sqrt() / (1 - ab),
                   (1 - ab_prev) * alphas.sqrt() / (1 - ab))

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]


def cosine_alpha_bar(t: Tensor, timesteps: int, s: float = 0.008) -> Tensor:
    """Nichol and Dhariwal's alpha_bar at (integer or real) t in [0, T], float64: f(t) / f(0) with
    f(t) = cos^2((t / T + s) / (1 + s) * pi / 2)."""
    f = lambda u: torch.cos((u.double() / timesteps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(torch.zeros(()))


def _at(v: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """v[t] (float64 (T,) at (B,) indices) as (B, 1, ..., 1) in like's dtype and device."""
    return v.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class DDPM(_ZooImpl):
    """A U-Net noise predictor with a noise schedule (T steps, ``"linear"`` or ``"cosine"``). The schedule is not
    part of the state_dict (a U-Net's weights load whatever the schedule)."""

    def __init__(self, channels: int = 32, groups: int = 8, timesteps: int = 1000, schedule: str = "linear",
                 image_size: int = 8, in_channels: int = 1, impl: str = "tritium"):
        super().__init__(impl)
        self.unet = UNet(in_channels, channels, groups, impl)
        self.schedule = Schedule.make(timesteps, schedule)
        self.shape = (in_channels, image_size, image_size)
        self.mse = _mse(impl)

    @property
    def timesteps(self) -> int:
        return self.schedule.timesteps

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
        ab = self.schedule.alphas_cumprod
        return _at(ab.sqrt(), t, x0) * x0 + _at((1 - ab).sqrt(), t, x0) * noise

    def loss(self, x0: Tensor, t: Optional[Tensor] = None, noise: Optional[Tensor] = None,
             generator: Optional[torch.Generator] = None) -> Tensor:
        """The simple loss: mean squared error of the predicted noise at timesteps t (default uniform) and noise
        (default standard normal)."""
        if t is None:
            t = torch.randint(self.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0)
        return self.mse(self.unet(self.q_sample(x0, t, noise), t), noise)

    def _x0_eps(self, x: Tensor, t: int) -> tuple:
        """(x_0 predicted from the noise prediction at step t, clipped to [-1, 1]; the noise consistent with it)."""
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        eps = self.unet(x, tt)
        ab = float(self.schedule.alphas_cumprod[t])
        x0 = ((x - math.sqrt(1 - ab) * eps) / math.sqrt(ab)).clamp(-1, 1)
        return x0, (x - math.sqrt(ab) * x0) / math.sqrt(1 - ab)

    def _start(self, n: int, generator: Optional[torch.Generator], x_T: Optional[Tensor]) -> Tensor:
        dev = next(self.parameters()).device
        return (torch.randn(n, *self.shape, generator=generator) if x_T is None else x_T.clone()).to(dev)

    @torch.no_grad()
    def ddpm_sample(self, n: int, generator: Optional[torch.Generator] = None, x_T: Optional[Tensor] = None,
                    ) -> Tensor:
        """Ancestral sampling over all T steps: x_{t-1} = posterior mean(x_0 predicted, x_t) + sqrt(beta_tilde_t) z
        (no noise at t = 0). Returns (n, C, S, S) images in [0, 1]; x_T (default drawn from ``generator``)."""
        s, x = self.schedule, self._start(n, generator, x_T)
        for t in reversed(range(self.timesteps)):
            x0, _ = self._x0_eps(x, t)
            x = float(s.posterior_mean_coef1[t]) * x0 + float(s.posterior_mean_coef2[t]) * x
            if t > 0:
                x = x + math.sqrt(float(s.posterior_variance[t])) * torch.randn(x.shape, generator=generator).to(x)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def ddim_sample(self, n: int, steps: int = 50, eta: float = 0.0, generator: Optional[torch.Generator] = None,
                    x_T: Optional[Tensor] = None) -> Tensor:
        """DDIM (Song et al.) over ``steps`` evenly spaced timesteps from T-1 down to 0: x_prev = sqrt(ab_prev) x_0
        + sqrt(1 - ab_prev - sigma^2) eps + sigma z with sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab /
        ab_prev). eta = 0 is deterministic given x_T. Returns (n, C, S, S) images in [0, 1]."""
        if not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be in [1, {self.timesteps}], got {steps}")
        ab_all = self.schedule.alphas_cumprod
        seq = ddim_timesteps(self.timesteps, steps)
        x = self._start(n, generator, x_T)
        for i, t in enumerate(seq):
            x0, eps = self._x0_eps(x, t)
            ab = float(ab_all[t])
            ab_prev = float(ab_all[seq[i + 1]]) if i + 1 < len(seq) else 1.0
            sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
            x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - sigma ** 2, 0.0)) * eps
            if sigma > 0:
                x = x + sigma * torch.randn(x.shape, generator=generator).to(x)
        return ((x + 1) / 2).clamp(0, 1)


def ddim_timesteps(timesteps: int, steps: int) -> List[int]:
    """``steps`` distinct timesteps evenly spaced over [0, T-1], descending, T-1 and 0 included (all of them when
    steps == T)."""
    if steps == 1:
        return [timesteps - 1]
    return sorted({round(i * (timesteps - 1) / (steps - 1)) for i in range(steps)}, reverse=True)


def ddpm_step(model: DDPM, opt: torch.optim.Optimizer, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """One training step (forward, backward, optimizer step) on images x0 in [-1, 1] at timesteps t."""
    loss = model.loss(x0, t, noise)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter (the weights diffusion samples from)."""
    e, m = list(ema.parameters()), list(model.parameters())
    torch._foreach_lerp_(e, m, 1 - decay)


__all__: Sequence[str] = ["UNet", "ResBlock", "DDPM", "Schedule", "SCHEDULES", "timestep_embedding",
                          "cosine_alpha_bar", "ddim_timesteps", "ddpm_step", "ema_update"]
