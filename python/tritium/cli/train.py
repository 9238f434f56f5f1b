"""``tritium train --model mlp|cnn|resnet|lstm|gru|vit|encoder``: train a classic model on scikit-learn's
handwritten digits (1797 8x8 images shipped inside scikit-learn) and report test accuracy.
``--model siamese|gan`` trains tritium.models.zoo's Siamese embedding network (1-NN retrieval) or its
DCGAN-style GAN (a PNG grid of samples, scored by a digit classifier); ``--model gcn|gat`` its graph networks on a
generated stochastic block model graph (held-out node accuracy); ``--model kan`` its Kolmogorov-Arnold network
on two moons and the digits (held-out accuracy); ``--model wavenet`` its WaveNet on generated sums of sines
(mu-law next-sample prediction).
``--model mamba|rwkv|gpt`` trains a byte-level language model instead (tritium.cli.train_lm);
``--model ddpm|flow|seq2seq`` the diffusion U-Net, RealNVP flow or attention seq2seq (tritium.cli.train_gen).

The split is stratified and seeded (80% train, 20% test); pixels are scaled to [0, 1]. The RNNs read an image
row by row (8 steps of 8 pixels), the encoder reads its 64 grey levels as tokens, the CNNs and the ViT see
1x8x8 images (see tritium.models.classic.DIGITS). ``--impl torch`` trains the plain-PyTorch twin instead.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..models.classic import DIGITS, IMPLS, build
from ..optim import warmup_cosine
from .errors import ArgumentParser, number


@dataclass
class Recipe:
    epochs: int
    lr: float
    batch: int = 64
    weight_decay: float = 1e-4


RECIPES: Dict[str, Recipe] = {
    "mlp": Recipe(30, 2e-3),
    "cnn": Recipe(30, 2e-3),
    "resnet": Recipe(20, 3e-3),
    "lstm": Recipe(40, 3e-3),
    "gru": Recipe(40, 3e-3),
    "vit": Recipe(60, 1e-3, weight_decay=0.05),
    "encoder": Recipe(40, 2e-3, weight_decay=0.05),
}


def digits(seed: int = 0, test_fraction: float = 0.2) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): x (N, 64) float32 in [0, 1], y (N,) int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(len(y)).numpy(), test_size=test_fraction,
                                           random_state=seed, stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def make_optimizer(model: nn.Module, recipe: Recipe, total_steps: int, optimizer=torch.optim.AdamW):
    """``optimizer`` (an AdamW class: torch's, or adamw_for(impl) in the zoo recipes) at the recipe's learning rate
    and weight decay, with warm-up + cosine."""
    opt = optimizer(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = max(1, total_steps // 20)
    return opt, warmup_cosine(opt, total_steps, warmup)


def train_steps(model: nn.Module, transform: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, recipe: Recipe,
                steps: int, seed: int = 0, on_step: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """Train for ``steps`` minibatch steps (batches drawn from a generator seeded with ``seed``, epoch by
    epoch); returns the per-step losses. Deterministic given the seed, so a model and its twin see the same
    batches in the same order."""
    gen = torch.Generator().manual_seed(seed)
    opt, sched = make_optimizer(model, recipe, steps)
    model.train()
    losses: List[float] = []
    perm, pos = torch.randperm(len(y), generator=gen), 0
    for step in range(steps):
        if pos + recipe.batch > len(y):
            perm, pos = torch.randperm(len(y), generator=gen), 0
        idx = perm[pos:pos + recipe.batch]
        pos += recipe.batch
        logits = model(transform(x[idx]))
        loss = model.ops.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, transform: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> float:
    model.eval()
    pred = torch.cat([model(transform(x[i:i + 256])).argmax(-1) for i in range(0, len(y), 256)])
    return (pred == y).float().mean().item()


def train(name: str, impl: str = "tritium", epochs: Optional[int] = None, seed: int = 0,
          progress: bool = True) -> dict:
    """Train the DIGITS configuration ``name``; returns {model, impl, accuracy, seconds, steps, final_loss}."""
    recipe = RECIPES[name]
    if epochs is not None:
        recipe = Recipe(epochs, recipe.lr, recipe.batch, recipe.weight_decay)
    x_train, y_train, x_test, y_test = digits(seed)
    torch.manual_seed(seed)
    model, transform = build(name, impl)
    steps = recipe.epochs * math.ceil(len(y_train) / recipe.batch)
    t0 = time.perf_counter()
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"{name} ({impl})"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn()) as bar:
            task = bar.add_task("train", total=steps, loss=float("nan"))
            losses = train_steps(model, transform, x_train, y_train, recipe, steps, seed,
                                 lambda s, l: bar.update(task, advance=1, loss=l))
    else:
        losses = train_steps(model, transform, x_train, y_train, recipe, steps, seed)
    seconds = time.perf_counter() - t0
    acc = accuracy(model, transform, x_test, y_test)
    return {"model": name, "impl": impl, "accuracy": acc, "seconds": seconds, "steps": steps,
            "final_loss": losses[-1]}


# ---- the zoo models (tritium.models.zoo): Siamese retrieval and the DCGAN-style GAN ----
ZOO_RECIPES: Dict[str, Recipe] = {
    "siamese": Recipe(25, 2e-3),   # epochs of len(train) / batch steps each
    "gan": Recipe(90, 2e-4, weight_decay=0.0),
    "gcn": Recipe(200, 1e-2, weight_decay=5e-4),   # full-graph steps (batch unused)
    "gat": Recipe(200, 5e-3, weight_decay=5e-4),
    "kan-moons": Recipe(40, 1e-2),
    "kan-digits": Recipe(40, 3e-3),
    "wavenet": Recipe(600, 3e-3, batch=16, weight_decay=0.0),   # epochs here: training steps
}
# the graph of the GNN recipes (tritium.models.zoo.stochastic_block_model's defaults: 3000 nodes, 5 blocks, mean
# degree 8, 80% of the edges within a block, 32 noisy features) and the share of its nodes trained on
GNN_TRAIN_FRACTION = 0.1
WAVE_LENGTH = 256        # samples per training window (the WaveNet's receptive field is 128)
KAN_DATA = ("moons", "digits")
KAN_LAYERS = {"moons": (2, 8, 2), "digits": (64, 32, 10)}


def _steps(name: str, epochs: Optional[int], n: int) -> int:
    recipe = ZOO_RECIPES[name]
    return (epochs or recipe.epochs) * math.ceil(n / recipe.batch)


def train_siamese(impl: str = "tritium", loss: str = "info_nce", epochs: Optional[int] = None, seed: int = 0,
                  steps: Optional[int] = None) -> dict:
    """Train the Siamese embedding network with ``loss``; returns {model, impl, loss, retrieval (1-NN accuracy
    of the test images against the training embeddings), pixel_retrieval (the same on raw pixels: the baseline),
    seconds, steps, final_loss}."""
    from ..models.zoo import Siamese, nearest_neighbour_accuracy, retrieval_accuracy, sample_batch, siamese_step

    recipe = ZOO_RECIPES["siamese"]
    x_train, y_train, x_test, y_test = digits(seed)
    images, test_images = x_train.view(-1, 1, 8, 8), x_test.view(-1, 1, 8, 8)
    steps = steps or _steps("siamese", epochs, len(y_train))
    torch.manual_seed(seed)
    model = Siamese(loss=loss, impl=impl)
    opt, sched = make_optimizer(model, recipe, steps, adamw_for(impl))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        a, b, c = sample_batch(y_train, recipe.batch, loss, gen)
        last = siamese_step(model, opt, images[a], images[b], c if loss == "contrastive" else images[c])
        sched.step()
    seconds = time.perf_counter() - t0
    return {"model": "siamese", "impl": impl, "loss": loss, "steps": steps, "seconds": seconds,
            "final_loss": float(last),
            "retrieval": retrieval_accuracy(model, images, y_train, test_images, y_test),
            "pixel_retrieval": nearest_neighbour_accuracy(x_train, y_train, x_test, y_test)}


def digit_classifier(x_train: Tensor, y_train: Tensor):
    """The judge of generated digits: scikit-learn's LogisticRegression on the training pixels in [0, 1]."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(max_iter=2000).fit(x_train.numpy(), y_train.numpy())


def adamw_for(impl: str):
    """The optimizer class of the zoo recipes (issue 26): tritium.optim.AdamW (one fused kernel call per step) for
    impl="tritium", torch.optim.AdamW for the torch twin; the same math and state (Adam is AdamW at weight_decay=0).
    At these models' sizes torch's per-parameter loop of small ops is a sizeable part of a training step."""
    if impl == "tritium":
        from ..optim import AdamW

        return AdamW
    return torch.optim.AdamW


def train_gan(impl: str = "tritium", epochs: Optional[int] = None, seed: int = 0, steps: Optional[int] = None,
              png: Optional[str] = None, samples: int = 1000) -> dict:
    """Train the GAN (batch 64 of real training digits per step, DCGAN's Adam); score ``samples`` generated
    digits with a LogisticRegression trained on the real ones (tritium.models.zoo.sample_score: the fraction
    classified with probability >= 0.9, how many digits those cover, the spread of their classes), beside the
    same score of the real test digits. ``png``: write 100 samples there as a 10 x 10 grid."""
    from ..models.zoo import GAN, gan_optimizers, gan_step, png_grid, sample_score

    recipe = ZOO_RECIPES["gan"]
    x_train, y_train, x_test, y_test = digits(seed)
    real = x_train.view(-1, 1, 8, 8) * 2 - 1                                      # tanh's range
    steps = steps or _steps("gan", epochs, len(y_train))
    torch.manual_seed(seed)
    gan = GAN(impl=impl)
    opt_g, opt_d = gan_optimizers(gan, recipe.lr, optimizer=adamw_for(impl))
    gen = torch.Generator().manual_seed(seed)
    gan.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(y_train), (recipe.batch,), generator=gen)
        d, g = gan_step(gan, opt_g, opt_d, real[idx], torch.randn(recipe.batch, gan.latent, generator=gen))
    seconds = time.perf_counter() - t0
    clf = digit_classifier(x_train, y_train)
    fake = gan.sample(samples, torch.Generator().manual_seed(seed + 1))
    score = sample_score(torch.tensor(clf.predict_proba(fake.view(len(fake), -1).numpy())))
    reference = sample_score(torch.tensor(clf.predict_proba(x_test.numpy())))
    if png:
        png_grid(fake[:100], png)
    return {"model": "gan", "impl": impl, "steps": steps, "seconds": seconds, "d_loss": float(d),
            "g_loss": float(g), "score": score, "real_score": reference, "png": png}


def train_gnn(name: str, impl: str = "tritium", epochs: Optional[int] = None, seed: int = 0) -> dict:
    """Train GCN or GAT (full graph, Adam) on the seeded stochastic block model with the labels of a random 10% of
    the nodes; returns {model, impl, accuracy (the other 90%), features_only (a LogisticRegression on the node
    features alone, the same split: what the graph adds), nodes, edges, seconds, steps, final_loss}."""
    from sklearn.linear_model import LogisticRegression

    from ..models.zoo import GAT, GCN, build_graph, gnn_step, node_accuracy, stochastic_block_model

    recipe = ZOO_RECIPES[name]
    steps = epochs or recipe.epochs
    x, y, src, dst = stochastic_block_model(seed=seed)
    graph = build_graph(src, dst, len(y))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(GNN_TRAIN_FRACTION * len(y))
    train_idx, test_idx = perm[:n_train], perm[n_train:]
    classes = int(y.max()) + 1
    torch.manual_seed(seed)
    model = GCN(x.shape[1], 64, classes, impl=impl) if name == "gcn" else GAT(x.shape[1], 16, classes, impl=impl)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.train()
        last = gnn_step(model, opt, x, graph, y, train_idx)
    seconds = time.perf_counter() - t0
    clf = LogisticRegression(max_iter=2000).fit(x[train_idx].numpy(), y[train_idx].numpy())
    features_only = float((clf.predict(x[test_idx].numpy()) == y[test_idx].numpy()).mean())
    return {"model": name, "impl": impl, "steps": steps, "seconds": seconds, "final_loss": float(last),
            "accuracy": node_accuracy(model, x, graph, y, test_idx), "features_only": features_only,
            "nodes": len(y), "edges": graph.num_edges}


def moons(seed: int = 0, n: int = 1000, noise: float = 0.1,
          test_fraction: float = 0.2) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): scikit-learn's two moons (n points, Gaussian noise), stratified split."""
    from sklearn.datasets import make_moons
    from sklearn.model_selection import train_test_split

    x, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
    idx_train, idx_test = train_test_split(torch.arange(n).numpy(), test_size=test_fraction, random_state=seed,
                                           stratify=y.numpy())
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def train_kan(data: str = "moons", impl: str = "tritium", epochs: Optional[int] = None, seed: int = 0,
              steps: Optional[int] = None) -> dict:
    """Train a KAN classifier (tritium.models.zoo.KAN, widths KAN_LAYERS[data], grid 5, cubic splines) on two moons
    or the digits: every layer's grid first moved to the training data (update_grid), then AdamW with warm-up +
    cosine on minibatches of 64; returns {model, data, impl, accuracy (held out), steps, seconds, final_loss}."""
    from ..models.zoo import KAN, kan_step

    recipe = ZOO_RECIPES[f"kan-{data}"]
    x_train, y_train, x_test, y_test = moons(seed) if data == "moons" else digits(seed)
    steps = steps or (epochs or recipe.epochs) * math.ceil(len(y_train) / recipe.batch)
    torch.manual_seed(seed)
    model = KAN(KAN_LAYERS[data], impl=impl)
    with torch.no_grad():
        model(x_train, update_grid=True)
    opt, sched = make_optimizer(model, recipe, steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    perm, pos = torch.randperm(len(y_train), generator=gen), 0
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + recipe.batch > len(y_train):
            perm, pos = torch.randperm(len(y_train), generator=gen), 0
        idx = perm[pos:pos + recipe.batch]
        pos += recipe.batch
        last = kan_step(model, opt, x_train[idx], y_train[idx])
        sched.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x_test).argmax(-1) == y_test).float().mean().item()
    return {"model": "kan", "data": data, "impl": impl, "accuracy": acc, "steps": steps, "seconds": seconds,
            "final_loss": float(last)}


def train_wavenet(impl: str = "tritium", steps: Optional[int] = None, seed: int = 0, waves: int = 256,
                  test_waves: int = 32) -> dict:
    """Train the WaveNet (tritium.models.zoo.WaveNet, 2 stacks of dilations 1..32) on next-sample prediction of
    mu-law (256 classes) generated waveforms: ``waves`` training sums of sines of 4096 samples, random windows of
    WAVE_LENGTH + 1 per batch row; held-out figures on ``test_waves`` other waveforms (another seed), scored on the
    positions with a full receptive field: accuracy of the most likely class, accuracy within one class, NLL
    (nats per sample), and the accuracy of repeating the previous sample (the baseline). Returns a dict."""
    from ..models.zoo import WaveNet, mu_law_encode, sine_waves, wavenet_step

    recipe = ZOO_RECIPES["wavenet"]
    steps = steps or recipe.epochs
    train_c = mu_law_encode(sine_waves(waves, 4096, seed))
    test_c = mu_law_encode(sine_waves(test_waves, 1024, seed + 1000))
    torch.manual_seed(seed)
    model = WaveNet(impl=impl)
    opt, sched = make_optimizer(model, recipe, steps, adamw_for(impl))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        rows = torch.randint(len(train_c), (recipe.batch,), generator=gen)
        start = torch.randint(train_c.shape[1] - WAVE_LENGTH - 1, (recipe.batch, 1), generator=gen)
        batch = train_c[rows[:, None], start + torch.arange(WAVE_LENGTH + 1)]
        last = wavenet_step(model, opt, batch)
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        logits = model(test_c[:, :-1])[:, :, model.receptive_field:]
        target = test_c[:, 1:][:, model.receptive_field:]
        nll = torch.nn.functional.cross_entropy(logits, target).item()
        pred = logits.argmax(1)
        acc = (pred == target).float().mean().item()
        near = ((pred - target).abs() <= 1).float().mean().item()
        repeat = (test_c[:, :-1][:, model.receptive_field:] == target).float().mean().item()
    return {"model": "wavenet", "impl": impl, "steps": steps, "seconds": seconds, "final_loss": float(last),
            "accuracy": acc, "within_one": near, "nll": nll, "repeat_accuracy": repeat}


def zoo_main(argv) -> int:
    """``tritium train --model siamese|gan|gcn|gat|kan|wavenet`` (their own options: --loss, --png, --data)."""
    from ..models.zoo import LOSSES, ZOO_MODELS

    p = ArgumentParser(prog="tritium train", description="train the Siamese embedding network (1-NN retrieval) "
                       "or the DCGAN-style GAN (classifier-scored samples) on scikit-learn's digits, GCN / GAT "
                       "node classifiers on a generated stochastic block model graph, the KAN on two moons and the "
                       "digits (held-out accuracy), or the WaveNet on generated waveforms (next-sample accuracy and "
                       "NLL)")
    p.add_argument("--model", required=True, choices=ZOO_MODELS)
    p.add_argument("--impl", default="tritium", choices=IMPLS, help="tritium ops or the plain-PyTorch twin")
    p.add_argument("--epochs", type=number(int, 1), help="default: the model's recipe (wavenet: training steps)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--loss", default="info_nce", choices=LOSSES, help="siamese: the metric-learning loss")
    p.add_argument("--png", default="gan-samples.png", help="gan: where to write a 10 x 10 grid of samples")
    p.add_argument("--data", action="append", choices=KAN_DATA, help="kan: the data set (repeatable; default: both)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = p.parse_args(argv)
    if args.model in ("gcn", "gat"):
        r = train_gnn(args.model, args.impl, args.epochs, args.seed)
        print(f"{r['model']} ({r['impl']}): held-out node accuracy {100 * r['accuracy']:.2f}% (node features "
              f"alone: {100 * r['features_only']:.2f}%) on a {r['nodes']}-node, {r['edges']}-edge stochastic block "
              f"model after {r['steps']} steps in {r['seconds']:.1f} s")
        return 0
    if args.model == "siamese":
        r = train_siamese(args.impl, args.loss, args.epochs, args.seed)
        print(f"siamese ({r['impl']}, {r['loss']}): held-out 1-NN retrieval {100 * r['retrieval']:.2f}% "
              f"(raw pixels: {100 * r['pixel_retrieval']:.2f}%) after {r['steps']} steps in {r['seconds']:.1f} s")
        return 0
    if args.model == "kan":
        for data in args.data or KAN_DATA:
            r = train_kan(data, args.impl, args.epochs, args.seed)
            print(f"kan ({r['impl']}) on {data}: held-out accuracy {100 * r['accuracy']:.2f}% after {r['steps']} "
                  f"steps in {r['seconds']:.1f} s (final train loss {r['final_loss']:.4f})")
        return 0
    if args.model == "wavenet":
        r = train_wavenet(args.impl, args.epochs, args.seed)
        print(f"wavenet ({r['impl']}): held-out next-sample accuracy {100 * r['accuracy']:.2f}% (within one class: "
              f"{100 * r['within_one']:.2f}%; repeating the last sample: {100 * r['repeat_accuracy']:.2f}%), NLL "
              f"{r['nll']:.3f} nats/sample after {r['steps']} steps in {r['seconds']:.1f} s")
        return 0
    r = train_gan(args.impl, args.epochs, args.seed, png=args.png)
    s, ref = r["score"], r["real_score"]
    print(f"gan ({r['impl']}): {r['steps']} steps in {r['seconds']:.1f} s; of 1000 samples "
          f"{100 * s['confident']:.1f}% classified with p >= 0.9 (real test digits: {100 * ref['confident']:.1f}%), "
          f"covering {s['classes']} digits, spread {s['spread']:.2f} (real: {ref['spread']:.2f}); "
          f"samples in {r['png']}")
    return 0


def main(argv=None) -> int:
    from ..models.zoo import ZOO_MODELS

    zoo = ArgumentParser(add_help=False)
    zoo.add_argument("--model")
    if zoo.parse_known_args(list(sys.argv[1:] if argv is None else argv))[0].model in ZOO_MODELS:
        return zoo_main(list(sys.argv[1:] if argv is None else argv))   # siamese, gan: their own options
    from .train_gen import GEN_MODELS
    from .train_lm import LM_MODELS

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--model")
    if pre.parse_known_args(argv)[0].model in LM_MODELS:   # the byte LMs have their own options (--steps)
        from . import train_lm

        return train_lm.main(argv)
    if pre.parse_known_args(argv)[0].model in GEN_MODELS:  # ddpm, flow, seq2seq: their own options
        from . import train_gen

        return train_gen.main(argv)
    p = ArgumentParser(prog="tritium train", description=__doc__.strip().splitlines()[0],
                       epilog=f"--model {'|'.join(LM_MODELS)}: see tritium train --model mamba --help; "
                              f"--model {'|'.join(ZOO_MODELS)}: see tritium train --model gan --help; "
                              f"--model {'|'.join(GEN_MODELS)}: see tritium train --model ddpm --help")
    p.add_argument("--model", required=True, choices=sorted(DIGITS) + list(LM_MODELS))
    p.add_argument("--impl", default="tritium", choices=IMPLS, help="tritium ops or the plain-PyTorch twin")
    p.add_argument("--epochs", type=number(int, 1), help="default: the model's recipe")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    r = train(args.model, args.impl, args.epochs, args.seed, progress=not args.no_progress)
    print(f"{r['model']} ({r['impl']}): test accuracy {100 * r['accuracy']:.2f}% after {r['steps']} steps "
          f"in {r['seconds']:.1f} s (final train loss {r['final_loss']:.4f})")
    return 0


if __name__ == "__main__":
    from . import main as cli_main

    raise SystemExit(cli_main(["train", *sys.argv[1:]]))
