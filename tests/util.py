"""Shared test helpers: the shapes every kernel is tried at, the tolerance rule, and the GPU compile check."""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import Callable, Sequence

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


def assert_within_torch_error(out: torch.Tensor, torch_out: torch.Tensor, ref64: torch.Tensor, what: str = ""):
    """DESIGN.md's tolerance rule: the kernel's error against a float64 reference is at most 2x the error of
    PyTorch's own op in the same dtype, plus a small atol."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == torch_out.dtype, f"{what}: dtype {out.dtype} != torch's {torch_out.dtype}"
    ours, theirs = max_err(out, ref64), max_err(torch_out, ref64)
    bound = 2 * theirs + ATOL[out.dtype] * max(1.0, ref64.abs().max().item() if ref64.numel() else 1.0)
    assert ours <= bound, f"{what}: error {ours:.3g} > bound {bound:.3g} (torch's own error {theirs:.3g})"


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
    ((y, grads) in dtype, (y, grads) in float64), for assert_within_torch_error."""
    out = {}
    for d in (dtype, torch.float64):
        ins = [leaf(a, d) for a in args]
        y = fn(*ins)
        gs = torch.autograd.grad(y, ins, dy.to(d))
        out[d] = (y.detach(), gs)
    return out[dtype], out[torch.float64]


# ---------------------------------------------------------------------------------------------------------
# GPU compile check: record the launches a launcher makes under the interpreter, then compile each one for a
# real GPU target (no GPU needed) and report shared memory and registers.
# ---------------------------------------------------------------------------------------------------------
_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


@contextlib.contextmanager
def record_launches():
    """Record (kernel, args, kwargs) of every Triton launch made inside the block (interpreter mode)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn, args, dict(kwargs)))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def launch_spec(kernel, args, kwargs) -> dict:
    """The (JSON-able) compile spec of one recorded launch: kernel location, signature, constexprs, options."""
    from triton.runtime.jit import JITFunction

    jit = JITFunction(kernel)  # the interpreter hands us the plain Python function; this only parses it
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = dict(zip(jit.arg_names, args))
    values.update(kwargs)
    signature, constexprs = {}, {}
    for i, name in enumerate(jit.arg_names):
        v = values[name]
        if i in set(jit.constexprs) or v is None:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[v.dtype]
        elif isinstance(v, bool):
            signature[name] = "i1"
        elif isinstance(v, int):
            signature[name] = "i32" if -(2**31) <= v < 2**31 else "i64"
        elif isinstance(v, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot type argument {name}={v!r}")
    return {"module": kernel.__module__, "name": kernel.__name__, "signature": signature,
            "constexprs": constexprs, "options": options}


# Runs in a fresh interpreter-free process: the Triton interpreter patches triton.language in place (and does
# not always restore it), so real compilation cannot share the process that ran the interpreter.
_COMPILE_SCRIPT = r"""
import json, sys, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import importlib
specs, archs = json.load(sys.stdin)
out = []
for spec in specs:
    fn = getattr(importlib.import_module(spec["module"]), spec["name"])
    for arch in archs:
        src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"])
        try:
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=spec["options"])
            out.append({"arch": arch, "shared": c.metadata.shared, "cubin": c.asm["cubin"].hex()})
        except Exception as e:
            out.append({"arch": arch, "error": f"{type(e).__name__}: {e}"})
json.dump(out, sys.stdout)
"""


def gpu_compile(specs, archs=(80, 90)):
    """Compile each spec for each sm_<arch> in a subprocess; returns [(spec, arch, shared, regs)]."""
    import json
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps([specs, list(archs)]),
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, f"GPU compile subprocess failed:\n{proc.stderr[-4000:]}"
    results = json.loads(proc.stdout)
    report = []
    for i, r in enumerate(results):
        spec = specs[i // len(archs)]
        assert "error" not in r, f"{spec['name']} {spec['constexprs']} sm_{r['arch']}: {r.get('error')}"
        report.append((spec, r["arch"], r["shared"], _registers(bytes.fromhex(r["cubin"]))))
    return report


def _registers(cubin: bytes) -> int:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if not tool:
        return -1
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)", out)
    return int(m.group(1)) if m else -1


def check_gpu_compile(call: Callable[[], object], archs=(80, 90)):
    """Run call() under the interpreter, compile every distinct launch it made for each arch (block sizes and
    flags as the launchers chose them), print shared memory and registers, and return
    [(kernel name, arch, constexprs, shared, regs)]. Fails on any compile error."""
    import json

    with record_launches() as launches:
        call()
    assert launches, "the call made no Triton launch"
    specs, seen = [], set()
    for kernel, args, kwargs in launches:
        spec = launch_spec(kernel, args, dict(kwargs))
        key = json.dumps(spec, sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            specs.append(spec)
    report = []
    for spec, arch, shared, regs in gpu_compile(specs, archs):
        flags = {k: v for k, v in spec["constexprs"].items() if v is not None}
        print(f"sm_{arch} {spec['name']} {flags} {spec['options']}: shared={shared} B, regs={regs}")
        report.append((spec["name"], arch, spec["constexprs"], shared, regs))
    return report
