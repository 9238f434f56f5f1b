"""make kernel-coverage: which lines and branches of kernels/*.py the kernel tests never execute.

Under the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) a @triton.jit function runs as Python,
compiled from its own source with its own file name and line numbers, so `coverage` measures it like any other
code. This tool runs the Triton kernel tests (tests/kernels, without the sm_80/sm_90 compile checks and the slow
mutation tests) under pytest-cov with branch measurement, measuring kernels/ only, and prints
  - kernel lines (statements inside @triton.jit functions): total, executed, and each unexecuted one;
  - kernel branches (both ways of every `if`, loop entered and loop skipped): total, taken, each one not taken;
  - the unexecuted lines of the host code (launchers and helpers around the kernels).
It exits 1 when an unexecuted line or an untaken kernel branch is not on ALLOWED below (each entry says why the
interpreter cannot run it), when an ALLOWED entry is executed after all (stale: remove it), or when a test fails.

A contributor's tool, not part of `make test` (it runs the kernel tests once more under a tracer: minutes).
  python tools/kernel_coverage.py [--jobs N] [--keep DIR]     run the tests, then report
  python tools/kernel_coverage.py --data DIR/.coverage        report on the data of an earlier run (--keep DIR)

One artefact of the interpreter is corrected: it compiles a kernel from its `def` line on, without the decorator,
so the kernel's code object starts one line later than the function coverage finds in the file, and its exits are
recorded as arcs to -(def line) while coverage expects -(decorator line). An exit is counted as taken when the
recorded data has it under either number.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = os.path.join(ROOT, "kernels")
TESTS = ["tests/kernels", "-m", "not gpu_compile and not slow"]

# Lines (and kernel branches) the interpreter cannot execute: (file, scope, text) -> reason. scope is the kernel's
# name or "host"; text is the statement's first source line without its indentation, or for a branch
# "<from line> -> <to line>" ("exit" for leaving the kernel). Keyed by text, not line number, so edits elsewhere in
# the file keep an entry valid.
ALLOWED: dict[tuple[str, str, str], str] = {
    ("kernels/_utils.py", "host", "sms = torch.cuda.get_device_properties(device).multi_processor_count"):
        "CUDA devices only: under the interpreter the tensors are on the CPU (the else branch sizes the grid)",
}


class Kernel:
    def __init__(self, node: ast.FunctionDef):
        self.name = node.name
        self.first, self.last = node.body[0].lineno, node.end_lineno
        self.def_line = node.lineno
        self.start = min([d.lineno for d in node.decorator_list] + [node.lineno])  # coverage's exit number

    def __contains__(self, line: int) -> bool:
        return self.first <= line <= self.last


def jit_kernels(path: str) -> list[Kernel]:
    """Each @triton.jit function of the file (any decorator spelled `*.jit`, `jit` or `*.jit(...)`)."""
    out = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if (target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", None)) == "jit":
                    out.append(Kernel(node))
                    break
    return out


def run_tests(data_file: str, jobs: int) -> int:
    """The kernel tests under pytest-cov (each xdist worker measured, then combined into data_file)."""
    env = dict(os.environ, COVERAGE_FILE=data_file)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS, f"--cov={KERNELS}", "--cov-branch",
           "--cov-report="]
    if jobs > 1:
        cmd += ["-n", str(jobs)]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=ROOT, env=env)


def analyse(data_file: str) -> int:
    import coverage

    cov = coverage.Coverage(data_file=data_file, branch=True)
    cov.load()
    with tempfile.TemporaryDirectory() as tmp:
        cov.json_report(outfile=os.path.join(tmp, "r.json"), include=[os.path.join(KERNELS, "*.py")])
        files = {os.path.abspath(os.path.join(ROOT, k)): v for k, v in
                 json.load(open(os.path.join(tmp, "r.json")))["files"].items()}
    data = cov.get_data()
    if not data.has_arcs():
        sys.exit(f"kernel_coverage: {data_file} has no branch data (measured without --cov-branch?)")

    lines = {"kernel": [0, 0], "host": [0, 0]}  # [total, executed]
    branches = [0, 0]  # kernel branches [total, taken]
    allowed, unexpected = [], []
    seen: set[tuple[str, str, str]] = set()

    def unexecuted(key, where, what):
        if key in ALLOWED:
            seen.add(key)
            allowed.append(f"  {where:<26} [{key[1]}] {what}\n      allowed: {ALLOWED[key]}")
        else:
            unexpected.append(f"  {where:<26} [{key[1]}] {what}")

    for name in sorted(os.listdir(KERNELS)):
        if not name.endswith(".py"):
            continue
        path, rel = os.path.join(KERNELS, name), f"kernels/{name}"
        if path not in files:
            sys.exit(f"kernel_coverage: {rel} is not in the coverage data {data_file} (was kernels/ measured?)")
        info, src = files[path], open(path).read().split("\n")
        kernels = jit_kernels(path)

        def kernel_at(line):
            return next((k for k in kernels if line in k), None)

        executed, missing = set(info["executed_lines"]), set(info["missing_lines"])
        for line in sorted(executed | missing):
            k = kernel_at(line)
            scope = k.name if k else "host"
            counts = lines["kernel" if k else "host"]
            counts[0] += 1
            if line in executed:
                counts[1] += 1
            else:
                text = src[line - 1].strip()
                unexecuted((rel, scope, text), f"{rel}:{line}", text)

        recorded = set(data.arcs(path) or ())
        arcs = [(a, b, True) for a, b in info["executed_branches"]]
        for a, b, taken in arcs + [(a, b, False) for a, b in info["missing_branches"]]:
            k = kernel_at(a)
            if k is None:
                continue
            # an exit recorded under the interpreter's own start line (see the docstring) was taken
            taken = taken or (b == -k.start and (a, -k.def_line) in recorded)
            branches[0] += 1
            branches[1] += taken
            if not taken:
                text = f"{src[a - 1].strip()} -> {'exit' if b < 0 else src[b - 1].strip()}"
                unexecuted((rel, k.name, text), f"{rel}:{a}->{'exit' if b < 0 else b}", text)
    stale = [f"  {k[0]} [{k[1]}] {k[2]}" for k in ALLOWED if k not in seen]

    (kt, kr), (ht, hr) = lines["kernel"], lines["host"]
    print(f"\nkernel lines (statements inside @triton.jit functions): {kt} total, {kr} executed, {kt - kr} unexecuted")
    print(f"kernel branches: {branches[0]} total, {branches[1]} taken, {branches[0] - branches[1]} not taken")
    print(f"host lines (launchers and helpers): {ht} total, {hr} executed, {ht - hr} unexecuted")
    if allowed:
        print(f"\nunexecuted, on the allow-list ({len(allowed)}):")
        print("\n".join(allowed))
    ok = True
    if unexpected:
        ok = False
        print(f"\nFAIL: unexecuted and not on the allow-list ({len(unexpected)}): add a test case that runs each "
              f"(tests/kernels/test_coverage_cases.py), or an ALLOWED entry in tools/kernel_coverage.py saying why "
              f"the interpreter cannot run it")
        print("\n".join(unexpected))
    if stale:
        ok = False
        print(f"\nFAIL: allow-list entries that were executed or no longer exist ({len(stale)}): remove them")
        print("\n".join(stale))
    if ok:
        print("\nOK: every line of kernels/ and every kernel branch is executed, or allowed with its reason")
    return 0 if ok else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=2, help="pytest-xdist workers (default 2)")
    ap.add_argument("--data", help="report on this coverage data file (of an earlier --keep run) without running")
    ap.add_argument("--keep", help="directory to keep the coverage data in (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.data:
        return analyse(args.data)
    with tempfile.TemporaryDirectory(prefix="kernel-coverage-") as tmp:
        keep = args.keep or tmp
        os.makedirs(keep, exist_ok=True)
        data_file = os.path.join(keep, ".coverage")
        status = run_tests(data_file, args.jobs)
        if not os.path.exists(data_file):
            print(f"kernel_coverage: the test run wrote no coverage data (pytest status {status})", file=sys.stderr)
            return 1
        result = analyse(data_file)
        if status != 0:
            print(f"\nFAIL: the kernel tests themselves failed (pytest exit status {status})")
            return 1
        return result


if __name__ == "__main__":
    sys.exit(main())
