"""More of the architecture zoo on tritium ops (issue 26): a Siamese / contrastive embedding network and a
DCGAN-style GAN, both on scikit-learn's 8x8 digits.

As in tritium.models.classic, every model takes ``impl="tritium"`` (linear layers are tritium.nn.Linear, the
activations and losses tritium's) or ``impl="torch"`` (the plain-PyTorch twin: the same module tree on torch ops,
the same state_dict). Convolutions and training-mode BatchNorm stay torch's in both (tritium has no 2-D
convolution and its BatchNorm kernel is the inference one, tritium.batch_norm_act).

- ``Siamese``: a small CNN embedding an image to a unit vector, trained with one of tritium's metric-learning
  losses (``loss="triplet"``: tritium.triplet_margin_loss on random (anchor, positive, negative) triplets;
  ``"contrastive"``: tritium.contrastive_loss on same/different pairs; ``"info_nce"``: tritium.info_nce on pairs
  of same-class images, the other pairs of the batch as negatives). Its quality figure is 1-nearest-neighbour
  retrieval accuracy of held-out digits against the training embeddings (``retrieval_accuracy``).
- ``GAN``: DCGAN-style generator (latent -> linear -> BN -> ReLU -> 2x2 -> transposed convs -> tanh 8x8) and
  discriminator (strided convs, BN, LeakyReLU(0.2) -> linear logit), trained with the non-saturating loss on
  tritium.binary_cross_entropy_with_logits (``d_loss`` / ``g_loss``, one step of each in ``gan_step``).

The training recipes (``tritium train --model siamese|gan``) are in tritium.cli.train; ``siamese_step`` and
``gan_step`` are what they and ``tritium bench models`` time.
"""
from __future__ import annotations

import struct
import zlib
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classic import IMPLS, _Impl, ops as classic_ops

LOSSES = ("triplet", "contrastive", "info_nce")


def _torch_table() -> SimpleNamespace:
    from .. import reference  # torch ops only: the losses torch has no function for, written out

    return SimpleNamespace(leaky_relu=F.leaky_relu, bce_with_logits=F.binary_cross_entropy_with_logits,
                           triplet_margin_loss=F.triplet_margin_loss, contrastive_loss=reference.contrastive_loss,
                           info_nce=reference.info_nce)


def _tritium_table() -> SimpleNamespace:
    import tritium

    return SimpleNamespace(leaky_relu=tritium.leaky_relu, bce_with_logits=tritium.binary_cross_entropy_with_logits,
                           triplet_margin_loss=tritium.triplet_margin_loss,
                           contrastive_loss=tritium.contrastive_loss, info_nce=tritium.info_nce)


def ops(impl: str) -> SimpleNamespace:
    """classic.ops(impl) plus the zoo's LeakyReLU and losses."""
    base = vars(classic_ops(impl))
    extra = vars(_tritium_table() if impl == "tritium" else _torch_table())
    return SimpleNamespace(**base, **extra)


class _ZooImpl(_Impl):
    def __init__(self, impl: str):
        super().__init__(impl)
        self.ops = ops(impl)


# ---------------------------------------------------------------------------------------------------------
# Siamese / contrastive embedding network
# ---------------------------------------------------------------------------------------------------------
class Siamese(_ZooImpl):
    """Embedding CNN: (B, 1, 8, 8) -> conv3x3 -> ReLU -> conv3x3 -> ReLU -> maxpool2 -> Linear -> ReLU -> Linear
    -> L2-normalised (B, embed_dim). ``loss`` picks the training loss (LOSSES); margin applies to the triplet and
    contrastive losses (on unit vectors, distances lie in [0, 2]), temperature to InfoNCE."""

    def __init__(self, embed_dim: int = 32, channels: Tuple[int, int] = (16, 32), hidden: int = 128,
                 loss: str = "triplet", margin: Optional[float] = None, temperature: float = 0.1,
                 image_size: int = 8, impl: str = "tritium"):
        super().__init__(impl)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.conv1 = nn.Conv2d(1, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        self.fc1 = self.ops.Linear(channels[1] * (image_size // 2) ** 2, hidden)
        self.fc2 = self.ops.Linear(hidden, embed_dim)
        self.loss_name = loss
        self.margin = (0.5 if loss == "triplet" else 1.0) if margin is None else float(margin)
        self.temperature = temperature

    def forward(self, x: Tensor) -> Tensor:  # (B, 1, S, S) -> (B, embed_dim), unit rows
        x = self.ops.relu(self.conv1(x))
        x = F.max_pool2d(self.ops.relu(self.conv2(x)), 2)
        x = self.fc2(self.ops.relu(self.fc1(x.flatten(1))))
        return F.normalize(x, dim=-1)

    def loss(self, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """The batch loss from the images ``sample_batch`` picked: triplet (anchors, positives, negatives);
        contrastive (first, second, target: 1 same class, 0 not); info_nce (queries, keys, unused) with key i of
        query i's class. The embeddings of a batch's images come from one forward call."""
        n = a.shape[0]
        if self.loss_name == "contrastive":
            e = self(torch.cat([a, b]))
            return self.ops.contrastive_loss(e[:n], e[n:], c, margin=self.margin)
        if self.loss_name == "info_nce":
            e = self(torch.cat([a, b]))
            return self.ops.info_nce(e[:n], e[n:], temperature=self.temperature, normalize=False)
        e = self(torch.cat([a, b, c]))
        return self.ops.triplet_margin_loss(e[:n], e[n:2 * n], e[2 * n:], margin=self.margin)


def sample_batch(y: Tensor, batch: int, loss: str, gen: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """Indices (or a target) for one batch of ``Siamese.loss``: triplet -> (anchor, positive, negative) indices,
    positive of the anchor's class and negative of another; contrastive -> (first, second, target float), half
    the pairs of one class; info_nce -> (query, key, empty), the classes taken in shuffled rounds (every class
    once before any repeats: fewer same-class pairs among the negatives than independent draws), each key of its
    query's class."""
    n, classes = len(y), int(y.max()) + 1
    order = torch.argsort(y, stable=True)                       # the indices grouped by class
    counts = torch.bincount(y, minlength=classes)
    starts = torch.cumsum(counts, 0) - counts

    def pick(labels: Tensor, same: bool) -> Tensor:
        if not same:  # a uniformly random other class
            labels = (labels + torch.randint(1, classes, labels.shape, generator=gen)) % classes
        u = torch.rand(labels.shape, generator=gen)
        return order[starts[labels] + (u * counts[labels]).long().clamp(max=counts[labels] - 1)]

    if loss == "info_nce":
        rounds = -(-batch // classes)
        labels = torch.cat([torch.randperm(classes, generator=gen) for _ in range(rounds)])[:batch]
        return pick(labels, True), pick(labels, True), torch.empty(0, dtype=torch.long)
    anchor = torch.randint(n, (batch,), generator=gen)
    if loss == "triplet":
        return anchor, pick(y[anchor], True), pick(y[anchor], False)
    target = (torch.arange(batch) % 2 == 0)
    second = torch.where(target, pick(y[anchor], True), pick(y[anchor], False))
    return anchor, second, target.float()


def siamese_step(model: Siamese, opt: torch.optim.Optimizer, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """One training step (forward, backward, optimizer step) on a batch of images from ``sample_batch``."""
    loss = model.loss(a, b, c)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def embed(model: Siamese, images: Tensor, chunk: int = 512) -> Tensor:
    model.eval()
    return torch.cat([model(images[i:i + chunk]) for i in range(0, len(images), chunk)])


def nearest_neighbour_accuracy(train_vecs: Tensor, train_y: Tensor, test_vecs: Tensor, test_y: Tensor) -> float:
    """1-NN (Euclidean) of each test vector among the training vectors: the fraction whose label matches."""
    nearest = torch.cdist(test_vecs, train_vecs).argmin(1)
    return (train_y[nearest] == test_y).float().mean().item()


def retrieval_accuracy(model: Siamese, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor) -> float:
    """Held-out retrieval: each test image's nearest training embedding has its label (images (N, 1, 8, 8))."""
    return nearest_neighbour_accuracy(embed(model, x_train), y_train, embed(model, x_test), y_test)


# ---------------------------------------------------------------------------------------------------------
# DCGAN-style GAN
# ---------------------------------------------------------------------------------------------------------
class Generator(_ZooImpl):
    """z (B, latent) -> Linear -> BN -> ReLU -> (2c, 2, 2) -> ConvT 4/2 -> BN -> ReLU -> (c, 4, 4) -> ConvT 4/2
    -> tanh -> (B, 1, 8, 8) in [-1, 1]."""

    def __init__(self, latent: int = 32, channels: int = 64, impl: str = "tritium"):
        super().__init__(impl)
        self.latent, self.channels = latent, channels
        self.fc = self.ops.Linear(latent, 2 * channels * 4, bias=False)
        self.bn0 = nn.BatchNorm1d(2 * channels * 4)
        self.up1 = nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.up2 = nn.ConvTranspose2d(channels, 1, 4, 2, 1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.ops.relu(self.bn0(self.fc(z))).view(-1, 2 * self.channels, 2, 2)
        x = self.ops.relu(self.bn1(self.up1(x)))
        return self.ops.tanh(self.up2(x))


class Discriminator(_ZooImpl):
    """(B, 1, 8, 8) -> conv 4/2 -> LeakyReLU(0.2) -> (c, 4, 4) -> conv 4/2 -> BN -> LeakyReLU(0.2) -> (2c, 2, 2)
    -> Linear -> (B,) logits (real vs generated)."""

    def __init__(self, channels: int = 64, impl: str = "tritium"):
        super().__init__(impl)
        self.conv1 = nn.Conv2d(1, channels, 4, 2, 1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 4, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.fc = self.ops.Linear(2 * channels * 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ops.leaky_relu(self.conv1(x), 0.2)
        x = self.ops.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        return self.fc(x.flatten(1)).squeeze(1)


class GAN(_ZooImpl):
    """Generator and discriminator with the non-saturating losses: the discriminator minimises
    BCE(D(x), 1) + BCE(D(G(z)), 0), the generator BCE(D(G(z)), 1) (-log D(G(z)): strong gradients while D wins)."""

    def __init__(self, latent: int = 32, channels: int = 64, d_channels: int = 32, impl: str = "tritium"):
        super().__init__(impl)
        self.generator = Generator(latent, channels, impl)
        self.discriminator = Discriminator(d_channels, impl)
        self.latent = latent

    def d_loss(self, real: Tensor, fake: Tensor) -> Tensor:
        logits = self.discriminator(torch.cat([real, fake.detach()]))
        target = torch.cat([logits.new_ones(real.shape[0]), logits.new_zeros(fake.shape[0])])
        return self.ops.bce_with_logits(logits, target)

    def g_loss(self, fake: Tensor) -> Tensor:
        logits = self.discriminator(fake)
        return self.ops.bce_with_logits(logits, torch.ones_like(logits))

    @torch.no_grad()
    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """n images (n, 1, 8, 8) in [0, 1] from the generator in eval mode (BatchNorm's running statistics)."""
        was = self.generator.training
        self.generator.eval()
        z = torch.randn(n, self.latent, generator=generator)
        out = (self.generator(z) + 1) / 2
        self.generator.train(was)
        return out


def gan_optimizers(gan: GAN, lr: float = 2e-4, betas=(0.5, 0.999)):
    """DCGAN's Adam settings, one optimizer per network."""
    return (torch.optim.Adam(gan.generator.parameters(), lr=lr, betas=betas),
            torch.optim.Adam(gan.discriminator.parameters(), lr=lr, betas=betas))


def gan_step(gan: GAN, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, real: Tensor,
             z: Tensor) -> Tuple[Tensor, Tensor]:
    """One discriminator step then one generator step on the same fakes; real (B, 1, 8, 8) in [-1, 1]."""
    fake = gan.generator(z)
    d = gan.d_loss(real, fake)
    opt_d.zero_grad(set_to_none=True)
    d.backward()
    opt_d.step()
    g = gan.g_loss(fake)
    opt_g.zero_grad(set_to_none=True)
    g.backward()
    opt_g.step()
    return d.detach(), g.detach()


# ---------------------------------------------------------------------------------------------------------
# A PNG grid of images (the standard library's zlib and struct: no imaging package needed)
# ---------------------------------------------------------------------------------------------------------
def png_grid(images: Tensor, path: str, cols: int = 10, scale: int = 4, pad: int = 2) -> None:
    """Write images (N, H, W) or (N, 1, H, W) in [0, 1] as one 8-bit greyscale PNG: ``cols`` per row, each pixel
    a scale x scale block, ``pad`` pixels of black between images. Dark digits on white, as scikit-learn shows
    them."""
    imgs = images.detach().float().reshape(images.shape[0], images.shape[-2], images.shape[-1]).clamp(0, 1)
    n, h, w = imgs.shape
    rows = -(-n // cols)
    cell_h, cell_w = h * scale + pad, w * scale + pad
    canvas = torch.zeros(rows * cell_h + pad, cols * cell_w + pad)
    for i in range(n):
        r, c = divmod(i, cols)
        block = imgs[i].repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        canvas[pad + r * cell_h:pad + r * cell_h + h * scale, pad + c * cell_w:pad + c * cell_w + w * scale] = block
    pixels = (255 - (canvas * 255).round()).to(torch.uint8)   # ink dark on white
    raw = b"".join(b"\x00" + bytes(row.tolist()) for row in pixels)  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width = pixels.shape
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def sample_score(probs: Tensor, confident: float = 0.9) -> dict:
    """A classifier-based score of generated samples from a digit classifier's class probabilities (N, 10):
    ``confident`` the fraction whose top class has probability >= the threshold; ``classes`` how many of the 10
    digits are the top class of some confident sample; ``spread`` the entropy of the confident samples' class
    histogram over log(10) (1: every digit equally often, 0: a single digit: mode collapse); ``histogram``."""
    top, cls = probs.max(1)
    sure = cls[top >= confident]
    hist = torch.bincount(sure, minlength=probs.shape[1]).float()
    p = hist / hist.sum().clamp(min=1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    return {"confident": (top >= confident).float().mean().item(), "classes": int((hist > 0).sum()),
            "spread": entropy / torch.tensor(float(probs.shape[1])).log().item(),
            "histogram": hist.long().tolist()}


ZOO_MODELS: Sequence[str] = ("siamese", "gan")

__all__ = ["Siamese", "Generator", "Discriminator", "GAN", "LOSSES", "ZOO_MODELS", "IMPLS", "ops", "sample_batch",
           "siamese_step", "gan_step", "gan_optimizers", "embed", "nearest_neighbour_accuracy",
           "retrieval_accuracy", "png_grid", "sample_score"]
