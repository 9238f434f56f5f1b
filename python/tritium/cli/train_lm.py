"""``tritium train --model mamba|rwkv|xlstm|gpt``: a byte-level language model trained on the Python standard
library's own source files (every machine with Python has them), reporting bits per byte on a held-out split.

The corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages excluded), in sorted
order; every ``HELD_OUT_EVERY``-th file of that list is held out, the rest is the training text (files joined by a
blank line). Training draws random windows of ``context + 1`` bytes (seeded); the held-out figure is the mean
cross-entropy over ``eval_windows`` fixed windows spread evenly over the held-out text, in bits (nats / ln 2):
bits per byte, since a token is a byte.

The models (``build``) are of similar size (about 2M parameters at the default ``--size small``):
tritium.models.ssm.MambaLM, tritium.models.rwkv.RWKV7LM, tritium.models.xlstm.XLSTMLM (mLSTM blocks), and a
causal pre-norm Transformer built from tritium.models.classic's encoder blocks with a causal mask (``gpt``:
``CausalTransformerLM``). ``--impl torch`` trains the plain-PyTorch twin.
"""
from __future__ import annotations

import json
import math
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..optim import warmup_cosine
from .errors import ArgumentParser, number

LM_MODELS = ("mamba", "rwkv", "xlstm", "gpt")
IMPLS = ("tritium", "torch")
HELD_OUT_EVERY = 20
VOCAB = 256   # bytes


@dataclass
class LMRecipe:
    steps: int = 200
    batch: int = 16
    context: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.01
    eval_every: int = 25
    eval_windows: int = 64


RECIPES: Dict[str, LMRecipe] = {
    "mamba": LMRecipe(),
    "rwkv": LMRecipe(lr=1e-3),
    "xlstm": LMRecipe(lr=1e-3),
    "gpt": LMRecipe(lr=1e-3),
}


# ---- the corpus ----
def stdlib_files(root: Optional[Path] = None) -> List[Path]:
    """The standard library's ``*.py`` files in sorted order (site-packages and __pycache__ excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = [p for p in root.rglob("*.py")
             if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts)]
    if not files:
        raise RuntimeError(f"no *.py files under the standard library directory {root}")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def corpus(root: Optional[Path] = None, held_out_every: int = HELD_OUT_EVERY) -> Tuple[Tensor, Tensor, dict]:
    """(train bytes, held-out bytes, info): uint8 tensors; file i of the sorted list is held out when
    i % held_out_every == 0."""
    files = stdlib_files(root)
    train, held = [], []
    for i, path in enumerate(files):
        (held if i % held_out_every == 0 else train).append(path.read_bytes())

    def join(parts: List[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"\n\n".join(parts)), dtype=torch.uint8)

    info = {"root": str(root or sysconfig.get_paths()["stdlib"]), "files": len(files), "held_out_files": len(held)}
    return join(train), join(held), info


def batches(data: Tensor, batch: int, context: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """A batch of random windows: (inputs, targets), (batch, context) int64 each, targets shifted by one."""
    starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
    win = torch.stack([data[s:s + context + 1] for s in starts.tolist()]).long()
    return win[:, :-1], win[:, 1:]


@torch.no_grad()
def bits_per_byte(model: nn.Module, data: Tensor, context: int, windows: int, batch: int = 16) -> float:
    """Mean next-byte cross-entropy in bits over ``windows`` windows spread evenly over ``data``."""
    was = model.training
    model.eval()
    starts = torch.linspace(0, len(data) - context - 1, windows).long().tolist()
    total = 0.0
    for i in range(0, len(starts), batch):
        win = torch.stack([data[s:s + context + 1] for s in starts[i:i + batch]]).long()
        logits = model(win[:, :-1])
        total += torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), win[:, 1:].reshape(-1),
                                                   reduction="sum").item()
    model.train(was)
    return total / (len(starts) * context) / math.log(2)


# ---- the models ----
class CausalTransformerLM(nn.Module):
    """A GPT-style byte LM from tritium.models.classic's Transformer blocks (pre-norm, GELU FFN): token and
    learned position embeddings, ``depth`` blocks under a causal mask, final LayerNorm, a head tied to the token
    embedding."""

    def __init__(self, vocab_size: int, max_len: int, dim: int, depth: int, heads: int, impl: str = "tritium"):
        super().__init__()
        from ..models.classic import Block, ops

        self.ops = ops(impl)
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.randn(1, max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, 4, True, 0.0, impl) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, ids: Tensor) -> Tensor:   # (B, L) -> (B, L, vocab)
        L = ids.shape[1]
        x = self.tok(ids) + self.pos[:, :L]
        mask = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()[None, None]   # True = attend
        for block in self.blocks:
            x = block(x, mask)
        x = self.ops.layer_norm(x, self.norm.normalized_shape, self.norm.weight, self.norm.bias, self.norm.eps)
        return x @ self.tok.weight.t()


# per model and size: MambaLM (d_model, n_layer), RWKV7LM (d_model, n_layer, head_size), XLSTMLM (d_model,
# n_layer, n_head), the Transformer (dim,
# depth, heads); "small" (the default) is about 2M parameters each, "tiny" is for tests and quick looks
SIZES: Dict[str, Dict[str, tuple]] = {
    "small": {"mamba": (256, 4), "rwkv": (192, 4, 32), "xlstm": (192, 4, 4), "gpt": (192, 4, 6)},
    "tiny": {"mamba": (64, 2), "rwkv": (64, 2, 16), "xlstm": (64, 2, 2), "gpt": (64, 2, 4)},
}


def build(name: str, impl: str = "tritium", context: int = 128, size: str = "small") -> nn.Module:
    """The byte-LM configuration ``name`` at ``size`` (SIZES)."""
    if name not in LM_MODELS:
        raise ValueError(f"model must be one of {LM_MODELS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {tuple(SIZES)}, got {size!r}")
    dims = SIZES[size][name]
    if name == "mamba":
        from ..models.ssm import MambaConfig, MambaLM

        return MambaLM(MambaConfig(vocab_size=VOCAB, d_model=dims[0], n_layer=dims[1]), impl=impl)
    if name == "rwkv":
        from ..models.rwkv import RWKV7Config, RWKV7LM

        return RWKV7LM(RWKV7Config(vocab_size=VOCAB, d_model=dims[0], n_layer=dims[1], head_size=dims[2]),
                       impl=impl)
    if name == "xlstm":
        from ..models.xlstm import XLSTMConfig, XLSTMLM

        return XLSTMLM(XLSTMConfig(vocab_size=VOCAB, d_model=dims[0], n_layer=dims[1], n_head=dims[2]), impl=impl)
    return CausalTransformerLM(VOCAB, context, *dims, impl=impl)


def make_optimizer(model: nn.Module, recipe: LMRecipe):
    """AdamW (weight decay on matrices only) with a linear warmup over 5% of the steps and a cosine decay."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    total = recipe.steps
    warmup = max(1, total // 20)
    return opt, warmup_cosine(opt, total, warmup, floor=0.1)


def train_step(model: nn.Module, opt, x: Tensor, y: Tensor) -> Tensor:
    """One optimizer step on (x, y); returns the loss (a tensor, not synchronised)."""
    logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.detach()


def train(name: str, impl: str = "tritium", steps: Optional[int] = None, seed: int = 0, progress: bool = True,
          recipe: Optional[LMRecipe] = None, root: Optional[Path] = None, size: str = "small") -> dict:
    """Train the byte LM ``name``; returns {model, impl, params, steps, seconds, final_loss, bits_per_byte,
    curve: [[step, held-out bits/byte], ...], recipe, corpus}."""
    if name not in LM_MODELS:
        raise ValueError(f"model must be one of {LM_MODELS}, got {name!r}")
    recipe = recipe or RECIPES[name]
    if steps is not None:
        recipe = replace(recipe, steps=steps, eval_every=min(recipe.eval_every, max(1, steps)))
    train_data, held, info = corpus(root)
    torch.manual_seed(seed)
    model = build(name, impl, recipe.context, size)
    model.train()
    opt, sched = make_optimizer(model, recipe)
    gen = torch.Generator().manual_seed(seed)
    curve: List[List[float]] = []
    losses: List[float] = []

    def evaluate(step: int) -> float:
        bpb = bits_per_byte(model, held, recipe.context, recipe.eval_windows)
        curve.append([step, round(bpb, 4)])
        return bpb

    def loop(update: Callable[[float, float], None]) -> float:
        bpb, seconds = evaluate(0), 0.0
        for step in range(1, recipe.steps + 1):
            x, y = batches(train_data, recipe.batch, recipe.context, gen)
            t0 = time.perf_counter()
            loss = train_step(model, opt, x, y).item()
            sched.step()
            seconds += time.perf_counter() - t0
            losses.append(loss)
            if step % recipe.eval_every == 0 or step == recipe.steps:
                bpb = evaluate(step)
            update(loss, bpb)
        return seconds

    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(f"{name} ({impl})"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("loss {task.fields[loss]:.3f}  held-out {task.fields[bpb]:.3f} bits/byte"),
                      TimeRemainingColumn()) as bar:
            task = bar.add_task("train", total=recipe.steps, loss=float("nan"), bpb=float("nan"))
            seconds = loop(lambda loss, bpb: bar.update(task, advance=1, loss=loss, bpb=bpb))
    else:
        seconds = loop(lambda loss, bpb: None)
    return {"model": name, "impl": impl, "size": size, "params": sum(p.numel() for p in model.parameters()),
            "steps": recipe.steps, "seconds": round(seconds, 2), "final_loss": losses[-1] if losses else None,
            "bits_per_byte": curve[-1][1], "curve": curve, "recipe": asdict(recipe),
            "corpus": {**info, "train_bytes": len(train_data), "held_out_bytes": len(held)}}


def main(argv=None) -> int:
    p = ArgumentParser(prog="tritium train", description=__doc__.strip().splitlines()[0])
    p.add_argument("--model", required=True, choices=LM_MODELS)
    p.add_argument("--impl", default="tritium", choices=IMPLS, help="tritium ops or the plain-PyTorch twin")
    p.add_argument("--steps", type=number(int, 1), help="optimizer steps (default: the model's recipe)")
    p.add_argument("--size", default="small", choices=tuple(SIZES), help="model size (tiny: a quick look)")
    p.add_argument("--batch", type=number(int, 1), help="sequences per step (default: the recipe's)")
    p.add_argument("--context", type=number(int, 2), help="bytes per sequence (default: the recipe's)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--json", help="write the result (with the held-out curve) to this path")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    recipe = RECIPES[args.model]
    recipe = replace(recipe, batch=args.batch or recipe.batch, context=args.context or recipe.context)
    r = train(args.model, args.impl, args.steps, args.seed, not args.no_progress, recipe, size=args.size)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    print(f"{r['model']} ({r['impl']}, {r['params'] / 1e6:.2f}M parameters): held-out {r['bits_per_byte']:.3f} "
          f"bits per byte after {r['steps']} steps in {r['seconds']:.1f} s of training "
          f"(final train loss {r['final_loss'] / math.log(2):.3f} bits/byte)")
    return 0


if __name__ == "__main__":
    from . import main as cli_main

    raise SystemExit(cli_main(["train", *sys.argv[1:]]))
