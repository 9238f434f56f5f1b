"""``tritium bench models``: the classic models forward+backward, tritium vs PyTorch.

- lstm, gru, rnn (batch 64, seq 128, hidden 512): tritium.nn.LSTM/GRU/RNN (tanh) vs torch.nn.LSTM/GRU/RNN
  (torch's own fused path: oneDNN on CPU for LSTM/GRU, its per-step cell ops for RNN; cuDNN on GPU) and vs a
  plain eager cell loop (the gate math in torch ops per step).
- encoder, vit (batch 32, seq 197, dim 384, 6 layers, 6 heads): the tritium model vs its plain-PyTorch twin
  (every row of every block, as plain PyTorch models are written), and vs the twin with tritium's pruning of the
  last block to the [CLS] row (the same work in torch ops: the kernels' share of the lead).
- mamba, rwkv, xlstm: one training step (forward, backward, gradient clipping, AdamW) of the byte LM at
  ``tritium train``'s default configuration (tritium.cli.train_lm: batch 16, context 128, about 2M parameters),
  the tritium model vs its plain-PyTorch twin (mamba_ssm's reference scan and conv; the naive RWKV-7 recurrence;
  the mLSTM recurrence step by step).
- mamba, rwkv, xlstm also get a decode row (issue 24's "generation per-token cost flat in sequence length"): one
  greedy generation at batch 1 of the same tritium model from a 1-token prompt (prefill, then step per token), each
  step timed alone; the row's per-token time at positions 64, 512 and 2048 (each the median of the 32 steps from
  there) and ``flat_ratio``, the last position's over the first's (~1.0: flat). A Llama of about the same size
  (tritium.models.eager.EagerLlama, contiguous KV cache) decodes the same way as the contrast, its cost growing with
  the cache.
- siamese, gan (issue 26's zoo, tritium.models.zoo): one training step (forward, backward, optimizer step) at the
  recipe's batch of 64 digits (8x8): the Siamese CNN on 64 same-class pairs (2 x 64 images, InfoNCE, AdamW),
  the GAN's discriminator then generator step (non-saturating BCE, Adam); the tritium model vs its twin.
- gcn, gat (tritium.models.zoo): one full-graph training step (forward, backward, Adam) on ``tritium train``'s
  stochastic block model (3000 nodes, about 27k edges with the self loops; --small: 1000 nodes), GCN 32 -> 64 -> 5,
  GAT 32 -> 4 heads x 16 -> 5; tritium's graph kernels vs the twin's index_add / scatter message passing.
- kan: one training step (cross-entropy, AdamW) of the digits recipe's KAN (64 -> 32 -> 10, grid 5, cubic) at
  batch 64 (--small: 16); the fused kan_spline vs the twin's efficient-kan basis recursion.
- wavenet: one training step (next-sample cross-entropy over 256 mu-law classes, Adam) of the recipe's WaveNet
  (2 stacks of dilations 1..32, 32 residual / 32 gate / 64 skip channels) on 16 windows of 256 samples (--small: 4).
- siamese, gan, wavenet, ddpm, flow, seq2seq: the tritium model steps with tritium.optim.AdamW (Adam: weight_decay
  0), as its recipe does (tritium.cli.train.adamw_for), the twin with torch.optim's; the other zoo rows use
  torch.optim's on both sides.
- ddpm, flow, seq2seq (issue 26, tritium.models.diffusion / flow / seq2seq): one training step of each recipe
  (tritium.cli.train_gen) vs its twin: the U-Net's noise-prediction MSE on 128 digits at random timesteps
  (GroupNorm + SiLU fused; the convolutions are torch's in both), RealNVP's NLL on 256 two-moons points, the
  attention seq2seq's cross-entropy on 128 dates (bidirectional GRU encoder, GRU decoder, attention).

The zoo's and the generative models' rows (steps of a few milliseconds, where a shared machine's slow spells and
the order of the sides move a ratio most) are timed by ``alternating_rounds``: 24 rounds, each side the same
number of steps per round (about half a second), the order reversed every other round; a row's speedup is the
median of the rounds' ratios and its ``spread`` half the interquartile range of its rounds over their median.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch import Tensor

from .common import machine_info, time_fn, write_json

MODELS = ("lstm", "gru", "rnn", "encoder", "vit", "mamba", "rwkv", "xlstm")
RNNS = ("lstm", "gru", "rnn")
ZOO = ("siamese", "gan", "gcn", "gat", "kan", "wavenet")
MODELS += ZOO
GEN = ("ddpm", "flow", "seq2seq")
MODELS += GEN
LMS = ("mamba", "rwkv", "xlstm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import number

    p.add_argument("--model", action="append", choices=MODELS, help="repeatable; default: all")
    p.add_argument("--min-time", type=number(float, 0, low_open=True), default=None,
                   help="seconds of timing per implementation (default: 2; the zoo's training steps: 12)")
    p.add_argument("--rounds", type=number(int, 1), default=None,
                   help="rounds over the implementations in turn, the order alternating (each impl: the median "
                        "of its rounds; the speedup: the median of the rounds' ratios; default: 3; the zoo: 24)")
    p.add_argument("--small", action="store_true", help="a quarter of the batch (a quick look)")
    p.add_argument("--no-decode", action="store_true",
                   help="skip the LMs' decode rows (per-token generation time at positions 64, 512, 2048)")
    p.add_argument("--json", help="write machine info and every figure to this path")


# ---- the eager cell loops: what a user writes without torch.nn.LSTM/GRU ----
def eager_lstm(x: Tensor, w_ih, w_hh, b_ih, b_hh) -> Tensor:  # x (B, T, I) -> (B, T, H)
    B, T, _ = x.shape
    h = c = x.new_zeros(B, w_hh.shape[1])
    outs = []
    for t in range(T):
        i, f, g, o = (x[:, t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).chunk(4, 1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        outs.append(h)
    return torch.stack(outs, 1)


def eager_gru(x: Tensor, w_ih, w_hh, b_ih, b_hh) -> Tensor:
    B, T, _ = x.shape
    h = x.new_zeros(B, w_hh.shape[1])
    outs = []
    for t in range(T):
        xr, xz, xn = (x[:, t] @ w_ih.t() + b_ih).chunk(3, 1)
        hr, hz, hn = (h @ w_hh.t() + b_hh).chunk(3, 1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1)


def eager_rnn(x: Tensor, w_ih, w_hh, b_ih, b_hh) -> Tensor:
    B, T, _ = x.shape
    h = x.new_zeros(B, w_hh.shape[1])
    outs = []
    for t in range(T):
        h = (x[:, t] @ w_ih.t() + b_ih + h @ w_hh.t() + b_hh).tanh()
        outs.append(h)
    return torch.stack(outs, 1)


def _fwdbwd(fn: Callable[[], Tensor], params: List[Tensor]) -> Callable[[], object]:
    def run():
        out = fn()
        return torch.autograd.grad(out.float().square().mean(), params, allow_unused=True)
    return run


def _rnn_cases(cell: str, batch: int, device) -> Dict[str, Callable[[], object]]:
    import tritium

    B, T, H = batch, 128, 512
    torch_cls, ours_cls = {"lstm": (torch.nn.LSTM, tritium.nn.LSTM), "gru": (torch.nn.GRU, tritium.nn.GRU),
                           "rnn": (torch.nn.RNN, tritium.nn.RNN)}[cell]
    ref = torch_cls(H, H, batch_first=True).to(device)
    ours = ours_cls(H, H, batch_first=True).to(device)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(B, T, H, device=device, requires_grad=True)
    eager = {"lstm": eager_lstm, "gru": eager_gru, "rnn": eager_rnn}[cell]
    p = list(ref.parameters())
    return {
        "tritium": _fwdbwd(lambda: ours(x)[0], [x] + list(ours.parameters())),
        f"torch.nn.{torch_cls.__name__}": _fwdbwd(lambda: ref(x)[0], [x] + p),
        "eager cell loop": _fwdbwd(lambda: eager(x, *p), [x] + p),
    }


def _transformer_cases(name: str, batch: int, device) -> Dict[str, Callable[[], object]]:
    from tritium.models.classic import TransformerEncoder, ViT

    B, D, depth, heads = batch, 384, 6, 6
    # tritium's model (its last block on the [CLS] row alone, its default), the twin as plain PyTorch models
    # are written (every row), and the twin given the same pruning in torch ops: the like-for-like kernel figure
    sides = {"tritium": ("tritium", None), "eager twin": ("torch", None),
             "eager twin, [CLS]-only last block": ("torch", True)}
    models = {}
    for side, (impl, cls_only) in sides.items():
        torch.manual_seed(0)
        if name == "vit":  # 224x224 images, 16x16 patches: 196 patches + [CLS] = 197 tokens
            models[side] = ViT(224, 16, 3, D, depth, heads, 1000, impl=impl, cls_only=cls_only).to(device)
        else:  # 196 tokens + [CLS] = 197
            models[side] = TransformerEncoder(30522, 196, D, depth, heads, 2, pre_norm=False, impl=impl,
                                              cls_only=cls_only).to(device)
        models[side].load_state_dict(models["tritium"].state_dict())
    if name == "vit":
        inp = torch.randn(B, 3, 224, 224, device=device)
    else:
        inp = torch.randint(0, 30522, (B, 196), device=device)
    return {side: _fwdbwd(lambda m=m: m(inp), list(m.parameters())) for side, m in models.items()}


def _scan_unbind(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, return_last_state=False):
    """tritium.reference.selective_scan (mamba_ssm's selective_scan_ref) with its time loop over unbind()'s
    slices instead of indexing: the same values, but autograd's backward of x[:, :, i] builds a zero tensor of the
    whole (batch, dim, L, N) per step (O(L^2) memory traffic) where unbind's backward stacks once. What a plain
    PyTorch user who profiled the reference would write; the fairer eager baseline for the Mamba step."""
    import torch.nn.functional as F

    if delta_bias is not None:
        delta = delta + delta_bias[..., None]
    if delta_softplus:
        delta = F.softplus(delta)
    deltaA = torch.exp(delta[..., None] * A[None, :, None, :])                       # (batch, dim, L, N)
    deltaB_u = (delta * u)[..., None] * B[:, None].transpose(2, 3)                   # B (batch, N, L)
    x = u.new_zeros(u.shape[0], A.shape[0], A.shape[1])
    ys = []
    for dA, dBu, c in zip(deltaA.unbind(2), deltaB_u.unbind(2), C.unbind(2)):
        x = dA * x + dBu
        ys.append((x * c[:, None]).sum(-1))
    out = torch.stack(ys, 2)
    out = (out if D is None else out + u * D[:, None]) * (1 if z is None else F.silu(z))
    return (out, x) if return_last_state else out


def _lm_cases(name: str, small: bool, device) -> Dict[str, Callable[[], object]]:
    from dataclasses import replace

    from ..cli.train_lm import RECIPES, batches, build, make_optimizer, train_step
    from ..models import ssm

    recipe = RECIPES[name]
    batch = recipe.batch // 4 if small else recipe.batch
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=gen)
    x, y = (t.to(device) for t in batches(data, batch, recipe.context, gen))
    sides = [("tritium", "tritium"), ("torch twin", "torch")]
    if name == "mamba":   # the twin with the scan's loop over unbind() (_scan_unbind), an impl of its own
        ssm._OPS.setdefault("torch-unbind", replace(ssm._OPS["torch"], selective_scan=_scan_unbind))
        sides.append(("torch twin, scan over unbind", "torch-unbind"))
    cases = {}
    for side, impl in sides:
        torch.manual_seed(0)
        model = build(name, impl, recipe.context).to(device)
        opt, _ = make_optimizer(model, recipe)
        cases[side] = lambda m=model, o=opt: train_step(m, o, x, y)
    return cases


DECODE_POSITIONS, DECODE_WINDOW = (64, 512, 2048), 32


def decode_per_token(start: Callable[[], Tuple[Tensor, object]], step: Callable[[Tensor, object, int], Tensor],
                     positions=DECODE_POSITIONS, window: int = DECODE_WINDOW,
                     clock: Callable[[], float] = time.perf_counter) -> Dict[int, float]:
    """Seconds per generated token at each of positions, from one greedy generation: start() -> (logits (1, vocab)
    of the prompt's last position, state), step(token (1,), state, position) -> the next logits; each step timed
    alone, a position's figure the median of the window steps from there (its first step feeds token position+1)."""
    steps = max(positions) + window
    times = []
    with torch.no_grad():
        logits, state = start()
        for pos in range(steps):
            token = logits.argmax(-1)
            t0 = clock()
            logits = step(token, state, pos + 1)
            times.append(clock() - t0)
    return {p: statistics.median(times[p:p + window]) for p in positions}


def _decode_cases(name: str, device, positions=DECODE_POSITIONS, window: int = DECODE_WINDOW,
                  size: str = "small") -> Dict[str, Tuple[Callable, Callable]]:
    """(start, step) for decode_per_token: the tritium LM ``name`` (tritium.cli.train_lm.build) through its
    prefill/step, and with ``name`` "llama" an EagerLlama of about the byte LMs' size with a contiguous KV cache."""
    from ..cli.train_lm import SIZES, build

    prompt = torch.zeros(1, 1, dtype=torch.long, device=device)
    torch.manual_seed(0)
    if name != "llama":
        model = build(name, "tritium", 128, size).to(device).eval()
        return lambda: model.prefill(prompt, last_only=True), lambda tok, state, pos: model.step(tok, state)
    from ..models.eager import EagerKVCache, EagerLlama
    from ..models.llama import LlamaConfig

    dim, layers, heads = SIZES[size]["gpt"]
    c = LlamaConfig(dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=heads, head_dim=dim // heads,
                    ffn_dim=dim * 8 // 3, vocab_size=256, max_seq_len=max(positions) + window + 1)
    model = EagerLlama(c).to(device).eval()

    def start():
        cache = EagerKVCache(c, 1, c.max_seq_len, model.lm_head.weight.dtype, device)
        return model(prompt, cache, 0, logits_to_keep=1)[:, -1], cache

    return start, lambda tok, cache, pos: model(tok[:, None], cache, pos)[:, -1]


def decode_rows(names, device, positions=DECODE_POSITIONS, window: int = DECODE_WINDOW, size: str = "small",
                llama: bool = True) -> List[dict]:
    """A decode row per LM of names (and the Llama contrast): per-token ms at positions and flat_ratio."""
    rows = []
    for name in list(names) + (["llama"] if llama else []):
        per = decode_per_token(*_decode_cases(name, device, positions, window, size), positions, window)
        first, last = per[positions[0]], per[positions[-1]]
        rows.append({"model": name, "impl": "tritium" if name != "llama" else "eager (KV cache)", "mode": "decode",
                     "ms": round(first * 1e3, 4), "tritium_speedup": None,
                     "per_token_ms": {str(p): round(t * 1e3, 4) for p, t in per.items()},
                     "flat_ratio": round(last / first, 3)})
    return rows


def _gnn_cases(name: str, small: bool, device) -> Dict[str, Callable[[], object]]:
    from ..cli.train import GNN_TRAIN_FRACTION, ZOO_RECIPES
    from ..models.zoo import GAT, GCN, build_graph, gnn_step, stochastic_block_model

    recipe = ZOO_RECIPES[name]
    x, y, src, dst = stochastic_block_model(num_nodes=1000 if small else 3000, seed=0)
    graph = build_graph(src, dst, len(y)).to(device)
    x, y = x.to(device), y.to(device)
    train_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:int(GNN_TRAIN_FRACTION * len(y))]
    train_idx = train_idx.to(device)
    cases = {}
    for side, impl in (("tritium", "tritium"), ("torch twin", "torch")):
        torch.manual_seed(0)
        model = (GCN(x.shape[1], 64, 5, impl=impl) if name == "gcn" else GAT(x.shape[1], 16, 5, impl=impl)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        cases[side] = lambda m=model, o=opt: gnn_step(m, o, x, graph, y, train_idx)
    return cases


def _kan_wavenet_cases(name: str, small: bool, device) -> Dict[str, Callable[[], object]]:
    from ..cli.train import adamw_for
    from ..models.zoo import KAN, WaveNet, kan_step, wavenet_step

    gen = torch.Generator().manual_seed(0)
    if name == "kan":
        batch = 16 if small else 64
        x = (torch.rand(batch, 64, generator=gen) * 2 - 1).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    else:
        c = torch.randint(0, 256, (4 if small else 16, 257), generator=gen).to(device)
    cases = {}
    for side, impl in (("tritium", "tritium"), ("torch twin", "torch")):
        torch.manual_seed(0)
        if name == "kan":
            model = KAN((64, 32, 10), impl=impl).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
            cases[side] = lambda m=model, o=opt: kan_step(m, o, x, y)
        else:
            model = WaveNet(impl=impl).to(device)
            opt = adamw_for(impl)(model.parameters(), lr=3e-3, weight_decay=0.0)
            cases[side] = lambda m=model, o=opt: wavenet_step(m, o, c)
    return cases


def _zoo_cases(name: str, small: bool, device) -> Dict[str, Callable[[], object]]:
    if name in ("kan", "wavenet"):
        return _kan_wavenet_cases(name, small, device)
    from ..cli.train import adamw_for
    from ..models.zoo import GAN, Siamese, gan_optimizers, gan_step, sample_batch, siamese_step

    if name in ("gcn", "gat"):
        return _gnn_cases(name, small, device)
    batch = 16 if small else 64
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(640, 1, 8, 8, generator=gen).to(device)  # the timing does not depend on the pixels
    a, b, c = (images[i.to(device)] for i in sample_batch(torch.arange(10).repeat(64), batch, "info_nce", gen))
    z = torch.randn(batch, 32, generator=gen).to(device)
    cases = {}
    for side, impl in (("tritium", "tritium"), ("torch twin", "torch")):
        torch.manual_seed(0)
        if name == "siamese":
            model = Siamese(loss="info_nce", impl=impl).to(device)
            opt = adamw_for(impl)(model.parameters(), lr=2e-3, weight_decay=1e-4)
            cases[side] = lambda m=model, o=opt: siamese_step(m, o, a, b, c)
        else:
            gan = GAN(impl=impl).to(device)
            opt_g, opt_d = gan_optimizers(gan, optimizer=adamw_for(impl))
            cases[side] = lambda g=gan, og=opt_g, od=opt_d: gan_step(g, og, od, a * 2 - 1, z)
    return cases


def _gen_cases(name: str, small: bool, device) -> Dict[str, Callable[[], object]]:
    """One training step of tritium.cli.train_gen's recipes at their batch (a quarter with --small)."""
    from ..cli.train import adamw_for
    from ..cli.train_gen import GEN_RECIPES, date_pairs
    from ..models.diffusion import DDPM, ddpm_step
    from ..models.flow import RealNVP, flow_step
    from ..models.seq2seq import Seq2Seq, encode_batch, seq2seq_step, targets

    batch = GEN_RECIPES[name].batch // (4 if small else 1)
    gen = torch.Generator().manual_seed(0)
    if name == "ddpm":  # the timing does not depend on the pixels
        x0 = (torch.rand(batch, 1, 8, 8, generator=gen) * 2 - 1).to(device)
        t = torch.randint(1000, (batch,), generator=gen).to(device)
        noise = torch.randn(batch, 1, 8, 8, generator=gen).to(device)
    elif name == "flow":
        x = torch.randn(batch, 2, generator=gen).to(device)
    else:
        pairs = date_pairs(batch)
        src = encode_batch([p[0] for p in pairs]).to(device)
        tgt_in, labels = (v.to(device) for v in targets([p[1] for p in pairs]))
    cases = {}
    for side, impl in (("tritium", "tritium"), ("torch twin", "torch")):
        torch.manual_seed(0)
        model = {"ddpm": DDPM, "flow": RealNVP, "seq2seq": Seq2Seq}[name](impl=impl).to(device)
        opt = adamw_for(impl)(model.parameters(), lr=GEN_RECIPES[name].lr, weight_decay=0.0)
        if name == "ddpm":
            cases[side] = lambda m=model, o=opt: ddpm_step(m, o, x0, t, noise)
        elif name == "flow":
            cases[side] = lambda m=model, o=opt: flow_step(m, o, x)
        else:
            cases[side] = lambda m=model, o=opt: seq2seq_step(m, o, src, tgt_in, labels)
    return cases


# The zoo's training steps (a few ms to tens of ms each) by alternating_rounds: 24 rounds of half a second per side
# keep the 9 models under ten minutes in all, and the median of that many paired ratios steady between runs.
ZOO_ROUNDS, ZOO_MIN_TIME = 24, 12.0


def alternating_rounds(cases: Dict[str, Callable[[], object]], rounds: int, min_time: float, device: str,
                       clock: Callable[[], float] = time.perf_counter) -> Tuple[Dict[str, List[float]],
                                                                               Dict[str, float]]:
    """Time each case in ``rounds`` rounds of a fixed number of calls, the cases' order reversed every other round
    (ABBA...: whichever runs second in a round, warmer or colder, is each side equally often). The calls per round
    are set once, from a calibration, so that each case spends about ``min_time / rounds`` seconds per round.
    Returns each case's seconds per call in every round, and each case's time relative to the first case's (the
    median over the rounds of the ratio of the two in that round: a slow spell of the machine lands on both sides
    of a round, so the ratios move less than the times). Python's garbage collector is off while a round runs, as
    timeit has it."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    names = list(cases)
    calls = {}
    for impl, fn in cases.items():
        fn(), fn()  # warm-up: first-call allocations, lazy imports, the optimizer's state
        sync()
        n, t = 1, 0.0
        while True:  # calibrate: double the calls until they take 50 ms
            t0 = clock()
            for _ in range(n):
                fn()
            sync()
            t = clock() - t0
            if t >= 0.05:
                break
            n *= 2
        calls[impl] = max(1, round(min_time / rounds / (t / n)))
    per = {impl: [] for impl in names}
    for r in range(rounds):
        for impl in (names if r % 2 == 0 else names[::-1]):
            fn, n = cases[impl], calls[impl]
            gc.collect()
            gc.disable()
            try:
                sync()
                t0 = clock()
                for _ in range(n):
                    fn()
                sync()
                per[impl].append((clock() - t0) / n)
            finally:
                gc.enable()
    base = per[names[0]]
    ratio = {impl: statistics.median(t / b for t, b in zip(per[impl], base)) for impl in names}
    return per, ratio


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = args.model or list(MODELS)
    rows = []
    for name in chosen:
        if name in RNNS:
            cases = _rnn_cases(name, 16 if args.small else 64, device)
        elif name in ZOO:
            cases = _zoo_cases(name, args.small, device)
        elif name in GEN:
            cases = _gen_cases(name, args.small, device)
        elif name in LMS:
            cases = _lm_cases(name, args.small, device)
        else:
            cases = _transformer_cases(name, 8 if args.small else 32, device)
        step = name in ZOO + GEN
        rounds = args.rounds or (ZOO_ROUNDS if step else 3)
        min_time = args.min_time or (ZOO_MIN_TIME if step else 2.0)
        if step:
            per, ratio = alternating_rounds(cases, rounds, min_time, device)
        else:
            # rounds over the implementations in turn, each impl's figure the median of its rounds: a slow spell
            # of the shared machine then lands on every implementation instead of on whichever ran during it
            per = {impl: [] for impl in cases}
            for _ in range(rounds):
                for impl, fn in cases.items():
                    per[impl].append(time_fn(fn, min_time / rounds, device))
            ratio = None
        times = {impl: statistics.median(v) for impl, v in per.items()}
        base = times["tritium"]
        for impl, t in times.items():
            mode = "train step" if name in LMS + ZOO + GEN else "fwdbwd"
            row = {"model": name, "impl": impl, "mode": mode, "ms": round(t * 1e3, 2),
                   "tritium_speedup": round(t / base if ratio is None else ratio[impl], 3)}
            if ratio is not None:  # the rounds' spread: half the interquartile range over the median
                q = statistics.quantiles(per[impl], n=4) if len(per[impl]) > 1 else [t, t, t]
                row["rounds"], row["spread"] = len(per[impl]), round((q[2] - q[0]) / 2 / t, 4)
            rows.append(row)
    lms = [n for n in chosen if n in LMS]
    if lms and not args.no_decode:
        rows += decode_rows(lms, device)
    table = Table(title=f"tritium bench models ({device}, forward+backward)")
    for col in ("model", "impl", "ms", "tritium speedup vs this"):
        table.add_column(col)
    for r in rows:
        if r["mode"] == "decode":  # per-token ms at each position; the speedup column: last over first
            table.add_row(r["model"], f"{r['impl']} decode", " / ".join(f"{t:.2f}" for t in r["per_token_ms"].values()),
                          f"flat ratio {r['flat_ratio']:.2f}")
        else:
            table.add_row(r["model"], r["impl"], f"{r['ms']:.1f}", f"{r['tritium_speedup']:.2f}x")
    Console().print(table)
    if args.json:
        write_json(args.json, machine_info(device), rows, {"suite": "models"})
    return rows
