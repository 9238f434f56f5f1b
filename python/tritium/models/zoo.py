"""More of the architecture zoo on tritium ops (issue 26): a Siamese / contrastive embedding network and a
DCGAN-style GAN, both on scikit-learn's 8x8 digits; GCN and GAT node classifiers on a stochastic block model graph;
a Kolmogorov-Arnold network (efficient-kan's KANLinear on the fused tritium.kan_spline); WaveNet (gated residual
units on the fused tritium.wavenet_gate) on generated waveforms.

As in tritium.models.classic, every model takes ``impl="tritium"`` (linear layers are tritium.nn.Linear, the
activations and losses tritium's) or ``impl="torch"`` (the plain-PyTorch twin: the same module tree on torch ops,
the same state_dict). Convolutions and training-mode BatchNorm stay torch's in both (tritium has no 2-D
convolution and its BatchNorm kernel is the inference one, tritium.batch_norm_act), except the GAN's one-channel
convolutions, which impl="tritium" computes as im2col GEMMs (``_conv_gemm``, ``_conv_transpose_gemm``: oneDNN's
backward is slow there), and its small-map stages, which it runs channels last (torch's BatchNorm is faster so).

- ``Siamese``: a small CNN embedding an image to a unit vector (impl="tritium" pools with tritium.max_pool2d: torch's
  channels-first max pooling over small maps is a large share of the step), trained with one of tritium's
  metric-learning losses (``loss="triplet"``: tritium.triplet_margin_loss on random (anchor, positive, negative)
  triplets; ``"contrastive"``: tritium.contrastive_loss on same/different pairs; ``"info_nce"``: tritium.info_nce on
  pairs of same-class images, the other pairs of the batch as negatives). Its quality figure is 1-nearest-neighbour
  retrieval accuracy of held-out digits against the training embeddings (``retrieval_accuracy``).
- ``GAN``: DCGAN-style generator (latent -> linear -> BN -> ReLU -> 2x2 -> transposed convs -> tanh 8x8) and
  discriminator (strided convs, BN, LeakyReLU(0.2) -> linear logit), trained with the non-saturating loss on
  tritium.binary_cross_entropy_with_logits (``d_loss`` / ``g_loss``, one step of each in ``gan_step``).

- ``GCN`` / ``GAT``: two-layer graph networks over a ``Graph`` (CSR by destination, self loops added, its transpose
  precomputed once). GCN's layer is Linear then the symmetric-normalised sum D^-1/2 (A + I) D^-1/2 (tritium:
  tritium.graph_aggregate with the normalisation as edge weights; torch: the (edges, features) messages
  h[col] * w and index_add_). GAT's layer is Linear to (heads, channels), per-node attention scores, then the
  per-destination edge softmax and weighted sum (tritium.gat_aggregate; torch: PyG's formulation, scatter amax,
  exp, index_add of the sums and of the (edges, heads, channels) messages). Dropout on the features only (no
  attention dropout: the fused kernel has none). ``stochastic_block_model`` generates the seeded graph and
  features; quality: held-out node accuracy (``node_accuracy``).

The training recipes (``tritium train --model siamese|gan|gcn|gat``) are in tritium.cli.train; ``siamese_step``,
``gan_step`` and ``gnn_step`` are what they and ``tritium bench models`` time.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .classic import IMPLS, _Impl, ops as classic_ops

if TYPE_CHECKING:
    from ..ops.graph import CSRGraph

LOSSES = ("triplet", "contrastive", "info_nce")


def _torch_table() -> SimpleNamespace:
    from .. import reference  # torch ops only: the losses torch has no function for, written out

    return SimpleNamespace(leaky_relu=F.leaky_relu, bce_with_logits=F.binary_cross_entropy_with_logits,
                           max_pool2d=F.max_pool2d,
                           triplet_margin_loss=F.triplet_margin_loss, contrastive_loss=reference.contrastive_loss,
                           info_nce=reference.info_nce, elu=F.elu,
                           aggregate=lambda x, g, w, reduce="sum": reference.graph_aggregate(
                               x, g.rowptr, g.col, w, reduce, dst=g.dst),
                           gat=lambda x, a_src, a_dst, g, slope: reference.gat_aggregate(
                               x, a_src, a_dst, g.rowptr, g.col, slope, dst=g.dst))


def _tritium_table() -> SimpleNamespace:
    import tritium

    return SimpleNamespace(leaky_relu=tritium.leaky_relu, bce_with_logits=tritium.binary_cross_entropy_with_logits,
                           max_pool2d=tritium.max_pool2d,
                           triplet_margin_loss=tritium.triplet_margin_loss,
                           contrastive_loss=tritium.contrastive_loss, info_nce=tritium.info_nce, elu=tritium.elu,
                           aggregate=lambda x, g, w, reduce="sum": tritium.graph_aggregate(
                               x, g.csr, weight=w, reduce=reduce),
                           gat=lambda x, a_src, a_dst, g, slope: tritium.gat_aggregate(
                               x, a_src, a_dst, g.csr, negative_slope=slope))


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
        if self.impl == "tritium":  # relu(max) = max(relu), gradients too (a window's maximum <= 0 passes none):
            x = self.ops.relu(self.ops.max_pool2d(self.conv2(x), 2))  # the ReLU on a quarter of the elements
        else:
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
# The GAN's impl="tritium" runs its 4x4 (generator) and 2x2 (discriminator) stages channels last: torch's
# training-mode BatchNorm over such small maps is several times faster in that layout (a vector across the channels
# at each position) than channel by channel over a handful of positions, and the convolutions keep the layout.
_CHANNELS_LAST = torch.channels_last


def _conv_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) as im2col and one GEMM: the patches (B, L, C k k) of F.unfold
    times the flattened weight, its backward F.fold (col2im) and two GEMMs. The GAN's impl="tritium" takes it for
    its one-channel convolutions, whose oneDNN backward (the input's gradient above all) is several times slower
    than this at the 8x8 digits' sizes (the twin keeps nn.Conv2d: the same weights, the same function)."""
    B, _, H, W = x.shape
    O, k = weight.shape[0], weight.shape[-1]
    Ho, Wo = (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1
    cols = F.unfold(x, k, padding=padding, stride=stride)                      # (B, C k k, L)
    y = F.linear(cols.transpose(1, 2), weight.reshape(O, -1), bias)            # (B, L, O)
    return y.transpose(1, 2).reshape(B, O, Ho, Wo)


def _conv_transpose_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: int) -> Tensor:
    """F.conv_transpose2d(x, weight, bias, stride, padding) as one GEMM and col2im: each input pixel's C values
    times the (C, O k k) weight give its output patch, F.fold sums the overlapping patches (its backward is F.unfold
    and two GEMMs). Taken where the output has one channel (as _conv_gemm: oneDNN's backward is the slow part)."""
    B, C, H, W = x.shape
    k = weight.shape[-1]
    Ho, Wo = (H - 1) * stride - 2 * padding + k, (W - 1) * stride - 2 * padding + k
    cols = torch.matmul(x.flatten(2).transpose(1, 2), weight.reshape(C, -1))   # (B, H W, O k k)
    y = F.fold(cols.transpose(1, 2), (Ho, Wo), k, padding=padding, stride=stride)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


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
        if self.impl == "tritium":
            # channels last (see _CHANNELS_LAST), and to one channel a GEMM and col2im (_conv_transpose_gemm)
            x = self.ops.relu(self.bn1(self.up1(x.contiguous(memory_format=_CHANNELS_LAST))))
            return self.ops.tanh(_conv_transpose_gemm(x, self.up2.weight, self.up2.bias, 2, 1))
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
        if self.impl == "tritium" and x.requires_grad:  # from one channel, the input's gradient wanted: im2col GEMM
            x = self.ops.leaky_relu(_conv_gemm(x, self.conv1.weight, self.conv1.bias, 2, 1), 0.2)
        else:
            x = self.ops.leaky_relu(self.conv1(x), 0.2)
        if self.impl == "tritium":  # channels last: see _CHANNELS_LAST
            x = x.contiguous(memory_format=_CHANNELS_LAST)
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


def gan_optimizers(gan: GAN, lr: float = 2e-4, betas=(0.5, 0.999), optimizer=None):
    """DCGAN's Adam settings, one optimizer per network; ``optimizer``: the class (default torch.optim.Adam; an
    AdamW class, e.g. tritium.optim.AdamW, is Adam at the weight_decay=0 passed)."""
    cls = optimizer or torch.optim.Adam
    return (cls(gan.generator.parameters(), lr=lr, betas=betas, weight_decay=0.0),
            cls(gan.discriminator.parameters(), lr=lr, betas=betas, weight_decay=0.0))


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
# Graph neural networks: GCN and GAT on a stochastic block model
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Graph:
    """A graph as both implementations take it: CSR by destination (rowptr (N + 1), col (E) the sources), each
    edge's destination (dst, the eager twin's index), the checked tritium.CSRGraph of rowptr and col with its
    transpose (csr: the kernels take it without re-checking the indices, so a step has no host sync and compiles
    as one graph) and GCN's symmetric normalisation per edge (gcn_weight = 1 / sqrt(deg(src) deg(dst)), deg
    counting the self loop)."""
    rowptr: Tensor
    col: Tensor
    dst: Tensor
    csr: CSRGraph
    gcn_weight: Tensor
    num_nodes: int

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @property
    def csc(self) -> Tuple[Tensor, Tensor, Tensor]:
        """The transpose (graph_csc's (csc_ptr, csc_dst, csc_perm))."""
        return self.csr.csc

    def to(self, device) -> "Graph":
        mv = lambda t: t.to(device)  # noqa: E731
        csr = self.csr.to(device)
        return Graph(csr.rowptr, csr.col, mv(self.dst), csr, mv(self.gcn_weight), self.num_nodes)


def build_graph(src: Tensor, dst: Tensor, num_nodes: int, self_loops: bool = True) -> Graph:
    """The Graph of the directed edges src[k] -> dst[k] (int64), sorted by destination (then source), with a self
    loop on every node added when ``self_loops`` (GCN's A + I; GAT attends to the node itself too)."""
    from ..ops.graph import CSRGraph

    if self_loops:
        loop = torch.arange(num_nodes, device=src.device)
        src, dst = torch.cat([src, loop]), torch.cat([dst, loop])
    order = torch.argsort(dst * num_nodes + src)
    src, dst = src[order].contiguous(), dst[order].contiguous()
    deg = torch.zeros(num_nodes, dtype=torch.int64, device=src.device).index_add_(0, dst, torch.ones_like(dst))
    rowptr = torch.cat([deg.new_zeros(1), deg.cumsum(0)])
    csr = CSRGraph(rowptr, src, num_nodes)
    norm = deg.clamp(min=1).float().rsqrt()
    return Graph(csr.rowptr, csr.col, dst, csr, norm[src] * norm[dst], num_nodes)


def stochastic_block_model(num_nodes: int = 3000, num_classes: int = 5, avg_degree: float = 8.0,
                           within: float = 0.8, feat_dim: int = 32, signal: float = 1.0, noise: float = 2.5,
                           seed: int = 0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """A seeded stochastic block model for node classification: (x (N, feat_dim) float32, y (N,) int64, src, dst
    (the undirected edges, both directions, without self loops or duplicates)). Each node's class is uniform over
    num_classes blocks; an expected avg_degree * N / 2 undirected edges, a fraction ``within`` of them inside a
    block (p_in = avg_degree within / (N / k), p_out = avg_degree (1 - within) / (N - N / k)), endpoints drawn
    uniformly; features are the class's centroid (signal * a standard normal vector per class) plus noise *
    standard normal noise, so the features alone separate the classes poorly and the neighbours' help."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(num_classes, (num_nodes,), generator=gen)
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    pairs = int(avg_degree * num_nodes / 2)
    n_in = int(torch.binomial(torch.tensor(float(pairs)), torch.tensor(within), generator=gen))
    a = torch.randint(num_nodes, (pairs,), generator=gen)
    same = torch.arange(pairs) < n_in
    cls = torch.where(same, y[a], (y[a] + torch.randint(1, num_classes, (pairs,), generator=gen)) % num_classes)
    u = torch.rand(pairs, generator=gen)
    b = order[starts[cls] + (u * counts[cls]).long().clamp(max=counts[cls] - 1)]
    keep = a != b
    a, b = a[keep], b[keep]
    key = torch.unique(torch.cat([a * num_nodes + b, b * num_nodes + a]))
    src, dst = key // num_nodes, key % num_nodes
    centroids = torch.randn(num_classes, feat_dim, generator=gen) * signal
    x = centroids[y] + noise * torch.randn(num_nodes, feat_dim, generator=gen)
    return x, y, src, dst


class GCN(_ZooImpl):
    """Two graph convolutions (Kipf & Welling): h = relu(A_hat x W1 + b1), dropout, out = A_hat h W2 + b2, with
    A_hat = D^-1/2 (A + I) D^-1/2 (the Graph's gcn_weight per edge). Each layer applies its Linear first (to the
    narrower width), then aggregates."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, dropout: float = 0.5, impl: str = "tritium"):
        super().__init__(impl)
        self.lin1 = self.ops.Linear(in_dim, hidden, bias=False)
        self.lin2 = self.ops.Linear(hidden, num_classes, bias=False)
        self.bias1 = nn.Parameter(torch.zeros(hidden))
        self.bias2 = nn.Parameter(torch.zeros(num_classes))
        self.dropout = dropout

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        h = self.ops.relu(self.ops.aggregate(self.lin1(x), graph, graph.gcn_weight) + self.bias1)
        h = F.dropout(h, self.dropout, self.training)
        return self.ops.aggregate(self.lin2(h), graph, graph.gcn_weight) + self.bias2


class GATLayer(_ZooImpl):
    """One graph attention layer (Velickovic et al.): h = x W viewed (N, heads, channels); per node the scores
    a_src = <h, att_src>, a_dst = <h, att_dst> per head; out[i] = sum over i's in-edges of
    softmax_j(leaky_relu(a_src[j] + a_dst[i])) h[j]; heads concatenated (concat) or averaged, plus a bias."""

    def __init__(self, in_dim: int, channels: int, heads: int, concat: bool = True, negative_slope: float = 0.2,
                 impl: str = "tritium"):
        super().__init__(impl)
        self.heads, self.channels, self.concat, self.negative_slope = heads, channels, concat, negative_slope
        self.lin = self.ops.Linear(in_dim, heads * channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(heads, channels))
        self.att_dst = nn.Parameter(torch.empty(heads, channels))
        self.bias = nn.Parameter(torch.zeros(heads * channels if concat else channels))
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        h = self.lin(x).view(-1, self.heads, self.channels)
        a_src, a_dst = (h * self.att_src).sum(-1), (h * self.att_dst).sum(-1)
        out = self.ops.gat(h, a_src, a_dst, graph, self.negative_slope)
        out = out.flatten(1) if self.concat else out.mean(1)
        return out + self.bias


class GAT(_ZooImpl):
    """Two GAT layers: heads x hidden concatenated, ELU, dropout, then one averaged head to the classes."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int, heads: int = 4, dropout: float = 0.5,
                 impl: str = "tritium"):
        super().__init__(impl)
        self.conv1 = GATLayer(in_dim, hidden, heads, True, impl=impl)
        self.conv2 = GATLayer(hidden * heads, num_classes, 1, False, impl=impl)
        self.dropout = dropout

    def forward(self, x: Tensor, graph: Graph) -> Tensor:
        x = F.dropout(x, self.dropout, self.training)
        h = F.dropout(self.ops.elu(self.conv1(x, graph)), self.dropout, self.training)
        return self.conv2(h, graph)


def gnn_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, graph: Graph, y: Tensor,
             train_idx: Tensor) -> Tensor:
    """One full-graph training step: forward over every node, cross-entropy on the training nodes, backward,
    optimizer step."""
    logits = model(x, graph)
    loss = model.ops.cross_entropy(logits[train_idx], y[train_idx])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


@torch.no_grad()
def node_accuracy(model: nn.Module, x: Tensor, graph: Graph, y: Tensor, idx: Tensor) -> float:
    """The fraction of the nodes idx whose arg-max class (eval mode: no dropout) is their label."""
    model.eval()
    pred = model(x, graph).argmax(-1)
    return (pred[idx] == y[idx]).float().mean().item()


# ---------------------------------------------------------------------------------------------------------
# Kolmogorov-Arnold network (efficient-kan's KANLinear semantics)
# ---------------------------------------------------------------------------------------------------------
class KANLinear(_ZooImpl):
    """efficient-kan's KANLinear: y = SiLU(x) @ base_weight^T + sum_{i,c} B_c(x_i) scaled_spline_weight[o, i, c],
    the B-splines of order ``spline_order`` on a grid of ``grid_size`` intervals over ``grid_range`` extended by
    ``spline_order`` knots each side (the ``grid`` buffer, (in, grid_size + 2 order + 1), moved by
    ``update_grid``). scaled_spline_weight = spline_weight * spline_scaler[..., None] (the standalone scale).
    impl="tritium": tritium.silu, tritium.linear and the fused tritium.kan_spline; impl="torch": the same in plain
    torch ops with efficient-kan's basis recursion (tritium.reference.kan_b_splines)."""

    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, spline_order: int = 3,
                 scale_noise: float = 0.1, scale_base: float = 1.0, scale_spline: float = 1.0,
                 grid_eps: float = 0.02, grid_range: Tuple[float, float] = (-1.0, 1.0), impl: str = "tritium"):
        super().__init__(impl)
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.spline_order, self.grid_eps = grid_size, spline_order, grid_eps
        h = (grid_range[1] - grid_range[0]) / grid_size
        grid = (torch.arange(-spline_order, grid_size + spline_order + 1) * h + grid_range[0])
        self.register_buffer("grid", grid.expand(in_features, -1).contiguous())
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + spline_order))
        self.spline_scaler = nn.Parameter(torch.empty(out_features, in_features))
        self.scale_noise, self.scale_base, self.scale_spline = scale_noise, scale_base, scale_spline
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """efficient-kan's initialisation: Kaiming-uniform base weight and scaler, spline coefficients fitted to
        small noise at the grid points."""
        import math

        nn.init.kaiming_uniform_(self.base_weight, a=math.sqrt(5) * self.scale_base)
        noise = ((torch.rand(self.grid_size + 1, self.in_features, self.out_features) - 0.5) * self.scale_noise
                 / self.grid_size)
        self.spline_weight.copy_(self.curve2coeff(self.grid.T[self.spline_order:-self.spline_order], noise))
        nn.init.kaiming_uniform_(self.spline_scaler, a=math.sqrt(5) * self.scale_spline)

    def b_splines(self, x: Tensor) -> Tensor:
        """(N, in) -> (N, in, grid_size + order): the basis tensor (for update_grid and curve2coeff; the forward
        of impl="tritium" never forms it)."""
        from .. import reference

        return reference.kan_b_splines(x, self.grid, self.spline_order)

    def curve2coeff(self, x: Tensor, y: Tensor) -> Tensor:
        """Least-squares spline coefficients (out, in, bases) interpolating y (N, in, out) at x (N, in)."""
        a = self.b_splines(x).transpose(0, 1)                         # (in, N, bases)
        sol = torch.linalg.lstsq(a.double(), y.transpose(0, 1).double()).solution  # (in, bases, out)
        return sol.permute(2, 0, 1).to(x.dtype).contiguous()

    @property
    def scaled_spline_weight(self) -> Tensor:
        return self.spline_weight * self.spline_scaler.unsqueeze(-1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        base = self.ops.linear(self.ops.silu(x), self.base_weight)
        if self.impl == "tritium":
            import tritium

            spline = tritium.kan_spline(x, self.grid, self.scaled_spline_weight, self.spline_order)
        else:
            spline = F.linear(self.b_splines(x).view(x.shape[0], -1),
                              self.scaled_spline_weight.view(self.out_features, -1))
        return (base + spline).view(*shape[:-1], self.out_features)

    @torch.no_grad()
    def update_grid(self, x: Tensor, margin: float = 0.01) -> None:
        """efficient-kan's update_grid: knots at the quantiles of x (N, in) mixed with a uniform grid over its range
        (grid_eps of uniform), then spline coefficients refitted (least squares) so the spline term keeps its
        values on x. As in efficient-kan, the refitted coefficients (of the scaled weight) are stored in
        spline_weight and the scaler is left as it is."""
        batch = x.shape[0]
        splines = self.b_splines(x).permute(1, 0, 2)                     # (in, N, bases)
        unreduced = torch.bmm(splines, self.scaled_spline_weight.permute(1, 2, 0)).permute(1, 0, 2)  # (N, in, out)
        x_sorted = torch.sort(x, dim=0)[0]
        adaptive = x_sorted[torch.linspace(0, batch - 1, self.grid_size + 1, dtype=torch.int64, device=x.device)]
        step = (x_sorted[-1] - x_sorted[0] + 2 * margin) / self.grid_size
        uniform = (torch.arange(self.grid_size + 1, dtype=torch.float32, device=x.device).unsqueeze(1) * step
                   + x_sorted[0] - margin)
        grid = self.grid_eps * uniform + (1 - self.grid_eps) * adaptive
        k = self.spline_order
        grid = torch.cat([grid[:1] - step * torch.arange(k, 0, -1, device=x.device).unsqueeze(1), grid,
                          grid[-1:] + step * torch.arange(1, k + 1, device=x.device).unsqueeze(1)], dim=0)
        self.grid.copy_(grid.T)
        self.spline_weight.copy_(self.curve2coeff(x, unreduced))

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> Tensor:
        """efficient-kan's L1 + entropy regulariser on the spline coefficients."""
        l1 = self.spline_weight.abs().mean(-1)
        total = l1.sum()
        p = l1 / total
        return regularize_activation * total + regularize_entropy * -(p * p.log()).sum()


class KAN(_ZooImpl):
    """A stack of KANLinear layers of widths ``layers`` (e.g. (2, 8, 2)): efficient-kan's KAN. ``forward(x,
    update_grid=True)`` moves every layer's grid to the data passing through it first."""

    def __init__(self, layers: Sequence[int], grid_size: int = 5, spline_order: int = 3,
                 grid_range: Tuple[float, float] = (-1.0, 1.0), impl: str = "tritium"):
        super().__init__(impl)
        self.layers = nn.ModuleList(KANLinear(a, b, grid_size, spline_order, grid_range=grid_range, impl=impl)
                                    for a, b in zip(layers[:-1], layers[1:]))

    def forward(self, x: Tensor, update_grid: bool = False) -> Tensor:
        for layer in self.layers:
            if update_grid:
                layer.update_grid(x)
            x = layer(x)
        return x

    def regularization_loss(self, regularize_activation: float = 1.0, regularize_entropy: float = 1.0) -> Tensor:
        return sum(layer.regularization_loss(regularize_activation, regularize_entropy) for layer in self.layers)


def kan_step(model: KAN, opt: torch.optim.Optimizer, x: Tensor, y: Tensor) -> Tensor:
    """One training step of a KAN classifier: cross-entropy on the logits, backward, optimizer step."""
    loss = model.ops.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------
# WaveNet (dilated causal convolutions, gated residual units, mu-law classes)
# ---------------------------------------------------------------------------------------------------------
def mu_law_encode(x: Tensor, classes: int = 256) -> Tensor:
    """Waveform in [-1, 1] -> int64 classes in [0, classes): sign(x) ln(1 + mu |x|) / ln(1 + mu), mu = classes - 1,
    quantised uniformly."""
    mu = classes - 1
    y = torch.sign(x) * torch.log1p(mu * x.abs().clamp(max=1)) / torch.log1p(torch.tensor(float(mu)))
    return ((y + 1) / 2 * mu + 0.5).long().clamp(0, mu)


def mu_law_decode(c: Tensor, classes: int = 256) -> Tensor:
    """The inverse of mu_law_encode (class centres back to [-1, 1])."""
    mu = classes - 1
    y = c.float() / mu * 2 - 1
    return torch.sign(y) * ((1 + mu) ** y.abs() - 1) / mu


def sine_waves(n: int, length: int, seed: int = 0, components: int = 3) -> Tensor:
    """n waveforms (n, length) in [-1, 1]: each a sum of ``components`` sines with random frequencies (2 to 40
    periods per 1000 samples), phases and amplitudes, scaled to a peak of 0.9; seeded."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float64)
    freq = (torch.rand(n, components, 1, generator=gen, dtype=torch.float64) * 0.038 + 0.002) * 2 * torch.pi
    phase = torch.rand(n, components, 1, generator=gen, dtype=torch.float64) * 2 * torch.pi
    amp = torch.rand(n, components, 1, generator=gen, dtype=torch.float64) + 0.2
    w = (amp * torch.sin(freq * t + phase)).sum(1)
    return (0.9 * w / w.abs().amax(1, keepdim=True)).float()


def _causal_conv2_last(x: Tensor, weight: Tensor, bias: Optional[Tensor], d: int) -> Tensor:
    """Channels-last conv1d(F.pad(x, (d, 0)), weight, bias, dilation=d) for a width-2 kernel: x (B, T, R) ->
    (B, T, O), h[t] = W_0 x[t - d] + W_1 x[t] + b as one GEMM over [x shifted by d | x] (B, T, 2R). On CPU
    oneDNN's dilated convolution (its backward above all) is several times slower than this GEMM."""
    T = x.shape[1]
    k = min(d, T)  # the shifted copy: k rows of zeros, then x's first T - k rows
    stacked = torch.cat([F.pad(x[:, :T - k], (0, 0, k, 0)), x], 2)
    return F.linear(stacked, weight.transpose(1, 2).reshape(weight.shape[0], -1), bias)  # [W_0 | W_1]


class WaveNet(_ZooImpl):
    """WaveNet over mu-law classes: embedding (classes -> residual channels) -> causal conv (width 2) -> ``stacks``
    stacks of ``layers`` gated residual units with dilations 1, 2, ..., 2^(layers-1) -> ReLU(sum of skips) -> 1x1
    -> ReLU -> 1x1 -> (B, classes, T) logits of the next sample. A unit: h = dilated causal conv(x) (width 2,
    2 * gate channels), z = tanh(h_a) * sigmoid(h_b), x += 1x1_res(z), skip += 1x1_skip(z). impl="torch": the unit
    as plain torch ops (separate tanh, sigmoid, product and 1x1 convolutions) and nn.Conv1d's dilated
    convolutions. impl="tritium" (the same weights and state_dict) runs channels last, every convolution a GEMM over
    the rows (the width-2 dilated ones over the input stacked with its shifted copy, ``_causal_conv2_last``), the
    gate on the fused tritium.wavenet_gate kernel, and all units' skip projections as one GEMM."""

    def __init__(self, classes: int = 256, residual: int = 32, gate: int = 32, skip: int = 64, layers: int = 6,
                 stacks: int = 2, impl: str = "tritium"):
        super().__init__(impl)
        self.classes = classes
        self.dilations = [2 ** i for i in range(layers)] * stacks
        self.embed = nn.Embedding(classes, residual)
        self.causal = nn.Conv1d(residual, residual, 2)
        self.dilated = nn.ModuleList(nn.Conv1d(residual, 2 * gate, 2, dilation=d) for d in self.dilations)
        self.res = nn.ModuleList(nn.Conv1d(gate, residual, 1) for _ in self.dilations)
        self.skip = nn.ModuleList(nn.Conv1d(gate, skip, 1) for _ in self.dilations)
        self.out1 = nn.Conv1d(skip, skip, 1)
        self.out2 = nn.Conv1d(skip, classes, 1)

    @property
    def receptive_field(self) -> int:
        return 2 + sum(self.dilations)

    def forward(self, c: Tensor) -> Tensor:  # (B, T) int64 classes -> (B, classes, T) logits of c[:, t + 1]
        if self.impl == "tritium":  # the logits returned as (B, classes, T) views of the (B, T, classes) product
            y = self._hidden_channels_last(c)
            return F.linear(y, self.out2.weight.squeeze(-1), self.out2.bias).transpose(1, 2)
        x = self.embed(c).transpose(1, 2)
        x = self.causal(F.pad(x, (1, 0)))
        skips = None
        for d, dil, res, skip in zip(self.dilations, self.dilated, self.res, self.skip):
            h = dil(F.pad(x, (d, 0)))
            a, g = h.chunk(2, 1)
            z = torch.tanh(a) * torch.sigmoid(g)
            x, s = x + res(z), skip(z)
            skips = s if skips is None else skips + s
        return self.out2(self.ops.relu(self.out1(self.ops.relu(skips))))

    def _hidden_channels_last(self, c: Tensor) -> Tensor:
        """impl="tritium": the network up to the output layer's input, (B, T, skip) after out1's ReLU, channels
        last: every convolution a GEMM over the rows (the 1x1 ones F.linear on the squeezed weights, the width-2
        ones _causal_conv2_last), each unit's gate tritium.wavenet_gate. The skip projections of all units are
        one GEMM: sum_i W_i z_i + b_i = [W_1 .. W_n] [z_1; ..; z_n] + sum_i b_i over the gates' outputs side by
        side (one product of reduction n C instead of n products of C and n - 1 additions, and as much in the
        backward); the last unit's residual output feeds nothing, so it is not computed."""
        import tritium

        x = _causal_conv2_last(self.embed(c), self.causal.weight, self.causal.bias, 1)
        zs = []
        for i, (d, dil, res) in enumerate(zip(self.dilations, self.dilated, self.res)):
            h = _causal_conv2_last(x, dil.weight, dil.bias, d)
            B, T, C2 = h.shape
            z = tritium.wavenet_gate(h.reshape(B * T, C2, 1)).view(B, T, C2 // 2)  # channels last, T = 1
            zs.append(z)
            if i + 1 < len(self.dilations):
                x = x + F.linear(z, res.weight.squeeze(-1), res.bias)
        w_skip = torch.cat([s.weight.squeeze(-1) for s in self.skip], 1)
        b_skip = torch.stack([s.bias for s in self.skip]).sum(0)
        skips = F.linear(torch.cat(zs, -1), w_skip, b_skip)
        return self.ops.relu(F.linear(self.ops.relu(skips), self.out1.weight.squeeze(-1), self.out1.bias))

    def loss(self, c: Tensor) -> Tensor:
        """Next-sample cross-entropy over a batch of class sequences (B, T + 1): predict c[:, 1:] from c[:, :-1]."""
        logits = self(c[:, :-1])
        return self.ops.cross_entropy(logits.transpose(1, 2).reshape(-1, self.classes), c[:, 1:].reshape(-1))


def wavenet_step(model: WaveNet, opt: torch.optim.Optimizer, c: Tensor) -> Tensor:
    """One training step on class sequences (B, T + 1): next-sample loss, backward, optimizer step."""
    loss = model.loss(c)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


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


ZOO_MODELS: Sequence[str] = ("siamese", "gan", "gcn", "gat", "kan", "wavenet")

__all__ = ["Siamese", "Generator", "Discriminator", "GAN", "LOSSES", "ZOO_MODELS", "IMPLS", "ops", "sample_batch",
           "siamese_step", "gan_step", "gan_optimizers", "embed", "nearest_neighbour_accuracy",
           "retrieval_accuracy", "png_grid", "sample_score", "Graph", "build_graph", "stochastic_block_model",
           "GCN", "GATLayer", "GAT", "gnn_step", "node_accuracy", "KANLinear", "KAN", "kan_step", "WaveNet",
           "wavenet_step", "mu_law_encode", "mu_law_decode", "sine_waves"]
