"""tritium.models.zoo (issue 26): the Siamese embedding network and the DCGAN-style GAN on tritium ops against
their plain-PyTorch twins (same state_dict, same outputs and parameter gradients in float32), the batch sampler
and PNG writer, and each training recipe reaching a stated quality on held-out digits in a short run."""
import struct
import zlib

import pytest
import torch
import torch.nn.functional as F

from tritium.models.zoo import GAN, LOSSES, Siamese, png_grid, sample_batch, sample_score
from tests.util import need


def _pair(factory):
    torch.manual_seed(0)
    ours, twin = factory("tritium"), factory("torch")
    twin.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(twin.state_dict())
    return ours, twin


def _assert_grads(ours, twin, rtol=1e-4, atol=1e-5):
    for (name, pa), pb in zip(ours.named_parameters(), twin.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("loss", LOSSES)
def test_siamese_twin_outputs_losses_and_grads(loss):
    ours, twin = _pair(lambda impl: Siamese(embed_dim=12, channels=(4, 6), hidden=20, loss=loss, impl=impl))
    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(7, 1, 8, 8, generator=gen), torch.rand(7, 1, 8, 8, generator=gen)
    c = {"triplet": torch.rand(7, 1, 8, 8, generator=gen), "contrastive": torch.tensor([1., 0, 1, 0, 0, 1, 1]),
         "info_nce": torch.empty(0)}[loss]
    ea, eb = ours(a), twin(a)
    torch.testing.assert_close(ea, eb, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ea.norm(dim=1), torch.ones(7))  # unit embeddings
    la, lb = ours.loss(a, b, c), twin.loss(a, b, c)
    assert la.item() > 0
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-6)
    la.backward()
    lb.backward()
    _assert_grads(ours, twin)


def test_gan_twin_outputs_losses_and_grads():
    ours, twin = _pair(lambda impl: GAN(latent=5, channels=6, d_channels=4, impl=impl))
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(6, 5, generator=gen)
    real = torch.rand(6, 1, 8, 8, generator=gen) * 2 - 1
    fa, fb = ours.generator(z), twin.generator(z)
    assert fa.shape == (6, 1, 8, 8) and fa.abs().max() <= 1
    torch.testing.assert_close(fa, fb, rtol=1e-4, atol=1e-5)
    # the discriminator's loss (fakes detached: no generator gradient) and the generator's
    da, db = ours.d_loss(real, fa), twin.d_loss(real, fb)
    torch.testing.assert_close(da, db, rtol=1e-4, atol=1e-6)
    da.backward()
    db.backward()
    assert all(p.grad is None for p in ours.generator.parameters())
    _assert_grads(ours, twin)
    ours.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    ga, gb = ours.g_loss(fa), twin.g_loss(fb)
    torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    ga.backward()
    gb.backward()
    assert all(p.grad is not None for p in ours.generator.parameters())
    _assert_grads(ours, twin)
    # sampling uses BatchNorm's running statistics and leaves the generator in its mode
    sa = ours.sample(4, torch.Generator().manual_seed(3))
    sb = twin.sample(4, torch.Generator().manual_seed(3))
    assert ours.generator.training and sa.min() >= 0 and sa.max() <= 1
    torch.testing.assert_close(sa, sb, rtol=1e-4, atol=1e-5)


def test_unknown_loss_and_impl():
    with pytest.raises(ValueError, match="loss must be one of"):
        Siamese(loss="hinge")
    with pytest.raises(ValueError, match="impl must be one of"):
        GAN(impl="numpy")


@pytest.mark.parametrize("loss", LOSSES)
def test_sample_batch(loss):
    y = torch.arange(10).repeat_interleave(torch.arange(3, 13))  # unequal class sizes
    a, b, c = sample_batch(y, 40, loss, torch.Generator().manual_seed(0))
    assert len(a) == len(b) == 40 and int(a.max()) < len(y) and int(b.max()) < len(y)
    if loss == "triplet":
        assert (y[a] == y[b]).all() and (y[a] != y[c]).all()
    elif loss == "contrastive":
        assert ((y[a] == y[b]) == c.bool()).all() and c.sum() == 20
    else:  # every class once before any repeats; no third image (an empty index)
        assert (y[a] == y[b]).all() and c.numel() == 0 and c.dtype == torch.long
        for r in range(4):
            assert sorted(y[a[10 * r:10 * r + 10]].tolist()) == list(range(10))


def _read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    rows = [raw[i * (w + 1):(i + 1) * (w + 1)] for i in range(h)]
    assert depth == 8 and colour == 0 and all(r[0] == 0 for r in rows)
    return torch.tensor([list(r[1:]) for r in rows])


def test_png_grid(tmp_path):
    imgs = torch.zeros(3, 1, 2, 3)
    imgs[1, 0, 0, 2] = 1.0   # one full-ink pixel in the second image
    png_grid(imgs, str(tmp_path / "g.png"), cols=2, scale=2, pad=1)
    px = _read_png(tmp_path / "g.png")
    assert px.shape == (2 * (2 * 2 + 1) + 1, 2 * (3 * 2 + 1) + 1)
    # the second image starts at column 1 + 7; its pixel (0, 2) is the 2x2 block at rows 1-2, cols 8+4, 8+5
    assert (px[1:3, 12:14] == 0).all() and (px == 0).sum() == 4
    assert (px[px != 0] == 255).all()  # everything else white (no ink)


def test_sample_score():
    probs = torch.tensor([[0.95, 0.05, 0.0], [0.05, 0.95, 0.0], [0.5, 0.5, 0.0], [0.99, 0.01, 0.0]])
    s = sample_score(probs)
    assert s["confident"] == 0.75 and s["classes"] == 2 and s["histogram"] == [2, 1, 0]
    p = torch.tensor([2 / 3, 1 / 3])
    assert abs(s["spread"] - float(-(p * p.log()).sum() / torch.log(torch.tensor(3.0)))) < 1e-6


# ---- the recipes on held-out digits, short runs ----
def test_siamese_recipe_retrieval():
    """A short triplet run (150 steps) embeds held-out digits so that 1-NN retrieval against the training
    embeddings is at least 95% right (the full recipe reaches about the raw-pixel 1-NN figure or above)."""
    need("sklearn")
    from tritium.cli.train import train_siamese

    r = train_siamese("tritium", "triplet", steps=150)
    assert r["retrieval"] >= 0.95, r


def test_gan_recipe_samples(tmp_path):
    """A short GAN run (750 steps) makes samples a digit classifier reads: at least 10% of them classified with
    probability >= 0.9 and those covering at least 5 digits (the untrained generator: noise, none); the PNG grid
    holds 10 x 10 samples."""
    need("sklearn")
    from tritium.cli.train import train_gan

    r = train_gan("tritium", steps=750, samples=500, png=str(tmp_path / "s.png"))
    assert r["score"]["confident"] >= 0.10 and r["score"]["classes"] >= 5, r
    assert _read_png(tmp_path / "s.png").shape == (10 * 34 + 2, 10 * 34 + 2)


@pytest.mark.parametrize("argv,want", [
    (["--model", "siamese", "--loss", "hinge"], "--loss: invalid choice: 'hinge'"),
    (["--model", "gan", "--epochs", "0"], "--epochs"),
    (["--model", "kan", "--data", "mnist"], "--data: invalid choice: 'mnist'"),
    (["--model", "wavenet", "--epochs", "0"], "--epochs"),
])
def test_train_command_line_errors(argv, want, capfd):
    """A bad option of the zoo models' recipes: status 2 and one error line naming it, before any training."""
    from tritium.cli import main

    assert main(["train", *argv]) == 2
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("tritium: error: ") and want in lines[0], lines


# ---- the Kolmogorov-Arnold network ----
def test_kan_twin_outputs_and_grads():
    """The tritium KAN (fused kan_spline) and its torch twin (efficient-kan's recursion) from one state_dict agree
    in float32: outputs and every parameter gradient, before and after update_grid (which moves the grid buffer,
    part of the state_dict, and refits the coefficients)."""
    from tritium.models.zoo import KAN

    ours, twin = _pair(lambda impl: KAN((3, 6, 4), grid_size=5, impl=impl))
    assert "layers.0.grid" in ours.state_dict()
    x = torch.randn(29, 3, generator=torch.Generator().manual_seed(2)) * 0.7
    for step in range(2):
        if step == 1:  # the grid follows the data; both twins' buffers move identically
            ours(x, update_grid=True)
            twin(x, update_grid=True)
            torch.testing.assert_close(ours.layers[0].grid, twin.layers[0].grid)
            assert not torch.equal(ours.layers[0].grid[0, :3], torch.tensor([-1.0 - 2 * 0.4, -1.4, -1.0]))
        ya, yb = ours(x), twin(x)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        ours.zero_grad()
        twin.zero_grad()
        (ya * torch.arange(4.0)).sum().backward()
        (yb * torch.arange(4.0)).sum().backward()
        _assert_grads(ours, twin)


def test_kan_update_grid_keeps_the_function():
    """update_grid refits the spline coefficients on the data it moves the grid to: with the standalone scaler
    at 1 (efficient-kan stores the refitted scaled weight in spline_weight), the layer's output on that data
    barely changes."""
    from tritium.models.zoo import KANLinear

    torch.manual_seed(0)
    layer = KANLinear(2, 3)
    with torch.no_grad():
        layer.spline_scaler.fill_(1.0)
        layer.spline_weight.normal_()
    x = torch.rand(200, 2) * 1.6 - 0.8
    before = layer(x)
    old_coeff = layer.spline_weight.detach().clone()
    layer.update_grid(x)
    assert layer.grid[:, 3].max() < -0.75 and layer.grid[:, -4].min() > 0.75   # the data's range, not [-1, 1]
    after = layer(x)
    # least squares on the new knots: close to the old spline (not exact: the knots moved), far closer than the
    # old coefficients left on the new knots
    err = (after - before).norm() / before.norm()
    with torch.no_grad():
        stale = KANLinear(2, 3)
        stale.load_state_dict(layer.state_dict())
        stale.spline_weight.copy_(old_coeff)
    assert err < 0.05 and err < (stale(x) - before).norm() / before.norm() / 4, err
    assert float(layer.regularization_loss().detach()) > 0


@pytest.mark.parametrize("data,floor", [("moons", 0.97), ("digits", 0.90)])
def test_kan_recipe_accuracy(data, floor):
    """Short KAN runs classify held-out data: two moons (200 steps) at least 97% right, digits (300 steps) at least
    90% (the full recipes go further)."""
    need("sklearn")
    from tritium.cli.train import train_kan

    r = train_kan(data, "tritium", steps=200 if data == "moons" else 300)
    assert r["accuracy"] >= floor, r


# ---- WaveNet ----
def test_wavenet_twin_outputs_and_grads():
    """The tritium WaveNet (channels last, GEMM convolutions, fused gate units) and its torch twin (nn.Conv1d,
    the gate in torch ops) from one state_dict agree in float32: logits, loss and every parameter gradient."""
    from tritium.models.zoo import WaveNet

    ours, twin = _pair(lambda impl: WaveNet(classes=32, residual=8, gate=6, skip=10, layers=3, stacks=2, impl=impl))
    c = torch.randint(0, 32, (3, 41), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours(c[:, :-1]), twin(c[:, :-1]), rtol=1e-4, atol=1e-5)
    la, lb = ours.loss(c), twin.loss(c)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    la.backward()
    lb.backward()
    # the last unit's residual output feeds nothing: its res weights get no gradient on either side (None); every
    # other gradient must match
    last = f"res.{len(twin.res) - 1}."
    for (name, pa), pb in zip(ours.named_parameters(), twin.parameters()):
        if name.startswith(last):
            assert pa.grad is None and pb.grad is None, name
        else:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    assert ours.receptive_field == 2 + 2 * (1 + 2 + 4)
    # sequences shorter than the largest dilation: that unit's shifted input is all zeros
    for length in (1, 3, 4):
        short = c[:, :length + 1]
        torch.testing.assert_close(ours.loss(short), twin.loss(short), rtol=1e-5, atol=1e-6)


def test_wavenet_is_causal():
    """Changing sample t changes no logit before t (the dilated convolutions look back only)."""
    from tritium.models.zoo import WaveNet

    torch.manual_seed(0)
    m = WaveNet(classes=16, residual=4, gate=4, skip=4, layers=3, stacks=1)
    c = torch.randint(0, 16, (1, 30))
    c2 = c.clone()
    c2[0, 17] = (c[0, 17] + 5) % 16
    a, b = m(c), m(c2)
    torch.testing.assert_close(a[..., :17], b[..., :17])
    assert not torch.allclose(a[..., 17], b[..., 17])


def test_mu_law_and_waves():
    from tritium.models.zoo import mu_law_decode, mu_law_encode, sine_waves

    w = sine_waves(4, 500, seed=1)
    assert w.shape == (4, 500) and w.abs().max() <= 0.9 + 1e-6
    assert torch.equal(sine_waves(4, 500, seed=1), w) and not torch.equal(sine_waves(4, 500, seed=2), w)
    c = mu_law_encode(w)
    assert c.dtype == torch.int64 and c.min() >= 0 and c.max() <= 255
    # the round trip is within half a quantisation step of the companded value (finer near zero)
    assert (mu_law_decode(c) - w).abs().max() < 0.03
    assert mu_law_encode(torch.tensor([-1.0, 0.0, 1.0])).tolist() == [0, 128, 255]


def test_wavenet_recipe_beats_repeating():
    """A short run (40 steps) predicts held-out generated waveforms' next sample better than repeating the last
    one: the full recipe's accuracy goes far beyond both."""
    from tritium.cli.train import train_wavenet

    r = train_wavenet("tritium", steps=40, waves=32, test_waves=4)
    assert r["within_one"] > r["repeat_accuracy"] and r["nll"] < 4.5, r


@pytest.mark.parametrize("cin, cout, size, stride, padding", [(1, 5, 8, 2, 1), (3, 1, 7, 1, 0), (2, 4, 5, 2, 2)])
def test_conv_gemm_forms_match_torch(cin, cout, size, stride, padding):
    """The GAN's im2col forms of conv2d and conv_transpose2d (kernel 4, with and without bias) against torch's, in
    float64: values and the gradients of the input, weight and bias."""
    from tritium.models.zoo import _conv_gemm, _conv_transpose_gemm

    gen = torch.Generator().manual_seed(cin * 10 + cout)
    x = torch.randn(3, cin, size, size, dtype=torch.float64, generator=gen, requires_grad=True)
    for form, ref, wshape in ((_conv_gemm, F.conv2d, (cout, cin, 4, 4)),
                              (_conv_transpose_gemm, F.conv_transpose2d, (cin, cout, 4, 4))):
        w = torch.randn(wshape, dtype=torch.float64, generator=gen, requires_grad=True)
        for b in (None, torch.randn(cout, dtype=torch.float64, generator=gen, requires_grad=True)):
            ours, want = form(x, w, b, stride, padding), ref(x, w, b, stride, padding)
            assert ours.shape == want.shape
            torch.testing.assert_close(ours, want)
            dy = torch.randn(want.shape, dtype=torch.float64, generator=gen)
            args = (x, w) if b is None else (x, w, b)
            for g_ours, g_want in zip(torch.autograd.grad(ours, args, dy), torch.autograd.grad(want, args, dy)):
                torch.testing.assert_close(g_ours, g_want)
