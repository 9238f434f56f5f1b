"""``tritium bench hf``: a Hugging Face model patched by tritium.integrations.transformers vs the same model unpatched.

The model is loaded by transformers itself (``--model smollm2``: SmolLM2-135M from the embedded GGUF file,
dequantised to float32) and saved once to a temporary directory, from which every copy and every child process
loads it.

- ``--train``: one training step (forward with ``labels`` + backward; no optimizer), batch x seq tokens (4 x 1024
  by default), float32 and bfloat16: tokens/s of tritium-patched eager, unpatched eager and unpatched
  ``torch.compile``, all three in one process, timed in rounds over the three in turn (each figure the median of its
  rounds, so a slow spell of a shared machine lands on every variant). Peak memory: each variant's one step in a
  fresh process (memory.py's method: large allocations straight to mmap, tritium's output pool off), the
  resident-set high-water mark during the step minus the resident set before it, the model and its inputs already
  in memory: activations, logits, gradients and workspace.
- ``--generate``: greedy ``generate()`` (batch 1, a 32-token prompt, 128 new tokens), tokens/s of patched vs
  unpatched eager, in rounds as above.
Neither flag: both.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch

from .common import machine_info, write_json

MODELS = ("smollm2",)
VARIANTS = ("tritium", "eager", "compile")   # patched eager, unpatched eager, unpatched torch.compile


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number

    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--train", action="store_true", help="the training step (default: --train and --generate)")
    p.add_argument("--generate", action="store_true", help="generate() tokens/s")
    p.add_argument("--dtypes", default=["float32", "bfloat16"], type=comma_list(choices=("float32", "bfloat16")),
                   help="comma-separated")
    p.add_argument("--batch", type=number(int, 1), default=4)
    p.add_argument("--seq", type=number(int, 2), default=1024)
    p.add_argument("--new-tokens", type=number(int, 1), default=128)
    p.add_argument("--rounds", type=number(int, 1), default=3, help="rounds over the variants in turn")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (its compile is slow)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--json", help="write machine info and every figure to this path")


def save_model(name: str, folder: str) -> str:
    """transformers' own load of the model (dequantised to float32), saved as safetensors to folder through a model
    built from its config (transformers does not save a model it loaded from GGUF); returns folder."""
    from transformers import AutoModelForCausalLM

    from ..models.gguf import default_model_path

    path = default_model_path()
    loaded = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    config = loaded.config
    del config.quantization_config  # the weights are float now: a reload must not look for GGUF blocks
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(folder)
    return folder


def load(folder: str, dtype: torch.dtype, variant: str):
    """A fresh copy in dtype: patched (variant "tritium"), plain, or plain under torch.compile."""
    from transformers import AutoModelForCausalLM

    import tritium.integrations.transformers as tt

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    if variant == "tritium":
        tt.apply(model)
    return torch.compile(model) if variant == "compile" else model


def train_step(model, ids: torch.Tensor) -> Callable[[], None]:
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return step


def _tokens(vocab: int, batch: int, seq: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


def _timed_rounds(fns: Dict[str, Callable[[], object]], rounds: int) -> Dict[str, float]:
    """Median seconds per call of each fn, one call per fn per round in turn, after one warm-up call each."""
    for fn in fns.values():
        fn()
    per = {k: [] for k in fns}
    for _ in range(max(1, rounds)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            per[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in per.items()}


_CHILD = r"""
import json, sys, torch
from tritium.bench.hf import _tokens, load, train_step
folder, dtype, variant = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
batch, seq = int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(int(sys.argv[6]))

def kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1])

model = load(folder, dtype, variant)
step = train_step(model, _tokens(model.config.vocab_size, batch, seq))
step()  # warm-up (and the compile)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = kib("VmRSS")
step()
print(json.dumps({"peak_bytes": (kib("VmHWM") - before) * 1024}))
"""


def peak_step_bytes(folder: str, dtype: str, variant: str, batch: int, seq: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITIUM_CPU_POOL_MB="0")
    out = subprocess.run([sys.executable, "-c", _CHILD, folder, dtype, variant, str(batch), str(seq),
                          str(torch.get_num_threads())], env=env, capture_output=True, text=True, check=True)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"])


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    do_train = args.train or not args.generate
    do_generate = args.generate or not args.train
    variants = [v for v in VARIANTS if not (args.no_compile and v == "compile")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tritium-bench-hf-") as folder:
        save_model(args.model, folder)
        for dtype_s in args.dtypes:
            dtype = getattr(torch, dtype_s)
            if do_train:
                models = {v: load(folder, dtype, v) for v in variants}
                ids = _tokens(models["eager"].config.vocab_size, args.batch, args.seq)
                times = _timed_rounds({v: train_step(m, ids) for v, m in models.items()}, args.rounds)
                del models
                for v in variants:
                    peak = None if args.no_memory else peak_step_bytes(folder, dtype_s, v, args.batch, args.seq)
                    rows.append(dict(model=args.model, task="train", dtype=dtype_s, variant=v, batch=args.batch,
                                     seq=args.seq, tokens_per_s=round(args.batch * args.seq / times[v], 1),
                                     peak_MiB=None if peak is None else round(peak / 2 ** 20, 1)))
            if do_generate:
                models = {v: load(folder, dtype, v).eval() for v in ("tritium", "eager")}
                prompt = _tokens(models["eager"].config.vocab_size, 1, 32)
                kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)

                def gen(m):
                    with torch.no_grad():
                        return m.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
                times = _timed_rounds({v: (lambda m=m: gen(m)) for v, m in models.items()}, args.rounds)
                del models
                for v, t in times.items():
                    rows.append(dict(model=args.model, task="generate", dtype=dtype_s, variant=v, batch=1,
                                     seq=args.new_tokens, tokens_per_s=round(args.new_tokens / t, 1), peak_MiB=None))
    for r in rows:  # tritium's ratio to each variant of the same task and dtype
        mine = next(x for x in rows if (x["task"], x["dtype"], x["variant"]) == (r["task"], r["dtype"], "tritium"))
        r["tritium_speedup"] = round(mine["tokens_per_s"] / r["tokens_per_s"], 3)
        if r["peak_MiB"] and mine["peak_MiB"]:
            r["tritium_memory_ratio"] = round(mine["peak_MiB"] / r["peak_MiB"], 3)
    table = Table(title=f"tritium bench hf ({args.model}, {torch.get_num_threads()} threads)")
    for col in ("task", "dtype", "variant", "tokens", "tok/s", "tritium speedup vs this", "peak MiB",
                "tritium memory vs this"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["task"], r["dtype"], r["variant"], f"{r['batch']}x{r['seq']}", f"{r['tokens_per_s']:.1f}",
                      f"{r['tritium_speedup']:.2f}x", "-" if r["peak_MiB"] is None else f"{r['peak_MiB']:.0f}",
                      f"{r['tritium_memory_ratio']:.2f}x" if "tritium_memory_ratio" in r else "-")
    Console().print(table)
    if args.json:
        write_json(args.json, machine_info("cpu"), rows, {"suite": "hf"})
    return rows
