"""A RealNVP normalizing flow on tritium ops (issue 26): affine coupling layers with alternating masks, exact
log-likelihood and sampling (Dinh, Sohl-Dickstein and Bengio, "Density estimation using Real NVP").

Each ``Coupling`` keeps the masked coordinates x_m = m * x and maps the others affinely with a scale and shift
computed from x_m by an MLP (Linear -> SiLU -> Linear -> SiLU -> Linear): z = x_m + (1 - m) * (x * exp(s) + t),
s = scale * tanh(raw_s) (bounded: stable training) and both zero on the masked coordinates. Its Jacobian is
triangular, so log|det dz/dx| = sum(s); the inverse is x = z_m + (1 - m) * (z - t) * exp(-s) with s, t from
z_m = x_m. ``RealNVP`` stacks couplings whose masks alternate (m_i = (index + i) mod 2 over the coordinates), maps
data to a standard normal base: log p(x) = log N(f(x); 0, I) + sum of the layers' log-determinants, and samples
by inverting f on base draws.

``impl="tritium"`` runs the MLPs on tritium.nn.Linear and tritium.silu; ``impl="torch"`` is the same module tree
on torch ops, with the same state_dict. The model has no fusable hot spot of its own: a step is three small
linear layers per coupling plus elementwise affine maps on (batch, 2) tensors, every one below the size where a
tritium kernel beats torch's op (the activations route to torch's, ROUTE_BELOW; the linears are F.linear's), so
the model's forward and backward cost what its twin's do. What the recipe gains is the optimizer: its 56
parameter tensors step in one fused call of tritium.optim.AdamW where torch.optim.AdamW runs a loop of small ops
per tensor (tritium.cli.train.adamw_for; tritium bench models --model flow).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .zoo import _ZooImpl


class Coupling(_ZooImpl):
    """One affine coupling layer over ``dim`` coordinates; ``mask`` (dim,) of 0/1, 1 where the coordinate passes
    through unchanged and conditions the others."""

    def __init__(self, dim: int, hidden: int, mask: Tensor, impl: str = "tritium"):
        super().__init__(impl)
        self.register_buffer("mask", mask.float(), persistent=False)
        self.fc1 = self.ops.Linear(dim, hidden)
        self.fc2 = self.ops.Linear(hidden, hidden)
        self.fc3 = self.ops.Linear(hidden, 2 * dim)
        self.scale = nn.Parameter(torch.ones(dim))
        with torch.no_grad():  # start at the identity map
            self.fc3.weight.zero_()
            self.fc3.bias.zero_()

    def _st(self, xm: Tensor) -> Tuple[Tensor, Tensor]:
        h = self.ops.silu(self.fc2(self.ops.silu(self.fc1(xm))))
        raw_s, t = self.fc3(h).chunk(2, -1)
        free = 1 - self.mask.to(xm.dtype)
        return self.scale * self.ops.tanh(raw_s) * free, t * free

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, dim) -> (z (B, dim), log|det dz/dx| (B,))."""
        m = self.mask.to(x.dtype)
        s, t = self._st(x * m)
        return x * m + (1 - m) * (x * torch.exp(s) + t), s.sum(-1)

    def inverse(self, z: Tensor) -> Tensor:
        m = self.mask.to(z.dtype)
        s, t = self._st(z * m)
        return z * m + (1 - m) * (z - t) * torch.exp(-s)


class RealNVP(_ZooImpl):
    """``layers`` couplings with alternating masks over ``dim`` coordinates, to a standard normal base."""

    def __init__(self, dim: int = 2, hidden: int = 128, layers: int = 8, impl: str = "tritium"):
        super().__init__(impl)
        if dim < 2:
            raise ValueError(f"dim must be at least 2 (a coupling splits the coordinates), got {dim}")
        self.dim = dim
        self.layers = nn.ModuleList(Coupling(dim, hidden, (torch.arange(dim) + i) % 2, impl) for i in range(layers))

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """x (B, dim) -> (z = f(x) (B, dim), log|det df/dx| (B,))."""
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        """The exact log-density (nats) of each row of x (B, dim)."""
        z, logdet = self(x)
        return -0.5 * (z * z).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi) + logdet

    def nll(self, x: Tensor) -> Tensor:
        """The mean negative log-likelihood in nats per point: the training loss."""
        return -self.log_prob(x).mean()

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator).to(next(self.parameters()))
        return self.inverse(z)


def flow_step(model: RealNVP, opt: torch.optim.Optimizer, x: Tensor) -> Tensor:
    """One training step (forward, backward, optimizer step) on a batch of points x (B, dim)."""
    loss = model.nll(x)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


__all__: Sequence[str] = ["Coupling", "RealNVP", "flow_step"]
