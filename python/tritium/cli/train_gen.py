"""``tritium train --model ddpm|flow|seq2seq``: issue 26's diffusion model, normalizing flow and attention
seq2seq, each on data every machine has.

- ddpm: tritium.models.diffusion's U-Net + DDPM on scikit-learn's 8x8 digits scaled to [-1, 1]; samples (DDIM,
  or ancestral DDPM) written as a PNG grid and scored by a LogisticRegression digit classifier trained on the
  real digits (tritium.models.zoo.sample_score), beside the same score of the real test digits.
- flow: tritium.models.flow's RealNVP on scikit-learn's two moons; held-out negative log-likelihood in nats per
  point, and a PNG of the learned density with samples drawn from it.
- seq2seq: tritium.models.seq2seq's GRU encoder-decoder with Luong attention on dates written out in words ->
  ISO 8601 (the formats of tritium.finetune's dates_task; train and test from disjoint days); exact-match accuracy
  of greedy and beam decoding on the held-out dates.
"""
from __future__ import annotations

import copy
import time
from typing import Dict, Optional

import torch

from .errors import ArgumentParser, number
from .train import Recipe, adamw_for, digit_classifier, digits

GEN_MODELS = ("ddpm", "flow", "seq2seq")

GEN_RECIPES: Dict[str, Recipe] = {
    "ddpm": Recipe(0, 1e-3, batch=128, weight_decay=0.0),    # epochs unused: steps below
    "flow": Recipe(0, 1e-3, batch=256, weight_decay=0.0),
    "seq2seq": Recipe(0, 3e-3, batch=128, weight_decay=0.0),
}
GEN_STEPS = {"ddpm": 6000, "flow": 4000, "seq2seq": 1500}


def _optimizer(model, name: str, steps: int):
    from ..optim import warmup_cosine

    recipe = GEN_RECIPES[name]
    opt = adamw_for(model.impl)(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    return opt, warmup_cosine(opt, steps, max(1, steps // 20))


# ---- ddpm ----
def train_ddpm(impl: str = "tritium", steps: Optional[int] = None, seed: int = 0, schedule: str = "cosine",
               sampler: str = "ddim", ddim_steps: int = 50, samples: int = 1000, png: Optional[str] = None,
               channels: int = 32, ema_decay: float = 0.999) -> dict:
    """Train the U-Net + DDPM (batch 128 of training digits per step, random timesteps and noise, AdamW with
    warm-up + cosine decay; an exponential moving average of the weights samples); score ``samples`` generated
    digits; ``png``: write 100 of them as a 10 x 10 grid."""
    from ..models.diffusion import DDPM, ddpm_step, ema_update
    from ..models.zoo import png_grid, sample_score

    recipe = GEN_RECIPES["ddpm"]
    steps = steps or GEN_STEPS["ddpm"]
    x_train, y_train, x_test, _ = digits(seed)
    real = x_train.view(-1, 1, 8, 8) * 2 - 1
    torch.manual_seed(seed)
    model = DDPM(channels=channels, schedule=schedule, impl=impl)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt, sched = _optimizer(model, "ddpm", steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    t0 = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(len(real), (recipe.batch,), generator=gen)
        t = torch.randint(model.timesteps, (recipe.batch,), generator=gen)
        noise = torch.randn(recipe.batch, 1, 8, 8, generator=gen)
        losses.append(float(ddpm_step(model, opt, real[idx], t, noise)))
        sched.step()
        ema_update(ema, model, ema_decay)
    seconds = time.perf_counter() - t0
    ema.eval()
    sample_gen = torch.Generator().manual_seed(seed + 1)
    t0 = time.perf_counter()
    if sampler == "ddim":
        fake = torch.cat([ema.ddim_sample(min(500, samples - i), ddim_steps, generator=sample_gen)
                          for i in range(0, samples, 500)])
    else:
        fake = torch.cat([ema.ddpm_sample(min(500, samples - i), generator=sample_gen)
                          for i in range(0, samples, 500)])
    sample_seconds = time.perf_counter() - t0
    clf = digit_classifier(x_train, y_train)
    score = sample_score(torch.tensor(clf.predict_proba(fake.view(len(fake), -1).numpy())))
    reference = sample_score(torch.tensor(clf.predict_proba(x_test.numpy())))
    if png:
        png_grid(fake[:100], png)
    tail = max(1, steps // 20)
    return {"model": "ddpm", "impl": impl, "steps": steps, "seconds": seconds, "sample_seconds": sample_seconds,
            "first_loss": sum(losses[:tail]) / tail, "final_loss": sum(losses[-tail:]) / tail,
            "sampler": sampler if sampler == "ddpm" else f"ddim-{ddim_steps}", "score": score,
            "real_score": reference, "png": png}


# ---- flow ----
def moons(n: int, seed: int, noise: float = 0.05) -> torch.Tensor:
    """n points of scikit-learn's two moons (float32 (n, 2)), in its own coordinates."""
    from sklearn.datasets import make_moons

    return torch.tensor(make_moons(n, noise=noise, random_state=seed)[0], dtype=torch.float32)


def gaussian_nll(train: torch.Tensor, test: torch.Tensor) -> float:
    """The baseline: held-out NLL (nats per point) of one full-covariance Gaussian fitted to the training points."""
    mean, cov = train.double().mean(0), torch.cov(train.double().T)
    dist = torch.distributions.MultivariateNormal(mean, cov)
    return float(-dist.log_prob(test.double()).mean())


def flow_picture(model, path: str, samples: torch.Tensor, data: torch.Tensor) -> None:
    """The learned density exp(log p) on a grid beside samples drawn from the flow and the training points;
    matplotlib when it is installed (the bench extras), else the density alone as a greyscale PNG."""
    lo, hi = torch.tensor([-1.6, -1.1]), torch.tensor([2.6, 1.6])
    n = 200
    gx, gy = torch.meshgrid(torch.linspace(lo[0], hi[0], n), torch.linspace(lo[1], hi[1], n), indexing="xy")
    with torch.no_grad():
        dens = torch.cat([model.log_prob(c) for c in torch.stack([gx, gy], -1).view(-1, 2).split(4096)]).exp()
    dens = dens.view(n, n)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from ..models.zoo import png_grid

        png_grid((dens / dens.max()).flip(0)[None], path, cols=1, scale=2)
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4), constrained_layout=True)
    a.imshow(dens.numpy(), origin="lower", extent=(lo[0], hi[0], lo[1], hi[1]), cmap="magma", aspect="auto")
    a.set_title("RealNVP density p(x)")
    b.scatter(data[:, 0], data[:, 1], s=2, c="0.75", label="training points")
    b.scatter(samples[:, 0], samples[:, 1], s=2, c="C0", label="flow samples")
    b.set_xlim(lo[0], hi[0])
    b.set_ylim(lo[1], hi[1])
    b.legend(loc="upper right", markerscale=4)
    b.set_title("samples")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_flow(impl: str = "tritium", steps: Optional[int] = None, seed: int = 0, png: Optional[str] = None,
               n_train: int = 4000, n_test: int = 2000) -> dict:
    """Train RealNVP (8 couplings, hidden 128) on ``n_train`` two-moons points (noise 0.05; batch 256, AdamW with
    warm-up + cosine decay); held-out NLL (nats per point) on ``n_test`` other points, beside a Gaussian's."""
    from ..models.flow import RealNVP, flow_step

    recipe = GEN_RECIPES["flow"]
    steps = steps or GEN_STEPS["flow"]
    train, test = moons(n_train, seed), moons(n_test, seed + 1000)
    torch.manual_seed(seed)
    model = RealNVP(impl=impl)
    opt, sched = _optimizer(model, "flow", steps)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        last = flow_step(model, opt, train[torch.randint(len(train), (recipe.batch,), generator=gen)])
        sched.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        test_nll, train_nll = float(model.nll(test)), float(model.nll(train))
    if png:
        flow_picture(model, png, model.sample(2000, torch.Generator().manual_seed(seed + 1)), train)
    return {"model": "flow", "impl": impl, "steps": steps, "seconds": seconds, "final_loss": float(last),
            "train_nll": train_nll, "test_nll": test_nll, "gaussian_nll": gaussian_nll(train, test), "png": png}


# ---- seq2seq ----
def date_pairs(n: int, seed: int = 0, split: str = "train"):
    """n (date in words, ISO 8601) pairs in the four formats of tritium.finetune's dates_task ("March 4, 2023",
    "4 March 2023", "Mar 4 2023", "the 4th of March, 2023"), from the same disjoint days (train: even days since
    1900-01-01, test: odd): a held-out date was never trained on."""
    import datetime
    import random

    from ..finetune import _DATE_FORMATS

    if split not in ("train", "test"):
        raise ValueError(f"date_pairs: split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"seq2seq-{seed}-{split}")
    first, days = datetime.date(1900, 1, 1), (datetime.date(2099, 12, 31) - datetime.date(1900, 1, 1)).days
    out = []
    for _ in range(n):
        d = first + datetime.timedelta(days=rng.randrange(days // 2) * 2 + (split == "test"))
        out.append((rng.choice(_DATE_FORMATS)(d), d.isoformat()))
    return out


def train_seq2seq(impl: str = "tritium", steps: Optional[int] = None, seed: int = 0, n_train: int = 20000,
                  n_test: int = 2000, beam: int = 4) -> dict:
    """Train the attention seq2seq on ``n_train`` date pairs (batch 128, AdamW with warm-up + cosine decay,
    gradient norm clipped at 1); exact-match accuracy of greedy and beam decoding on ``n_test`` held-out dates."""
    from ..models.seq2seq import Seq2Seq, encode_batch, exact_match, seq2seq_step, targets

    recipe = GEN_RECIPES["seq2seq"]
    steps = steps or GEN_STEPS["seq2seq"]
    train, test = date_pairs(n_train, seed, "train"), date_pairs(n_test, seed, "test")
    torch.manual_seed(seed)
    model = Seq2Seq(impl=impl)
    opt, sched = _optimizer(model, "seq2seq", steps)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        batch = [train[i] for i in torch.randint(len(train), (recipe.batch,), generator=gen).tolist()]
        tgt_in, labels = targets([b[1] for b in batch])
        loss = seq2seq_step(model, opt, encode_batch([b[0] for b in batch]), tgt_in, labels)
        sched.step()
    seconds = time.perf_counter() - t0
    sources, answers = [p[0] for p in test], [p[1] for p in test]
    return {"model": "seq2seq", "impl": impl, "steps": steps, "seconds": seconds, "final_loss": float(loss),
            "greedy": exact_match(model, sources, answers),
            "beam": exact_match(model, sources, answers, beam=beam), "beam_width": beam}


def main(argv) -> int:
    p = ArgumentParser(prog="tritium train", description="train the U-Net + DDPM on scikit-learn's digits, the "
                       "RealNVP flow on two moons, or the attention seq2seq on date conversion")
    p.add_argument("--model", required=True, choices=GEN_MODELS)
    p.add_argument("--impl", default="tritium", choices=("tritium", "torch"),
                   help="tritium ops or the plain-PyTorch twin")
    p.add_argument("--steps", type=number(int, 1), help="training steps (default: the model's recipe)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--schedule", default="cosine", choices=("linear", "cosine"), help="ddpm: the noise schedule")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"),
                   help="ddpm: DDIM over --ddim-steps steps, or ancestral sampling over all 1000")
    p.add_argument("--ddim-steps", type=number(int, 1), default=50)
    p.add_argument("--png", help="ddpm, flow: where to write the picture (default: MODEL-samples.png)")
    p.add_argument("--no-progress", action="store_true", help="accepted for symmetry (no progress bar here)")
    args = p.parse_args(argv)
    png = args.png or f"{args.model}-samples.png"
    if args.model == "ddpm":
        if args.ddim_steps > 1000:
            p.error(f"argument --ddim-steps: at most 1000 (the schedule's steps), got {args.ddim_steps}")
        r = train_ddpm(args.impl, args.steps, args.seed, args.schedule, args.sampler, args.ddim_steps, png=png)
        s, ref = r["score"], r["real_score"]
        print(f"ddpm ({r['impl']}, {args.schedule}): {r['steps']} steps in {r['seconds']:.1f} s, noise MSE "
              f"{r['first_loss']:.3f} -> {r['final_loss']:.3f}; of 1000 {r['sampler']} samples "
              f"{100 * s['confident']:.1f}% classified with p >= 0.9 (real test digits: "
              f"{100 * ref['confident']:.1f}%), covering {s['classes']} digits, spread {s['spread']:.2f} "
              f"(real: {ref['spread']:.2f}); samples in {r['png']}")
        return 0
    if args.model == "flow":
        r = train_flow(args.impl, args.steps, args.seed, png=png)
        print(f"flow ({r['impl']}): {r['steps']} steps in {r['seconds']:.1f} s; held-out NLL {r['test_nll']:.3f} "
              f"nats per point (train {r['train_nll']:.3f}; one fitted Gaussian: {r['gaussian_nll']:.3f}); "
              f"density and samples in {r['png']}")
        return 0
    r = train_seq2seq(args.impl, args.steps, args.seed)
    print(f"seq2seq ({r['impl']}): {r['steps']} steps in {r['seconds']:.1f} s; held-out exact match "
          f"{100 * r['greedy']:.2f}% greedy, {100 * r['beam']:.2f}% beam search (width {r['beam_width']}) "
          f"on 2000 dates never trained on")
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
