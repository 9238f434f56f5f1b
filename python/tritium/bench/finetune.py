"""``tritium bench finetune``: one LoRA SFT training step of ``tritium finetune`` against the same step with PEFT.

Both sides train the same adapters (r 16 on every projection, alpha 32, no dropout) on the embedded
SmolLM2-135M-Instruct with the same weights and the same batch (``--batch`` examples of the built-in date task,
prompt tokens masked), a step being forward, loss, backward and the optimizer step:

- tritium: tritium's Llama with ``tritium.lora`` adapters, ``fused_linear_cross_entropy`` on the hidden states,
  ``tritium.optim.AdamW`` (what ``tritium finetune`` runs);
- peft: PEFT's LoRA on the plain-PyTorch eager twin (tritium.models.eager.EagerLlama, Hugging Face's layout),
  ``F.cross_entropy`` on its logits, ``torch.optim.AdamW`` (what a user writes with PEFT);
- peft-compile: the same under ``torch.compile`` (the model's forward compiled; --no-compile skips it).

Timed in rounds over the variants in turn, each figure the median of its rounds (a slow spell of a shared machine
lands on every variant); tokens/s counts every token of the padded batch.
"""
from __future__ import annotations

import argparse
from typing import Callable, List

import torch
import torch.nn.functional as F

from .common import machine_info, write_json

VARIANTS = ("tritium", "peft", "peft-compile")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number

    p.add_argument("--dtypes", default=["bfloat16", "float32"], type=comma_list(choices=("float32", "bfloat16")),
                   help="comma-separated")
    p.add_argument("--batch", type=number(int, 1), default=16, help="examples per step")
    p.add_argument("--rounds", type=number(int, 1), default=5, help="rounds over the variants in turn")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--json", help="write machine info and every figure to this path")


def _batch(tok, n: int):
    from ..finetune import batches, dates_task, encode

    import random

    enc = [encode(ex, tok, 512) for ex in dates_task(n, seed=0)]
    return next(batches(enc, n, random.Random(0), tok.eos_id or 0))


def tritium_step(model, ids, labels) -> Callable[[], None]:
    import tritium
    from ..finetune import sft_loss

    tritium.lora.apply(model, r=16, alpha=32, dropout=0.0)
    opt = tritium.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0,
                              master_weights=True)
    model.train()

    def step():
        sft_loss(model, ids, labels).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def peft_step(model, ids, labels, compiled: bool) -> Callable[[], None]:
    import peft

    from ..finetune import PROJECTIONS

    pm = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                    target_modules=list(PROJECTIONS)), autocast_adapter_dtype=False)
    pm.train()
    fwd = torch.compile(pm.base_model.model) if compiled else pm.base_model.model
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    x, y = ids[:, :-1], labels[:, 1:].flatten()

    def step():
        logits = fwd(x)
        F.cross_entropy(logits.flatten(0, 1).float(), y, ignore_index=-100).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    import tritium.models
    from .hf import _timed_rounds

    variants = [v for v in VARIANTS if not (args.no_compile and v == "peft-compile")]
    rows = []
    for dtype_s in args.dtypes:
        dtype = getattr(torch, dtype_s)
        model, tok = tritium.models.load(None, dtype, weights="float")
        ids, labels = _batch(tok, args.batch)
        steps = {}
        for v in variants:
            if v == "tritium":
                steps[v] = tritium_step(model, ids, labels)
            else:
                from ..models.eager import EagerLlama

                twin = EagerLlama(model.config).to(dtype).load_weights(model.hf_state_dict())
                steps[v] = peft_step(twin, ids, labels, v == "peft-compile")
        times = _timed_rounds(steps, args.rounds)
        del steps, model
        for v in variants:
            rows.append(dict(model="smollm2", task="lora-sft", dtype=dtype_s, variant=v, batch=args.batch,
                             seq=ids.shape[1], tokens_per_s=round(ids.numel() / times[v], 1), peak_MiB=None))
    for r in rows:
        mine = next(x for x in rows if (x["dtype"], x["variant"]) == (r["dtype"], "tritium"))
        r["tritium_speedup"] = round(mine["tokens_per_s"] / r["tokens_per_s"], 3)
    table = Table(title=f"tritium bench finetune (SmolLM2-135M, LoRA r 16, {torch.get_num_threads()} threads)")
    for col in ("dtype", "variant", "tokens", "tok/s", "tritium speedup vs this"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["dtype"], r["variant"], f"{r['batch']}x{r['seq']}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tritium_speedup']:.2f}x")
    Console().print(table)
    if args.json:
        write_json(args.json, machine_info("cpu"), rows, {"suite": "finetune"})
    return rows
