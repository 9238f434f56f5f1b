"""LLM generation: decode throughput at batch 1/8/16/32 and 512-token prefill, tritium vs the eager twin and llama.cpp.

The tritium side runs through tritium.inference.Engine (paged KV cache, fused ops); the baseline is
tritium.models.eager.EagerLlama with the same weights (plain torch ops, contiguous KV cache, transformers-style
prompt pass keeping only the last logits). Both decode greedily from random prompts of equal length. Each row is
one weights mode (--weights: float, native, int8, int4) x activation dtype (--dtypes) x int8 activations
(--int8-act) and reports, besides tok/s, the weight bytes a decode step reads and the share of the step spent
beyond streaming them at this machine's copy bandwidth.

The peer: when llama-cpp-python is importable (and not --no-peer), llama.cpp runs the decode-batch-1 and prefill
cases on the same GGUF file and on Q4_0 / Q8_0 / F16 / F32 variants of it made by llama.cpp's own quantizer
(cached under ~/.cache/tritium-peer/), alternating with tritium so a slow spell of the shared machine hits both;
each tritium row gets its tok/s over the matching llama.cpp variant's (peer_pairs). ``--weights native:Q4_0``
(any variant) serves llama.cpp's own requantised file natively, paired with llama.cpp on that same file: the
same format and the same bytes on both sides.

``--quick`` measures one row (native weights, bfloat16 and two-term int8 activations as `tritium generate` serves
them, decode at batch 1, no prefill, no peer): the summary
``make demo`` prints.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .common import copy_bandwidth, dtype_name, machine_info, parse_dtype, write_json


QUICK = dict(dtypes="bfloat16", weights="native", int8_act="two-term", batches="1", decode_tokens=16, repeats=1,
             prefill_len=0, no_peer=True)

# llama.cpp variants made from the source GGUF file ("file": the file itself), by llama.cpp ftype constant
PEER_FTYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
               "F16": "LLAMA_FTYPE_MOSTLY_F16", "F32": "LLAMA_FTYPE_ALL_F32"}
PEER_VARIANTS = ("file",) + tuple(PEER_FTYPES)


def peer_pairs(weights: str, dtype: str) -> List[str]:
    """The llama.cpp variants a tritium row is compared with: float weights with the float format of their
    width (float32: F32, 16-bit: F16), native weights (the file's own blocks, Q4_1 for the embedded model) with the
    file itself and with Q4_0, int8 with Q8_0, int4 with Q4_0."""
    if weights == "float":
        return ["F32"] if dtype == "float32" else ["F16"] if dtype in ("bfloat16", "float16") else []
    if weights.startswith("native:"):   # llama.cpp's variant file served natively: paired with that same file
        return [weights.split(":", 1)[1]]
    return {"native": ["file", "Q4_0"], "int8": ["Q8_0"], "int4": ["Q4_0"]}.get(weights, [])


def _split(s: str) -> List[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# the int8_act of a row as the tables show it
ACT_LABELS = {0: "float", 1: "int8", 2: "int8x2"}


def parse_plan(weights: str, dtypes: str, int8_act: str,
               modes: Sequence[str] = ("float", "native", "int8", "int4")) -> List[Tuple[str, str, int]]:
    """(weights mode, dtype name, int8 activation mode) of every tritium model to measure, in the order given.
    Float weights have no quantized layer, so they take int8_act off only (one row, not a duplicate)."""
    from ..models import INT8_ACT_MODES

    acts = []
    for a in _split(int8_act):
        if a not in INT8_ACT_MODES:
            raise ValueError(f"takes {', '.join(INT8_ACT_MODES)}, got {a!r}")
        acts.append(INT8_ACT_MODES[a])
    plan = []
    for w in _split(weights):
        if w not in modes and not (w.startswith("native:") and w.split(":", 1)[1] in PEER_FTYPES):
            raise ValueError(f"takes {', '.join(modes)} or native:<{'|'.join(PEER_FTYPES)}>, "
                             f"got {w!r}")
        for d in _split(dtypes):
            d = dtype_name(parse_dtype(d))
            for a in ([0] if w == "float" else acts):
                if (w, d, a) not in plan:
                    plan.append((w, d, a))
    return plan


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .._args import comma_list, number, validated

    p.add_argument("--quick", action="store_true",
                   help="one row: native weights, bfloat16 decode at batch 1, 16 tokens, no prefill, no peer "
                   "(overrides the options below)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--weights", default="native,float", type=validated(lambda t: parse_plan(t, "float32", "off")),
                   help="weights modes (tritium.models.WEIGHT_MODES: float, native, int8, int4; native:Q4_0 etc.: "
                   "llama.cpp's requantised file served natively), comma-separated")
    p.add_argument("--dtypes", default="float32,bfloat16", type=validated(lambda t: parse_plan("native", t, "off")),
                   help="activation dtypes, comma-separated")
    p.add_argument("--int8-act", default="two-term", type=validated(lambda t: parse_plan("native", "float32", t)),
                   help="off, on and/or two-term, comma-separated: how quantized layers take their activations "
                   "(Llama.set_int8_activations: float, one int8 term, two int8 terms)")
    p.add_argument("--batches", default="1,8,16,32", type=validated(comma_list(number(int, 1))),
                   help="decode batch sizes, comma-separated")
    p.add_argument("--prompt-len", type=number(int, 1), default=32, help="prompt length of the decode cases")
    p.add_argument("--decode-tokens", type=number(int, 2), default=32, help="tokens decoded per measurement")
    p.add_argument("--prefill-len", type=number(int, 0), default=512, help="0: no prefill case")
    p.add_argument("--repeats", type=number(int, 1), default=3,
                   help="median of this many alternating runs per decode case")
    p.add_argument("--prefill-repeats", type=number(int, 1), default=5,
                   help="median of this many runs per prefill case (one step each: cheap to repeat, noisy alone)")
    p.add_argument("--threads", type=number(int, 1), default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp even when llama-cpp-python is installed")
    p.add_argument("--peer-variants", default=",".join(PEER_VARIANTS),
                   type=validated(comma_list(choices=PEER_VARIANTS)),
                   help="the llama.cpp variants to run (file: the GGUF file itself), comma-separated")
    p.add_argument("--json", default=None, help="write the results here")


def _alternate(fns: Sequence[Callable[[], float]], repeats: int) -> List[float]:
    """Median time of each measurement, taken in rounds (each function once per round, in order), so that a
    slow spell of the shared machine hits every side alike."""
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(max(1, repeats)):
        for s, fn in zip(samples, fns):
            s.append(fn())
    return [statistics.median(s) for s in samples]


def beyond_weights(step_s: float, weight_bytes: float, bw: float) -> float:
    """The share of a step spent beyond streaming its weights once at copy bandwidth bw (bytes/s): 0 means the
    step is as fast as the weight stream allows; negative means faster (weights served from cache)."""
    return (step_s - weight_bytes / bw) / step_s


def make_row(weights: str, dtype: str, int8_act: int, case: str, batch: int, tokens: int, t_tritium: float,
             t_eager: float, weight_bytes: int, bw: float, tput_batch1: Optional[float] = None,
             peer_s: Optional[Dict[str, float]] = None, weight_mode: str = "") -> dict:
    """One result row from the step times (seconds for `tokens` tokens; a decode step makes one per sequence).
    peer_s: {llama.cpp variant label: seconds for the same tokens}, measured alternately with t_tritium."""
    decode = case.startswith("decode")
    row = dict(weights=weights, dtype=dtype, int8_act=int8_act, weight_mode=weight_mode, case=case, batch=batch,
               tritium_tok_s=tokens / t_tritium, eager_tok_s=tokens / t_eager, speedup=t_eager / t_tritium,
               weight_bytes_per_token=weight_bytes,
               tritium_weight_bw_frac=weight_bytes / t_tritium / bw if decode else None,
               beyond_weights_frac=beyond_weights(t_tritium, weight_bytes, bw),
               scaling_vs_batch1=(tokens / t_tritium) / tput_batch1 if decode and tput_batch1 else None,
               llama_cpp_tok_s={k: tokens / t for k, t in (peer_s or {}).items()},
               vs_llama_cpp={k: t / t_tritium for k, t in (peer_s or {}).items()})
    return row


# ---------------------------------------------------------------- tritium and the eager twin

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


# ---------------------------------------------------------------- the llama.cpp peer

def peer_source(model: Optional[str]) -> Optional[str]:
    """The GGUF file llama.cpp runs: --model when it is one, the embedded default when no --model is given, None
    for a Hugging Face directory (llama.cpp would run a different file than tritium)."""
    if model is None:
        from ..models.gguf import default_model_path

        return default_model_path()
    return model if model.endswith(".gguf") else None


@contextlib.contextmanager
def _quiet_stderr():
    """Send file descriptor 2 to /dev/null meanwhile: llama.cpp's quantizer writes its per-tensor log there from
    C, past Python's sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class Peer:
    """llama.cpp through llama-cpp-python on the source GGUF file and its requantised variants, each loaded once
    and kept (the variants are small next to the machine's memory)."""

    def __init__(self, source: str, n_ctx: int, console, variants: Sequence[str] = PEER_VARIANTS):
        import llama_cpp

        self.lc, self.source, self.n_ctx, self.console = llama_cpp, source, n_ctx, console
        self.variants = [k for k in PEER_VARIANTS if k in variants]
        self.llms: Dict[str, object] = {}
        self.samples: Dict[str, Dict[str, List[float]]] = {k: {"decode": [], "prefill": []} for k in PEER_VARIANTS}

    @property
    def version(self) -> str:
        return self.lc.__version__

    @property
    def system_info(self) -> str:
        return self.lc.llama_print_system_info().decode(errors="replace").strip()

    def path(self, key: str) -> str:
        """The GGUF file of a variant, quantized by llama.cpp the first time and cached, keyed by the source
        file's name and size (a changed source gets new variants)."""
        if key == "file":
            return self.source
        cache = os.path.join(os.path.expanduser("~"), ".cache", "tritium-peer")
        stem = os.path.basename(self.source)[: -len(".gguf")]
        out = os.path.join(cache, f"{stem}-{os.path.getsize(self.source)}.{key}.gguf")
        if not os.path.exists(out):
            os.makedirs(cache, exist_ok=True)
            tmp = f"{out}.{os.getpid()}.tmp"
            params = self.lc.llama_model_quantize_default_params()
            params.ftype = getattr(self.lc, PEER_FTYPES[key])
            params.allow_requantize = True      # the source's blocks (Q4_1 for the default) are dequantised first
            params.nthread = torch.get_num_threads()
            with self.console.status(f"llama.cpp: quantizing {os.path.basename(self.source)} to {key} (once)"), \
                    _quiet_stderr():
                rc = self.lc.llama_model_quantize(self.source.encode(), tmp.encode(), params)
            if rc != 0:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise RuntimeError(f"llama_model_quantize to {key} failed ({rc})")
            os.replace(tmp, out)
        return out

    def llm(self, key: str):
        if key not in self.llms:
            path = self.path(key)
            with self.console.status(f"llama.cpp: loading {key}"):
                n = torch.get_num_threads()
                self.llms[key] = self.lc.Llama(model_path=path, n_ctx=self.n_ctx, n_batch=512, n_threads=n,
                                               n_threads_batch=n, verbose=False)
        return self.llms[key]

    def label(self, key: str) -> str:
        """A variant's name in the rows: its llama.cpp file type (the file itself: e.g. "Q4_1 (file)")."""
        if key != "file":
            return key
        ftype = self.lc.llama_model_ftype(self.llm(key).model)
        return f"{(self.lc.llama_ftype_name(ftype) or b'?').decode()} (file)"

    def weight_bytes(self, key: str) -> int:
        return int(self.lc.llama_model_size(self.llm(key).model))

    def _greedy(self, llm) -> int:
        """The argmax of the last evaluated token's logits (llama.cpp keeps only those: logits_all is off)."""
        import numpy as np

        logits = self.lc.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())

    def decode_time(self, key: str, prompt_len: int, n: int) -> float:
        """Seconds per greedy single-token eval after a random prompt, as tritium_decode_time at batch 1."""
        llm = self.llm(key)
        llm.reset()
        llm.eval(torch.randint(0, llm.n_vocab(), (prompt_len,)).tolist())
        tok = self._greedy(llm)
        llm.eval([tok])                         # first decode step (warm-up)
        tok = self._greedy(llm)
        t0 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = self._greedy(llm)
        dt = (time.perf_counter() - t0) / (n - 1)
        self.samples[key]["decode"].append(dt)
        return dt

    def prefill_time(self, key: str, length: int) -> float:
        """Seconds for one eval of `length` random tokens from an empty cache, and the greedy first token."""
        llm = self.llm(key)
        llm.reset()
        ids = torch.randint(0, llm.n_vocab(), (length,)).tolist()
        t0 = time.perf_counter()
        llm.eval(ids)
        self._greedy(llm)
        dt = time.perf_counter() - t0
        self.samples[key]["prefill"].append(dt)
        return dt

    def rows(self, args, bw: float) -> List[dict]:
        """One row per variant and case, the median over every run of it (paired with tritium rows or, for a
        variant no tritium row pairs with, measured alone here)."""
        out = []
        for key in self.variants:
            s = self.samples[key]
            if not s["decode"] and 1 in args.batch_list:
                with self.console.status(f"llama.cpp {key} decode batch 1"):
                    _alternate([lambda: self.decode_time(key, args.prompt_len, args.decode_tokens)], args.repeats)
            if not s["prefill"] and args.prefill_len > 0:
                with self.console.status(f"llama.cpp {key} prefill {args.prefill_len}"):
                    _alternate([lambda: self.prefill_time(key, args.prefill_len)], args.prefill_repeats)
            wb = self.weight_bytes(key)
            for case, tokens, ts in (("decode batch 1", 1, s["decode"]),
                                     (f"prefill {args.prefill_len}", args.prefill_len, s["prefill"])):
                if ts:
                    t = statistics.median(ts)
                    out.append(dict(variant=self.label(key), file=os.path.basename(self.path(key)), case=case,
                                    tok_s=tokens / t, weight_bytes=wb, runs=len(ts),
                                    weight_bw_frac=wb / t / bw if tokens == 1 else None,
                                    beyond_weights_frac=beyond_weights(t, wb, bw)))
        return out

    def close(self) -> None:
        for llm in self.llms.values():
            llm.close()
        self.llms.clear()


def _make_peer(args, console) -> Optional[Peer]:
    if args.no_peer:
        return None
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        console.print("[dim]llama.cpp peer: llama-cpp-python is not installed (see the README's benchmarks "
                      "section)[/dim]")
        return None
    source = peer_source(args.model)
    if source is None:
        console.print(f"[dim]llama.cpp peer skipped: {args.model} is not a GGUF file[/dim]")
        return None
    variants = _split(args.peer_variants)
    unknown = set(variants) - set(PEER_VARIANTS)
    if unknown:
        console.print(f"[red]error:[/red] --peer-variants takes {', '.join(PEER_VARIANTS)}, got {sorted(unknown)}")
        raise SystemExit(2)
    n_ctx = max(args.prefill_len, args.prompt_len + args.decode_tokens + 2) + 16
    return Peer(source, n_ctx, console, variants)


# ---------------------------------------------------------------- the rows

def _measure(args, weights: str, dtype: torch.dtype, int8_act: int, bw: float, console,
             peer: Optional[Peer]) -> List[dict]:
    """The rows of one tritium model: decode at each batch size, then the prefill (the models are freed on
    return). Decode batch 1 and the prefill alternate with the paired llama.cpp variants too."""
    import tritium.models
    from ..models.eager import EagerLlama

    dname = dtype_name(dtype)
    tag = f"{weights} {dname} {ACT_LABELS[int8_act]} act"
    path, mode = args.model, weights
    if weights.startswith("native:"):
        variant = weights.split(":", 1)[1]
        if peer is None or variant not in peer.variants:
            console.print(f"[dim]{weights} skipped: it serves llama.cpp's {variant} file, which needs the peer "
                          f"with that variant[/dim]")
            return []
        path, mode = peer.path(variant), "native"
    with console.status(f"loading the model: {tag}"):
        model, _ = tritium.models.load(path, dtype, weights=mode, int8_act=int8_act)
        eager = EagerLlama(model.config).to(dtype).load_weights(model.hf_state_dict()).requires_grad_(False)
        if not model.is_packed:             # float layers get their serving copies (quantized ones are served as is)
            model.pack_for_inference()
    wbytes = model.weight_bytes_per_token()
    keys = [k for k in peer_pairs(weights, dname) if k in peer.variants] if peer else []
    labels = [peer.label(k) for k in keys] if peer else []
    common = dict(weights=weights, dtype=dname, int8_act=int8_act, weight_bytes=wbytes, bw=bw,
                  weight_mode=model.weight_mode)
    rows: List[dict] = []
    tput1 = None
    for b in args.batch_list:
        fns = [lambda: tritium_decode_time(model, b, args.prompt_len, args.decode_tokens),
               lambda: eager_decode_time(eager, b, args.prompt_len, args.decode_tokens)]
        paired = keys if b == 1 else []
        fns += [lambda k=k: peer.decode_time(k, args.prompt_len, args.decode_tokens) for k in paired]
        with console.status(f"{tag} decode batch {b}" + (f" (and llama.cpp {', '.join(paired)})" if paired else "")):
            times = _alternate(fns, args.repeats)
        row = make_row(case=f"decode batch {b}", batch=b, tokens=b, t_tritium=times[0], t_eager=times[1],
                       tput_batch1=tput1, peer_s=dict(zip(labels, times[2:])) if paired else None, **common)
        if b == 1:
            tput1 = row["tritium_tok_s"]
            row["scaling_vs_batch1"] = 1.0
        rows.append(row)
    if args.prefill_len > 0:
        n = args.prefill_len
        fns = [lambda: tritium_prefill_time(model, n), lambda: eager_prefill_time(eager, n)]
        fns += [lambda k=k: peer.prefill_time(k, n) for k in keys]
        with console.status(f"{tag} prefill {n}" + (f" (and llama.cpp {', '.join(keys)})" if keys else "")):
            times = _alternate(fns, args.prefill_repeats)
        rows.append(make_row(case=f"prefill {n}", batch=1, tokens=n, t_tritium=times[0], t_eager=times[1],
                             peer_s=dict(zip(labels, times[2:])) if keys else None, **common))
    return rows


_RESIDENT_SNIPPET = """
import sys, torch, tritium.models
from tritium.utils import resident_bytes
before = resident_bytes()
model, tokenizer = tritium.models.load(sys.argv[1], torch.float32, weights=sys.argv[2])
print(resident_bytes() - before)
"""


def load_resident(path: Optional[str], weights: str) -> Optional[dict]:
    """What loading the model with ``weights`` adds to a fresh process's resident memory (imports done before),
    with the GGUF file's size to compare it with; None where it cannot be measured (no /proc)."""
    import subprocess

    from ..models.gguf import default_model_path

    path = path or default_model_path()
    out = subprocess.run([sys.executable, "-c", _RESIDENT_SNIPPET, path, weights], capture_output=True, text=True,
                         check=True).stdout.split()
    added = int(out[-1])
    if added <= 0:
        return None
    return {"weights": weights, "load_added_mib": added / 2**20, "file_mib": os.path.getsize(path) / 2**20}


def _pct(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.0%}"


def run(args) -> List[dict]:
    from rich.console import Console
    from rich.table import Table

    import tritium.models

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    # the table is wider than rich's default 80 columns off a terminal (a log, a pipe): give it room there
    console = Console() if sys.stdout.isatty() else Console(width=160)
    plan = parse_plan(args.weights, args.dtypes, args.int8_act, tritium.models.WEIGHT_MODES)
    args.batch_list = [int(b) for b in _split(args.batches)]
    bw = copy_bandwidth()
    peer = _make_peer(args, console)
    resident = None
    if not args.quick and (args.model is None or os.path.isfile(args.model)):   # a GGUF file
        with console.status("resident memory of a native load (fresh process)"):
            resident = load_resident(args.model, "native")
    rows: List[dict] = []
    peer_rows: List[dict] = []
    try:
        for weights, dname, act in plan:
            rows += _measure(args, weights, parse_dtype(dname), act, bw, console, peer)
        if peer:
            peer_rows = peer.rows(args, bw)
    finally:
        if peer:
            peer.close()

    table = Table(title="tritium bench generate (tok/s)",
                  caption="x eager, vs llama.cpp: tritium's tok/s over theirs; MB: weight bytes a step reads; "
                  "weights BW: those over the step time, of the copy bandwidth; beyond: the step's share beyond "
                  "that stream")
    with_peer = any(r["vs_llama_cpp"] for r in rows)
    cols = ["model", "case", "tritium", "eager", "x eager", "MB", "weights BW", "beyond", "vs batch 1"]
    for col in cols + (["vs llama.cpp"] if with_peer else []):
        table.add_column(col, justify="left" if col in ("model", "case", "vs llama.cpp") else "right")
    for r in rows:
        cells = [f"{r['weights']} {r['dtype']} {ACT_LABELS[int(r['int8_act'])]}", r["case"],
                 f"{r['tritium_tok_s']:.1f}", f"{r['eager_tok_s']:.1f}", f"{r['speedup']:.2f}x",
                 f"{r['weight_bytes_per_token'] / 1e6:.0f}", _pct(r["tritium_weight_bw_frac"]),
                 _pct(r["beyond_weights_frac"]),
                 "" if r["scaling_vs_batch1"] is None else f"{r['scaling_vs_batch1']:.1f}x"]
        if with_peer:
            cells.append(", ".join(f"{v:.2f}x {k}" for k, v in r["vs_llama_cpp"].items()))
        table.add_row(*cells)
    console.print(table)
    if peer_rows:
        pt = Table(title=f"llama.cpp {peer.version} (llama-cpp-python), same cases")
        for col in ("variant", "case", "tok/s", "MB", "weights BW", "beyond"):
            pt.add_column(col, justify="left" if col in ("variant", "case") else "right")
        for r in peer_rows:
            pt.add_row(r["variant"], r["case"], f"{r['tok_s']:.1f}", f"{r['weight_bytes'] / 1e6:.0f}",
                       _pct(r["weight_bw_frac"]), _pct(r["beyond_weights_frac"]))
        console.print(pt)
    if resident:
        console.print(f"loading {resident['weights']} adds {resident['load_added_mib']:.0f} MiB resident "
                      f"({resident['load_added_mib'] / resident['file_mib']:.2f}x the {resident['file_mib']:.0f} "
                      f"MiB file)")
    if args.json:
        machine = machine_info("cpu")
        extra = {"suite": "generate", "model": args.model or "default", "load_resident": resident}
        if peer:
            machine.update(llama_cpp=peer.version, llama_cpp_system_info=peer.system_info)
            extra["peer"] = {"name": "llama.cpp", "source": peer.source, "rows": peer_rows}
        write_json(args.json, machine, rows, extra)
        console.print(f"wrote {args.json}")
    return rows
