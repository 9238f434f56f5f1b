"""The OpenAI-compatible server under load: request throughput, output tok/s, TTFT and inter-token latency.

Each run starts `tritium serve`'s app (a fresh engine, so every run starts with a cold prefix cache) in this
process on a free loopback port and drives it with --clients concurrent streaming clients (raw HTTP + SSE, so the
clients' own work stays small next to the server's) until --requests requests are done; every request is a
random --prompt-len-token prompt (token ids) asking for exactly --gen-len greedy tokens (ignore_eos). A request
that fails or returns another token count is counted as lost. TTFT: request sent to its first text chunk; ITL:
the gaps between a request's text chunks (one token each, except text the server holds back, e.g. an incomplete
UTF-8 character).

--shared-prefix N adds two runs at the largest client count whose prompts all start with the same N tokens
(a shared system prompt) followed by --prompt-len unique ones: prefix caching on, then off.

The clients, the HTTP server and the engine share this process and its cores (three threads; the engine on the
main one, as `tritium serve` runs it): the numbers are the server's throughput with its load generator beside
it, not pinned to one core.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Dict, List, Optional

from .common import machine_info, write_json


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number

    p.add_argument("--clients", default=[1, 8, 32], type=comma_list(number(int, 1)),
                   help="concurrent clients per run, comma-separated (default 1,8,32)")
    p.add_argument("--requests", type=number(int, 1), default=128, help="requests per run (default 128)")
    p.add_argument("--prompt-len", type=number(int, 1), default=128, help="prompt tokens (default 128)")
    p.add_argument("--gen-len", type=number(int, 1), default=128, help="generated tokens per request (default 128)")
    p.add_argument("--shared-prefix", type=number(int, 0), default=0,
                   help="N > 0: also run the largest --clients with an N-token prefix shared by every prompt, "
                   "prefix caching on and off")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: as tritium serve)")
    p.add_argument("--weights", default="native", choices=("native", "int8", "int4", "float"))
    p.add_argument("--int8-act", default="two-term", choices=("off", "on", "two-term"),
                   help="how quantized layers take their activations (Llama.set_int8_activations: float, one int8 "
                   "term, two int8 terms; default two-term, as tritium serve; float weights: off)")
    p.add_argument("--max-batch", type=number(int, 1), default=None, help="engine max_batch (default: most clients)")
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=number(int, 0), default=0, help="seed of the random prompts")
    p.add_argument("--json", default=None, help="write the results here")


def _pct(xs: List[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def _drive(url: str, model: str, prompts: List[List[int]], clients: int, gen_len: int) -> dict:
    """clients concurrent streaming clients working through prompts; the run's figures."""
    import httpx

    todo = list(enumerate(prompts))
    ttfts: List[float] = []
    itls: List[float] = []
    out_tokens = 0
    lost = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0), limits=limits) as http:
        async def client():
            nonlocal out_tokens, lost
            while todo:
                _, prompt = todo.pop()
                body = {"model": model, "prompt": prompt, "max_tokens": gen_len, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                t0 = time.perf_counter()
                first = last = None
                usage = None
                try:
                    async with http.stream("POST", "/v1/completions", json=body) as resp:
                        if resp.status_code != 200:
                            lost += 1
                            await resp.aread()
                            continue
                        async for line in resp.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            now = time.perf_counter()
                            if '"usage": {' in line:
                                usage = json.loads(line[6:])["usage"]
                            if '"text": ""' in line or '"choices": []' in line:
                                continue
                            if first is None:
                                first = now
                                ttfts.append(now - t0)
                            else:
                                itls.append(now - last)
                            last = now
                except httpx.HTTPError:
                    lost += 1
                    continue
                if usage is None or usage["completion_tokens"] != gen_len:
                    lost += 1
                else:
                    out_tokens += gen_len

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - t0
    n = len(prompts) - lost
    return dict(wall_s=round(wall, 3), requests_done=n, lost=lost, req_per_s=round(n / wall, 4),
                output_tok_per_s=round(out_tokens / wall, 2),
                ttft_p50_ms=round(_pct(ttfts, 0.5) * 1e3, 1), ttft_p99_ms=round(_pct(ttfts, 0.99) * 1e3, 1),
                itl_p50_ms=round(_pct(itls, 0.5) * 1e3, 2), itl_p99_ms=round(_pct(itls, 0.99) * 1e3, 2))


def _run_one(model, tok, name: str, prompts: List[List[int]], clients: int, gen_len: int, max_batch: int,
             prefix_caching: bool) -> dict:
    """One run: the engine on this thread (as `tritium serve` runs it), the HTTP server and the clients on two
    others."""
    import threading

    from ..inference.engine import Engine
    from ..serve import BackgroundServer, create_app

    engine = Engine(model, tok, max_batch=max_batch, prefix_caching=prefix_caching)
    app = create_app(engine, name, max_queue=len(prompts), engine_thread=False)
    worker = app.state.tritium.worker
    out: Dict[str, object] = {}

    def drive(url: str) -> None:
        try:
            out["row"] = asyncio.run(_drive(url, name, prompts, clients, gen_len))
        except BaseException as e:   # re-raised on this thread below
            out["error"] = e
        finally:
            worker.stop()

    with BackgroundServer(app) as srv:
        clients_thread = threading.Thread(target=drive, args=(srv.url,), name="bench-clients", daemon=True)
        clients_thread.start()
        worker.run()
        clients_thread.join()
    if "error" in out:
        raise out["error"]
    if worker.error:
        raise RuntimeError(f"the engine failed: {worker.error}")
    row = out["row"]
    ps, es = engine.cache.prefix_stats, engine.stats
    row["prefix_hit_rate"] = round(ps["hit_tokens"] / ps["queried_tokens"], 4) if ps["queried_tokens"] else 0.0
    row["preemptions"] = es["preemptions"]
    return row


def run(args) -> None:
    import torch

    import tritium.models
    from ..cli.serve import served_name
    from ..models import INT8_ACT_MODES
    from ..utils import parse_dtype

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        from ..utils import cpu_has_bf16_dot

        args.dtype = "bfloat16" if cpu_has_bf16_dot() else "float32"
    int8_act = 0 if args.weights == "float" else INT8_ACT_MODES[args.int8_act]
    model, tok = tritium.models.load(args.model, parse_dtype(args.dtype), weights=args.weights, int8_act=int8_act)
    name = served_name(args.model)
    rng = random.Random(args.seed)
    vocab = model.config.vocab_size
    low = min(1000, vocab // 4)   # ordinary tokens, away from the special ones at the start of the vocabulary

    def prompts(prefix: List[int]) -> List[List[int]]:
        return [prefix + [rng.randrange(low, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]

    max_batch = args.max_batch or max(args.clients)
    plan = [(c, 0, True) for c in args.clients]
    if args.shared_prefix:
        plan += [(max(args.clients), args.shared_prefix, True), (max(args.clients), args.shared_prefix, False)]
    rows: List[Dict] = []
    print(f"{'clients':>7} {'prefix':>6} {'cache':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT p50':>9} {'p99':>8} "
          f"{'ITL p50':>8} {'p99':>8} {'hit':>5} {'lost':>4}  (ms)")
    for clients, shared, caching in plan:
        prefix = [rng.randrange(low, vocab) for _ in range(shared)]
        row = dict(clients=clients, requests=args.requests, prompt_len=args.prompt_len, gen_len=args.gen_len,
                   shared_prefix=shared, prefix_caching=caching, max_batch=max_batch)
        row.update(_run_one(model, tok, name, prompts(prefix), clients, args.gen_len, max_batch, caching))
        rows.append(row)
        print(f"{clients:7d} {shared:6d} {'on' if caching else 'off':>5} {row['req_per_s']:7.2f} "
              f"{row['output_tok_per_s']:9.1f} {row['ttft_p50_ms']:9.0f} {row['ttft_p99_ms']:8.0f} "
              f"{row['itl_p50_ms']:8.1f} {row['itl_p99_ms']:8.1f} {row['prefix_hit_rate']:5.2f} {row['lost']:4d}",
              flush=True)
    summary = _summary(rows)
    for k, v in summary.items():
        print(f"{k}: {v}")
    if args.json:
        write_json(args.json, machine_info(), rows, {
            "suite": "serve", "model": name, "dtype": args.dtype, "weights": args.weights, "int8_act": int8_act,
            "summary": summary,
            "note": "clients, HTTP server and engine in one process on a machine other work shared (2 cores); "
                    "not pinned (the server is multi-threaded)"})


def _summary(rows: List[Dict]) -> Dict[str, Optional[float]]:
    """The bars: output throughput of the most clients over one client (same prompts and lengths), and the TTFT
    p50 of the shared-prefix run with prefix caching off over on."""
    out: Dict[str, Optional[float]] = {}
    plain = {r["clients"]: r for r in rows if not r["shared_prefix"]}
    if 1 in plain and len(plain) > 1:
        top = max(plain)
        out[f"throughput_{top}_over_1_clients"] = round(plain[top]["output_tok_per_s"] /
                                                        plain[1]["output_tok_per_s"], 2)
    shared = {r["prefix_caching"]: r for r in rows if r["shared_prefix"]}
    if len(shared) == 2:
        out["shared_prefix_ttft_p50_off_over_on"] = round(shared[False]["ttft_p50_ms"] / shared[True]["ttft_p50_ms"],
                                                          2)
    out["lost_requests"] = sum(r["lost"] for r in rows)
    return out
