"""The classic models on tritium against their plain-PyTorch twins: same state_dict, same outputs and parameter
gradients (float32, small sizes); a convergence test training each digits model from the same seed twice."""
import copy

import pytest
import torch

from tritium.models import classic
from tritium.models.classic import (DIGITS, MLP, VAE, AutoEncoder, LeNet, ResNet, RNNClassifier,
                                    TransformerEncoder, ViT)


def _pair(factory):
    torch.manual_seed(0)
    ours = factory("tritium")
    twin = factory("torch")
    twin.load_state_dict(ours.state_dict())  # the same module tree: the state_dict loads both ways
    assert list(ours.state_dict()) == list(twin.state_dict())
    return ours, twin


def _grads(model, out):
    g = torch.Generator().manual_seed(1)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, [p for p in model.parameters()], allow_unused=True)


def _check(ours, twin, *inputs, rtol=1e-4, atol=1e-5, train=True):
    ours.train(train)
    twin.train(train)
    torch.manual_seed(2)
    a = ours(*inputs)
    torch.manual_seed(2)
    b = twin(*inputs)
    for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)
    for (name, _), ga, gb in zip(ours.named_parameters(), _grads(ours, a), _grads(twin, b)):
        assert (ga is None) == (gb is None), name
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


MODELS = {
    "mlp-gelu": (lambda impl: MLP(13, 17, 3, 5, activation="gelu", impl=impl), lambda: (torch.randn(4, 13),)),
    "mlp-silu-dropout": (lambda impl: MLP(13, 17, 2, 5, activation="silu", dropout=0.3, impl=impl),
                         lambda: (torch.randn(4, 13),)),
    "autoencoder": (lambda impl: AutoEncoder(12, 16, 3, impl=impl), lambda: (torch.rand(4, 12),)),
    "lenet": (lambda impl: LeNet(1, 10, 8, impl=impl), lambda: (torch.randn(3, 1, 8, 8),)),
    "resnet": (lambda impl: ResNet(1, 10, (8, 16), (1, 1), impl=impl), lambda: (torch.randn(3, 1, 8, 8),)),
    "lstm-bi-2": (lambda impl: RNNClassifier("lstm", 5, 9, 4, num_layers=2, bidirectional=True, impl=impl),
                  lambda: (torch.randn(3, 6, 5),)),
    "gru": (lambda impl: RNNClassifier("gru", 5, 9, 4, impl=impl), lambda: (torch.randn(3, 6, 5),)),
    "vit": (lambda impl: ViT(8, 2, 1, 32, 2, 4, 10, mlp_ratio=2, impl=impl), lambda: (torch.randn(3, 1, 8, 8),)),
}


@pytest.mark.parametrize("name", MODELS)
def test_twin_outputs_and_grads(name):
    factory, make = MODELS[name]
    ours, twin = _pair(factory)
    _check(ours, twin, *make())


def test_resnet_eval_uses_running_stats():
    ours, twin = _pair(lambda impl: ResNet(1, 10, (8, 16), (1, 1), impl=impl))
    x = torch.randn(5, 1, 8, 8)
    ours.train()(x), twin.train()(x)  # update the running statistics identically
    _check(ours, twin, x, train=False)


@pytest.mark.parametrize("pre_norm", [False, True])
def test_encoder_with_padding_mask(pre_norm):
    ours, twin = _pair(lambda impl: TransformerEncoder(11, 9, 32, 2, 4, 3, pre_norm=pre_norm, impl=impl))
    tokens = torch.randint(0, 11, (3, 9))
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 2:] = True
    _check(ours, twin, tokens, pad)
    # padding really is ignored: changing padded tokens does not change the output
    tokens2 = tokens.clone()
    tokens2[pad] = (tokens2[pad] + 1) % 11
    ours.eval()
    torch.testing.assert_close(ours(tokens, pad), ours(tokens2, pad))


@pytest.mark.parametrize("model", ["vit", "encoder-post", "encoder-pre-mask"])
@pytest.mark.parametrize("impl", ["tritium", "torch"])
def test_cls_only_last_block(model, impl):
    """The last block on the [CLS] row alone (tritium's default) gives the outputs and every gradient of the full
    block, in either impl, and each default is what the docs say."""
    torch.manual_seed(0)
    if model == "vit":
        def make(c):
            return ViT(8, 2, 1, 32, 2, 4, 10, mlp_ratio=2, impl=impl, cls_only=c)
        inputs = (torch.randn(3, 1, 8, 8),)
    else:
        pre = model == "encoder-pre-mask"
        def make(c):
            return TransformerEncoder(11, 9, 32, 2, 4, 3, pre_norm=pre, impl=impl, cls_only=c)
        pad = torch.zeros(3, 9, dtype=torch.bool)
        pad[1, 4:] = True
        inputs = (torch.randint(0, 11, (3, 9)), pad if pre else None)
    full, pruned = make(False), make(True)
    pruned.load_state_dict(full.state_dict())
    assert (full.cls_only, pruned.cls_only, make(None).cls_only) == (False, True, impl == "tritium")
    _check(pruned, full, *inputs)
    # the pruned last block really computes one row: its FFN sees (B, 1, D)
    seen = []
    hook = pruned.blocks[-1].fc1.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    pruned(*inputs)
    hook.remove()
    assert seen == [(3, 1, 32)]


def test_vae_elbo():
    ours, twin = _pair(lambda impl: VAE(12, 16, 3, impl=impl))
    x = torch.rand(4, 12)
    eps = torch.randn(4, 3)
    _check(ours, twin, x, eps)
    recon, mu, logvar = ours(x, eps)
    loss = VAE.elbo_loss(recon, x, mu, logvar)
    # the KL term of a standard-normal posterior is zero; the loss is a positive per-sample scalar
    assert loss.dim() == 0 and loss.item() > 0
    kl0 = VAE.elbo_loss(recon, x, torch.zeros_like(mu), torch.zeros_like(logvar))
    recon_only = torch.nn.functional.binary_cross_entropy_with_logits(recon, x, reduction="sum") / 4
    torch.testing.assert_close(kl0, recon_only)


def test_unknown_impl():
    with pytest.raises(ValueError):
        MLP(2, 2, 1, 2, impl="numpy")


# ---- convergence: the same seed, the same batches, tritium vs the twin, step by step ----
STEPS = 8


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_convergence_matches_twin(name):
    from tritium.cli.train import RECIPES, digits, train_steps

    x, y, _, _ = digits()
    runs = {}
    for impl in ("tritium", "torch"):
        torch.manual_seed(0)
        model, transform = classic.build(name, impl)
        torch.manual_seed(1)  # dropout masks drawn identically
        losses = train_steps(model, transform, x, y, RECIPES[name], STEPS, seed=0)
        runs[impl] = (losses, copy.deepcopy(model.state_dict()))
    (la, pa), (lb, pb) = runs["tritium"], runs["torch"]
    assert la[-1] < la[0], f"{name}: the loss did not go down ({la[0]:.3f} -> {la[-1]:.3f})"
    # float32 rounding differences (the fused cross-entropy / norm kernels reduce in another order) compound over
    # optimiser steps, most in train-mode BatchNorm (ResNet): ~1e-3 relative after 8 steps; a wrong gradient
    # anywhere gives differences of order 1 within a couple of steps.
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=2e-3, atol=1e-3)
    for k in pa:
        a, b = pa[k], pb[k]
        if k.endswith("attn.qkv.bias"):
            # the key bias shifts every score of a query row by the same amount, which softmax cancels: its
            # gradient is zero in exact arithmetic and pure rounding noise in float32, and Adam's normalisation
            # turns that noise into lr-sized steps. Compare the query and value biases only.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d:]]), torch.cat([b[:d], b[2 * d:]])
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-4, msg=lambda m: f"{name}.{k}: {m}")
