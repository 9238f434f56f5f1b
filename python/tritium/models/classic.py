"""The classic architectures on tritium ops: MLP, autoencoder, VAE, LeNet-style CNN, small ResNet, LSTM/GRU
classifiers, a BERT-style Transformer encoder and a ViT.

Every model takes ``impl="tritium"`` (its activations, norms, attention, losses and recurrent cells are
tritium's) or ``impl="torch"`` (the plain-PyTorch twin: the same module tree calling torch ops only; the
tritium impl's linear layers are tritium.nn.Linear, a torch.nn.Linear subclass). The two have the same structure
and state_dicts, so one's weights load into the other:

    model = MLP(64, 128, 2, 10)                       # tritium
    twin = MLP(64, 128, 2, 10, impl="torch")          # plain PyTorch
    twin.load_state_dict(model.state_dict())

Convolutions and embeddings stay torch's; linear layers are ``tritium.nn.Linear`` (torch.nn.Linear whose
products run on tritium's panel GEMM on CPU from 64 rows) in the tritium impl; what runs between them comes from
the ``ops(impl)`` table below. ``DIGITS`` registers the configurations ``tritium train`` uses on scikit-learn's
8x8 digits.

The transformers' classifiers read the [CLS] row alone, so by default tritium's run their last block on that row
only (``cls_only``: the other rows still give it keys and values); the twin computes every row as torchvision's
and timm's models do, and takes ``cls_only=True`` for the same pruning in torch ops. Outputs and gradients are
the same either way.
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMPLS = ("tritium", "torch")

# ---- the op table: what each impl calls between the matmuls ----
def _torch_bn_act(bn: nn.Module, x: Tensor, activation: str, residual: Optional[Tensor] = None) -> Tensor:
    """act(bn(x) + residual), torch's way."""
    y = bn(x)
    return getattr(F, activation)(y if residual is None else y + residual)


def _tritium_bn_act(bn: nn.Module, x: Tensor, activation: str, residual: Optional[Tensor] = None) -> Tensor:
    """act(bn(x) + residual): in inference (eval with running statistics) one fused pass (tritium.batch_norm_act);
    in training torch's BatchNorm (batch statistics, running-stat updates), then tritium's add and activation."""
    import tritium

    if bn.training or bn.running_mean is None:
        y = bn(x)
        return getattr(tritium, activation)(y if residual is None else y + residual)
    return tritium.batch_norm_act(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps, activation,
                                  residual)


_TORCH = SimpleNamespace(
    relu=F.relu, gelu=F.gelu, silu=F.silu, tanh=torch.tanh, sigmoid=torch.sigmoid,
    layer_norm=F.layer_norm, scaled_dot_product_attention=F.scaled_dot_product_attention,
    cross_entropy=F.cross_entropy, lstm=nn.LSTM, gru=nn.GRU, Linear=nn.Linear, linear=F.linear,
    bn_act=_torch_bn_act,
)


def _tritium_table() -> SimpleNamespace:
    import tritium
    import tritium.nn

    return SimpleNamespace(relu=tritium.relu, gelu=tritium.gelu, silu=tritium.silu, tanh=tritium.tanh,
                           sigmoid=tritium.sigmoid, layer_norm=tritium.layer_norm,
                           scaled_dot_product_attention=tritium.scaled_dot_product_attention,
                           cross_entropy=tritium.cross_entropy, lstm=tritium.nn.LSTM, gru=tritium.nn.GRU,
                           Linear=tritium.nn.Linear, linear=tritium.linear, bn_act=_tritium_bn_act)


def ops(impl: str) -> SimpleNamespace:
    if impl == "torch":
        return _TORCH
    if impl == "tritium":
        return _tritium_table()
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


class _Impl(nn.Module):
    """Base: remembers impl and resolves its op table."""

    def __init__(self, impl: str):
        super().__init__()
        self.impl = impl
        self.ops = ops(impl)

    def activation(self, name: str, x: Tensor) -> Tensor:
        return getattr(self.ops, name)(x)


# ---------------------------------------------------------------------------------------------------------
# MLP, autoencoder, VAE
# ---------------------------------------------------------------------------------------------------------
class MLP(_Impl):
    """in_dim -> [Linear -> activation -> dropout] x depth -> Linear -> out_dim."""

    def __init__(self, in_dim: int, hidden: int, depth: int, out_dim: int, activation: str = "relu",
                 dropout: float = 0.0, impl: str = "tritium"):
        super().__init__(impl)
        dims = [in_dim] + [hidden] * depth
        self.layers = nn.ModuleList(self.ops.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.out = self.ops.Linear(dims[-1], out_dim)
        self.act, self.dropout = activation, dropout

    def forward(self, x: Tensor) -> Tensor:  # (B, in_dim) -> (B, out_dim)
        for layer in self.layers:
            x = F.dropout(self.activation(self.act, layer(x)), self.dropout, self.training)
        return self.out(x)


class AutoEncoder(_Impl):
    """x -> MLP encoder -> latent -> MLP decoder -> reconstruction logits (sigmoid gives the image)."""

    def __init__(self, in_dim: int, hidden: int, latent: int, activation: str = "relu", impl: str = "tritium"):
        super().__init__(impl)
        self.encoder = MLP(in_dim, hidden, 1, latent, activation, impl=impl)
        self.decoder = MLP(latent, hidden, 1, in_dim, activation, impl=impl)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, x: Tensor) -> Tensor:
        return F.mse_loss(self.ops.sigmoid(self(x)), x)


class VAE(_Impl):
    """Variational autoencoder: the encoder gives (mu, logvar), z = mu + eps * exp(logvar / 2)
    (reparameterisation), the decoder gives Bernoulli logits; ``elbo_loss`` is the negative ELBO per sample."""

    def __init__(self, in_dim: int, hidden: int, latent: int, activation: str = "relu", impl: str = "tritium"):
        super().__init__(impl)
        self.encoder = MLP(in_dim, hidden, 1, 2 * latent, activation, impl=impl)
        self.decoder = MLP(latent, hidden, 1, in_dim, activation, impl=impl)
        self.latent = latent

    def forward(self, x: Tensor, eps: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        mu, logvar = self.encoder(x).chunk(2, -1)                      # (B, latent) each
        if eps is None:
            eps = torch.randn_like(mu)
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decoder(z), mu, logvar

    @staticmethod
    def elbo_loss(recon_logits: Tensor, x: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        recon = F.binary_cross_entropy_with_logits(recon_logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (recon + kl) / x.shape[0]


# ---------------------------------------------------------------------------------------------------------
# CNNs
# ---------------------------------------------------------------------------------------------------------
class LeNet(_Impl):
    """LeNet-style: [conv3x3 -> act -> maxpool2] x 2 -> fc -> act -> fc -> act -> fc. For image_size 8:
    8x8 -> 4x4 -> 2x2."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 8, channels=(16, 32),
                 activation: str = "relu", impl: str = "tritium"):
        super().__init__(impl)
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.conv2 = nn.Conv2d(channels[0], channels[1], 3, padding=1)
        flat = channels[1] * (image_size // 4) ** 2
        lin = self.ops.Linear
        self.fc1, self.fc2, self.fc3 = lin(flat, 120), lin(120, 84), lin(84, num_classes)
        self.act = activation

    def forward(self, x: Tensor) -> Tensor:  # (B, C, S, S) -> (B, classes)
        x = F.max_pool2d(self.activation(self.act, self.conv1(x)), 2)
        x = F.max_pool2d(self.activation(self.act, self.conv2(x)), 2)
        x = self.activation(self.act, self.fc1(x.flatten(1)))
        return self.fc3(self.activation(self.act, self.fc2(x)))


class BasicBlock(_Impl):
    """conv3x3 -> BN -> act -> conv3x3 -> BN, plus the (1x1 conv + BN when the shape changes) shortcut, -> act.
    In inference the tritium impl runs each BN with its activation (and the second with the shortcut's add) as
    one fused pass (tritium.batch_norm_act)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, impl: str = "tritium"):
        super().__init__(impl)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.ops.bn_act(self.bn1, self.conv1(x), "relu")
        return self.ops.bn_act(self.bn2, self.conv2(out), "relu", self.shortcut(x))


class ResNet(_Impl):
    """A small ResNet: conv3x3 stem + BN + act, stages of BasicBlocks (stride 2 between stages), global average
    pool, linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths=(16, 32), blocks=(2, 2),
                 impl: str = "tritium"):
        super().__init__(impl)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, impl=impl))
                cin = w
        self.blocks = nn.Sequential(*layers)
        self.head = self.ops.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, S, S) -> (B, classes)
        x = self.blocks(self.ops.bn_act(self.bn, self.stem(x), "relu"))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------------------
# RNN classifier
# ---------------------------------------------------------------------------------------------------------
class RNNClassifier(_Impl):
    """LSTM or GRU over a (B, T, features) sequence (batch_first), linear head on the last step's output."""

    def __init__(self, cell: str, input_size: int, hidden: int, num_classes: int, num_layers: int = 1,
                 bidirectional: bool = False, impl: str = "tritium"):
        super().__init__(impl)
        rnn_cls = {"lstm": self.ops.lstm, "gru": self.ops.gru}[cell]
        self.rnn = rnn_cls(input_size, hidden, num_layers, batch_first=True, bidirectional=bidirectional)
        self.head = self.ops.Linear(hidden * (2 if bidirectional else 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, F) -> (B, classes)
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


# ---------------------------------------------------------------------------------------------------------
# Transformer encoder (BERT-style) and ViT
# ---------------------------------------------------------------------------------------------------------
class Attention(_Impl):
    def __init__(self, dim: int, heads: int, impl: str = "tritium"):
        super().__init__(impl)
        self.heads = heads
        self.qkv = self.ops.Linear(dim, 3 * dim)
        self.proj = self.ops.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, rows: Optional[int] = None) -> Tensor:
        """x (B, S, D), mask (B, 1, 1, S) -> (B, S, D); with ``rows``, only the first ``rows`` query positions
        (-> (B, rows, D)): their queries are projected alone, keys and values from every position."""
        B, S, D = x.shape
        h, d = self.heads, D // self.heads
        if rows is None:
            q, k, v = self.qkv(x).view(B, S, 3, h, d).permute(2, 0, 3, 1, 4)                   # (B, h, S, d)
        else:  # the weight's rows [0, D) make q, [D, 3D) k and v: two products on contiguous slices
            w, b = self.qkv.weight, self.qkv.bias
            q = self.ops.linear(x[:, :rows], w[:D], b[:D]).view(B, rows, h, d).transpose(1, 2)
            k, v = self.ops.linear(x, w[D:], b[D:]).view(B, S, 2, h, d).permute(2, 0, 3, 1, 4)
        o = self.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask)                     # (B, h, L, d)
        return self.proj(o.transpose(1, 2).reshape(B, q.shape[2], D))


class Block(_Impl):
    """Transformer block: attention and a GELU FFN, each in a residual branch; pre-norm (LN inside the branch)
    or post-norm (LN after the residual add, as BERT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4, pre_norm: bool = True, dropout: float = 0.0,
                 impl: str = "tritium"):
        super().__init__(impl)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, impl=impl)
        self.fc1, self.fc2 = self.ops.Linear(dim, mlp_ratio * dim), self.ops.Linear(mlp_ratio * dim, dim)
        self.pre_norm, self.dropout = pre_norm, dropout

    def _ln(self, norm: nn.LayerNorm, x: Tensor) -> Tensor:
        return self.ops.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    def _ffn(self, x: Tensor) -> Tensor:
        return F.dropout(self.fc2(self.ops.gelu(self.fc1(x))), self.dropout, self.training)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, rows: Optional[int] = None) -> Tensor:
        """(B, S, D) -> (B, S, D), or with ``rows`` the first ``rows`` positions' outputs only (B, rows, D): every
        position still feeds the attention's keys and values, the rest of the block runs on those rows alone."""
        keep = x if rows is None else x[:, :rows]
        if self.pre_norm:
            x = keep + F.dropout(self.attn(self._ln(self.norm1, x), mask, rows), self.dropout, self.training)
            return x + self._ffn(self._ln(self.norm2, x))
        x = self._ln(self.norm1, keep + F.dropout(self.attn(x, mask, rows), self.dropout, self.training))
        return self._ln(self.norm2, x + self._ffn(x))


def _cls_only(cls_only: Optional[bool], impl: str) -> bool:
    """The default of the transformers' ``cls_only``: on for tritium's models, off for the plain-PyTorch twin
    (which computes every row of its last block, as torchvision's and timm's models do)."""
    return impl == "tritium" if cls_only is None else bool(cls_only)


def _run_blocks(blocks: nn.ModuleList, x: Tensor, mask: Optional[Tensor], cls_only: bool) -> Tensor:
    """The blocks in turn; with ``cls_only`` the last one computes the [CLS] row alone (the head reads nothing
    else, so the other rows' attention output, FFN and norms there are dead work): (B, S, D) -> (B, 1 or S, D).
    Outputs and every gradient are the same either way."""
    for i, block in enumerate(blocks):
        x = block(x, mask, 1 if cls_only and i == len(blocks) - 1 else None)
    return x


class TransformerEncoder(_Impl):
    """BERT-style encoder classifier: token + learned position embeddings (+ a [CLS] token first), embedding
    LayerNorm, ``depth`` blocks, the [CLS] output (final LayerNorm when pre-norm) into a linear head.
    ``padding_mask`` (B, S) bool marks padding tokens (True = ignore). ``cls_only``: the last block on the [CLS]
    row alone (default: tritium's impl yes, the twin no)."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, heads: int, num_classes: int,
                 pre_norm: bool = False, mlp_ratio: int = 4, dropout: float = 0.0, impl: str = "tritium",
                 cls_only: Optional[bool] = None):
        super().__init__(impl)
        self.cls_only = _cls_only(cls_only, impl)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len + 1, dim) * 0.02)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.emb_norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, pre_norm, dropout, impl) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = self.ops.Linear(dim, num_classes)
        self.pre_norm = pre_norm

    def forward(self, tokens: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:  # (B, S) -> (B, C)
        B, S = tokens.shape
        x = torch.cat([self.cls.expand(B, -1, -1), self.tok(tokens)], 1) + self.pos[:, :S + 1]  # (B, S+1, D)
        x = self.ops.layer_norm(x, self.emb_norm.normalized_shape, self.emb_norm.weight, self.emb_norm.bias,
                                self.emb_norm.eps)
        mask = None
        if padding_mask is not None:  # True = attend; the [CLS] position is always visible
            keep = torch.cat([padding_mask.new_zeros(B, 1), padding_mask], 1).logical_not()
            mask = keep[:, None, None, :]                                                       # (B, 1, 1, S+1)
        cls = _run_blocks(self.blocks, x, mask, self.cls_only)[:, 0]
        if self.pre_norm:
            cls = self.ops.layer_norm(cls, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                                      self.norm.eps)
        return self.head(cls)


class ViT(_Impl):
    """Vision Transformer: patch embedding (a strided conv), [CLS] token, learned positions, pre-norm blocks,
    final LayerNorm, linear head on [CLS]. ``cls_only`` as in TransformerEncoder."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int, depth: int, heads: int,
                 num_classes: int, mlp_ratio: int = 4, dropout: float = 0.0, impl: str = "tritium",
                 cls_only: Optional[bool] = None):
        super().__init__(impl)
        self.cls_only = _cls_only(cls_only, impl)
        n = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, True, dropout, impl) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = self.ops.Linear(dim, num_classes)

    def forward(self, images: Tensor) -> Tensor:  # (B, C, S, S) -> (B, classes)
        x = self.patch(images).flatten(2).transpose(1, 2)                                # (B, N, D)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos              # (B, N+1, D)
        x = _run_blocks(self.blocks, x, None, self.cls_only)
        cls = self.ops.layer_norm(x[:, 0], self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                                  self.norm.eps)
        return self.head(cls)


# ---------------------------------------------------------------------------------------------------------
# The digits configurations (`tritium train`): model factory and how a batch of 8x8 images in [0, 1] (B, 64)
# becomes that model's input.
# ---------------------------------------------------------------------------------------------------------
def _images(x: Tensor) -> Tensor:
    return x.view(-1, 1, 8, 8)


def _rows(x: Tensor) -> Tensor:
    return x.view(-1, 8, 8)  # an image read row by row: 8 steps of 8 pixels


def _tokens(x: Tensor) -> Tensor:
    return (x * 16).round().long()  # the 17 grey levels of the digits as a 64-token sequence


DIGITS: Dict[str, Tuple[Callable[[str], nn.Module], Callable[[Tensor], Tensor]]] = {
    "mlp": (lambda impl: MLP(64, 256, 2, 10, dropout=0.1, impl=impl), lambda x: x),
    "cnn": (lambda impl: LeNet(1, 10, 8, impl=impl), _images),
    "resnet": (lambda impl: ResNet(1, 10, (16, 32), (2, 2), impl=impl), _images),
    "lstm": (lambda impl: RNNClassifier("lstm", 8, 128, 10, impl=impl), _rows),
    "gru": (lambda impl: RNNClassifier("gru", 8, 128, 10, impl=impl), _rows),
    "vit": (lambda impl: ViT(8, 2, 1, 64, 4, 4, 10, mlp_ratio=2, impl=impl), _images),
    "encoder": (lambda impl: TransformerEncoder(17, 64, 64, 2, 4, 10, pre_norm=True, mlp_ratio=2, impl=impl),
                _tokens),
}


def build(name: str, impl: str = "tritium") -> Tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """(model, input transform) of a registered digits configuration."""
    try:
        factory, transform = DIGITS[name]
    except KeyError:
        raise ValueError(f"model must be one of {sorted(DIGITS)}, got {name!r}") from None
    return factory(impl), transform


__all__ = ["MLP", "AutoEncoder", "VAE", "LeNet", "BasicBlock", "ResNet", "RNNClassifier", "Attention", "Block",
           "TransformerEncoder", "ViT", "DIGITS", "build", "ops", "IMPLS"]
