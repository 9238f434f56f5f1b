"""LLM generation: decode throughput at batch 1/8/16/32 and 512-token prefill, tritium vs the eager twin.

The tritium side runs through tritium.inference.Engine (paged KV cache, fused ops); the baseline is
tritium.models.eager.EagerLlama with the same weights (plain torch ops, contiguous KV cache, transformers-style
prompt pass keeping only the last logits). Both decode greedily from random prompts of equal length.

``--quick`` measures one row (bfloat16 decode at batch 1, no prefill): the summary ``make demo`` prints.
"""
from __future__ import annotations

import argparse
import time
from typing import List

import torch

from .common import copy_bandwidth, dtype_name, machine_info, parse_dtype, write_json


QUICK = dict(dtypes="bfloat16", batches="1", decode_tokens=16, repeats=1, prefill_len=0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true",
                   help="one row: bfloat16 decode at batch 1, 16 tokens, no prefill (overrides the options below)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--batches", default="1,8,16,32")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length of the decode cases")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per measurement")
    p.add_argument("--prefill-len", type=int, default=512, help="0: no prefill case")
    p.add_argument("--repeats", type=int, default=2, help="best of this many runs per decode case")
    p.add_argument("--prefill-repeats", type=int, default=5,
                   help="best of this many runs per prefill case (one step each: cheap to repeat, noisy alone)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results here")


def _best_pair(ours, theirs, repeats: int):
    """Best times of two measurements taken alternately (ours, theirs, ours, ...), so that a slow spell of the
    shared machine hits both sides alike."""
    a, b = [], []
    for _ in range(repeats):
        a.append(ours())
        b.append(theirs())
    return min(a), min(b)


def tritium_decode_time(model, batch: int, prompt_len: int, n: int) -> float:
    """Seconds per decode step (each step decodes one token for every sequence of the batch)."""
    from ..inference.engine import Engine

    v = model.config.vocab_size
    eng = Engine(model, None, max_batch=batch, num_blocks=batch * (-(-(prompt_len + n + 1) // 16) + 1))
    prompts = torch.randint(0, v, (batch, prompt_len)).tolist()
    for p in prompts:
        eng.add_request(p, max_new_tokens=n + 1, stop_token_ids=[])
    eng.step()                                  # prefill all
    eng.step()                                  # first decode step (warm-up)
    t0 = time.perf_counter()
    for _ in range(n - 1):
        eng.step()
    dt = time.perf_counter() - t0
    while eng.has_work():
        eng.step()
    return dt / (n - 1)


def eager_decode_time(eager, batch: int, prompt_len: int, n: int) -> float:
    from ..models.eager import EagerKVCache

    v = eager.config.vocab_size
    ids = torch.randint(0, v, (batch, prompt_len))
    cache = EagerKVCache(eager.config, batch, prompt_len + n + 1, eager.lm_head.weight.dtype)
    with torch.no_grad():
        nxt = eager(ids, cache, 0, logits_to_keep=1)[:, -1].argmax(-1)
        nxt = eager(nxt[:, None], cache, prompt_len)[:, -1].argmax(-1)      # warm-up step
        t0 = time.perf_counter()
        for i in range(n - 1):
            nxt = eager(nxt[:, None], cache, prompt_len + 1 + i)[:, -1].argmax(-1)
        return (time.perf_counter() - t0) / (n - 1)


def tritium_prefill_time(model, length: int) -> float:
    from ..inference.engine import Engine

    eng = Engine(model, None, max_batch=1, num_blocks=-(-(length + 2) // 16) + 1)
    eng.add_request(torch.randint(0, model.config.vocab_size, (length,)).tolist(), max_new_tokens=1,
                    stop_token_ids=[])
    t0 = time.perf_counter()
    eng.step()
    return time.perf_counter() - t0


def eager_prefill_time(eager, length: int) -> float:
    from ..models.eager import EagerKVCache

    ids = torch.randint(0, eager.config.vocab_size, (1, length))
    cache = EagerKVCache(eager.config, 1, length + 1, eager.lm_head.weight.dtype)
    with torch.no_grad():
        t0 = time.perf_counter()
        eager(ids, cache, 0, logits_to_keep=1)[:, -1].argmax(-1)
        return time.perf_counter() - t0


def _measure(args, dtype: torch.dtype, batches: List[int], bw: float, console) -> List[dict]:
    """The rows of one dtype: decode at each batch size, then the prefill (the models are freed on return)."""
    import tritium.models
    from ..models.eager import EagerLlama

    rows: List[dict] = []
    with console.status(f"loading the model in {dtype_name(dtype)}"):
        model, _ = tritium.models.load(args.model, dtype)
        eager = EagerLlama(model.config).to(dtype).load_weights(model.hf_state_dict()).requires_grad_(False)
    wbytes = model.weight_bytes_per_token()
    tritium_tput = {}
    for b in batches:
        with console.status(f"{dtype_name(dtype)} decode batch {b}"):
            tt, te = _best_pair(lambda: tritium_decode_time(model, b, args.prompt_len, args.decode_tokens),
                                lambda: eager_decode_time(eager, b, args.prompt_len, args.decode_tokens),
                                args.repeats)
        tritium_tput[b] = b / tt
        rows.append(dict(dtype=dtype_name(dtype), case=f"decode batch {b}", batch=b,
                         tritium_tok_s=b / tt, eager_tok_s=b / te, speedup=te / tt,
                         tritium_weight_bw_frac=wbytes / tt / bw,
                         scaling_vs_batch1=(b / tt) / tritium_tput[1] if 1 in tritium_tput else None))
    if args.prefill_len > 0:
        with console.status(f"{dtype_name(dtype)} prefill {args.prefill_len}"):
            tt, te = _best_pair(lambda: tritium_prefill_time(model, args.prefill_len),
                                lambda: eager_prefill_time(eager, args.prefill_len), args.prefill_repeats)
        rows.append(dict(dtype=dtype_name(dtype), case=f"prefill {args.prefill_len}", batch=1,
                         tritium_tok_s=args.prefill_len / tt, eager_tok_s=args.prefill_len / te,
                         speedup=te / tt, tritium_weight_bw_frac=None, scaling_vs_batch1=None))
    return rows


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    batches = [int(b) for b in args.batches.split(",") if b]
    rows: List[dict] = []
    bw = copy_bandwidth()
    for dname in args.dtypes.split(","):
        rows += _measure(args, parse_dtype(dname), batches, bw, console)

    table = Table(title="tritium bench generate (tok/s; speedup = tritium / eager twin)")
    for col in ("dtype", "case", "tritium tok/s", "eager tok/s", "speedup", "weights BW", "vs batch 1"):
        table.add_column(col, justify="right" if col not in ("dtype", "case") else "left")
    for r in rows:
        table.add_row(r["dtype"], r["case"], f"{r['tritium_tok_s']:.1f}", f"{r['eager_tok_s']:.1f}",
                      f"{r['speedup']:.2f}x",
                      "" if r["tritium_weight_bw_frac"] is None else f"{r['tritium_weight_bw_frac']:.0%}",
                      "" if r["scaling_vs_batch1"] is None else f"{r['scaling_vs_batch1']:.1f}x")
    console.print(table)
    if args.json:
        write_json(args.json, machine_info("cpu"), rows, {"suite": "generate", "model": args.model or "default"})
        console.print(f"wrote {args.json}")
    return rows
