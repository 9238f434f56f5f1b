"""make gpu-check: run the Triton kernels on a real CUDA GPU and write one small report (JSON + Markdown).

On a machine with a CUDA GPU (see the README's GPU section: possibly no network, its own python3 with torch and
triton already installed, nothing installable), with PYTHON (default python3):
  1. build the C++ extension in place against the torch PYTHON finds (setup.py build_ext --inplace; nothing is
     installed: tests/conftest.py and the bench step map tritium.kernels to kernels/ by hand);
  2. run every Triton kernel test (tests/kernels -k triton) on CUDA tensors with TRITON_INTERPRET unset
     (TRITIUM_TEST_DEVICE=cuda; the sm_80/sm_90 compile checks, which need the interpreter, are left out);
  3. run a short `tritium bench ops --quick` on the GPU (tritium against eager and torch.compile);
  4. write REPORT_DIR/gpu-check.json and REPORT_DIR/gpu-check.md.
Each step has a time limit so the whole run stays under 10 minutes. A failing step is recorded in the report and
makes the exit status 1; the later steps still run.
On a machine without a CUDA GPU it says so in one line and exits 0. --dry-run prints the steps' commands.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Seconds per step; their sum stays under the 10-minute budget.
LIMITS = {"build": 240, "tests": 240, "bench": 100}
# tritium.kernels lives in kernels/ (pyproject's package-dir); without an install, map it by hand.
_BENCH_BOOT = ("import sys, tritium; tritium.__path__.append({root!r}); from tritium.cli import main; "
               "sys.exit(main(sys.argv[1:]))")
_PROBE = ("import json, torch, triton; ok = torch.cuda.is_available(); print(json.dumps(dict(cuda=ok, "
          "torch=torch.__version__, triton=triton.__version__, cuda_version=torch.version.cuda, "
          "gpu=torch.cuda.get_device_name() if ok else None, "
          "capability='sm_%d%d' % torch.cuda.get_device_capability() if ok else None)))")


def probe(python: str) -> dict | None:
    """PYTHON's torch / triton / GPU, or None when it has no CUDA GPU (or no torch / triton at all)."""
    if not shutil.which("nvidia-smi") and not os.path.exists("/dev/nvidiactl"):
        return None
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    info = json.loads(out.stdout.strip().splitlines()[-1])
    return info if info["cuda"] else None


def steps(python: str, report_dir: str, jobs: int) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra environment) of each step."""
    env = {"PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT]), "TRITIUM_TEST_DEVICE": "cuda",
           "TRITON_INTERPRET": None}
    test = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels", "-k", "triton",
            "-m", "not gpu_compile and not slow", f"--junitxml={os.path.join(report_dir, 'tests.xml')}",
            "--durations=10"]
    if jobs > 1:
        test += ["-n", str(jobs)]
    bench = [python, "-c", _BENCH_BOOT.format(root=ROOT), "bench", "ops", "--quick", "--min-time", "0.1",
             "--json", os.path.join(report_dir, "bench-ops.json")]
    return [("build", [python, "setup.py", "-q", "build_ext", "--inplace"], {}),
            ("tests", test, env),
            ("bench", bench, env)]


def run_step(name, cmd, extra_env, report_dir) -> dict:
    env = dict(os.environ)
    for k, v in extra_env.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    log = os.path.join(report_dir, f"{name}.log")
    start = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=LIMITS[name]).returncode
        except subprocess.TimeoutExpired:
            rc = f"timeout after {LIMITS[name]} s"
    with open(log) as f:
        tail = f.read()[-3000:]
    return {"name": name, "command": shlex.join(cmd), "returncode": rc, "seconds": round(time.time() - start, 1),
            "log": os.path.basename(log), "tail": tail}


def test_summary(xml_path: str) -> dict | None:
    """Counts and the failing tests (id and first line of the message) from pytest's JUnit XML."""
    if not os.path.exists(xml_path):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for case in ET.parse(xml_path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            counts["failed" if bad.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (bad.get("message") or "").splitlines()[0][:300]
                             if bad.get("message") else ""})
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures}


def bench_rows(json_path: str) -> list[dict]:
    if not os.path.exists(json_path):
        return []
    with open(json_path) as f:
        data = json.load(f)
    return data.get("rows", data.get("results", [])) if isinstance(data, dict) else data


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else "x".join(map(str, v)) if isinstance(v, list) else str(v)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# gpu-check: {m.get('gpu')} ({m.get('capability')})", "",
             f"torch {m.get('torch')} (CUDA {m.get('cuda_version')}), triton {m.get('triton')}, "
             f"python {m.get('python')}; {report['seconds']} s in all.", "",
             "| step | result | seconds |", "|---|---|---|"]
    for s in report["steps"]:
        lines.append(f"| {s['name']} | {'ok' if s['returncode'] == 0 else s['returncode']} | {s['seconds']} |")
    t = report.get("tests")
    if t:
        lines += ["", f"**Triton kernel tests on CUDA:** {t['passed']} passed, {t['failed']} failed, "
                      f"{t['errors']} errors, {t['skipped']} skipped."]
        for f in t["failures"][:40]:
            lines.append(f"- `{f['test']}`: {f['message']}")
    rows = report.get("bench") or []
    if rows:
        keys = [k for k in ("op", "name", "case", "dtype", "shape", "mode", "tritium_ms", "eager_ms", "compile_ms",
                            "speedup_eager", "speedup_compile", "GBps", "TFLOPps") if k in rows[0]]
        lines += ["", "**tritium bench ops --quick**", "", "| " + " | ".join(keys) + " |",
                  "|" + "---|" * len(keys)]
        for r in rows:
            lines.append("| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |")
    for s in report["steps"]:
        if s["returncode"] != 0:
            lines += ["", f"## {s['name']} (last lines of {s['log']})", "", "```", s["tail"], "```"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--report-dir", default=os.path.join(ROOT, "gpu-check-report"))
    p.add_argument("--python", default=os.environ.get("PYTHON", "python3"), help="the interpreter to use")
    p.add_argument("--jobs", type=int, default=4, help="pytest-xdist workers for the kernel tests (1: none)")
    p.add_argument("--dry-run", action="store_true", help="print the steps' commands and exit")
    args = p.parse_args(argv)
    report_dir = os.path.abspath(args.report_dir)
    plan = steps(args.python, report_dir, args.jobs)
    if args.dry_run:
        for name, cmd, env in plan:
            sets = " ".join([f"-u {k}" for k, v in env.items() if v is None]
                            + [f"{k}={shlex.quote(v)}" for k, v in env.items() if v is not None])
            print(f"[{name}, {LIMITS[name]} s] (cd {ROOT} && {'env ' + sets + ' ' if sets else ''}{shlex.join(cmd)})")
        print(f"[report] {os.path.join(report_dir, 'gpu-check.json')} and gpu-check.md")
        return 0
    info = probe(args.python)
    if info is None:
        print(f"gpu-check: no CUDA GPU visible to {args.python} on this machine; nothing to do.")
        return 0
    os.makedirs(report_dir, exist_ok=True)
    start = time.time()
    results = []
    for name, cmd, env in plan:
        print(f"gpu-check: {name} ...", flush=True)
        results.append(run_step(name, cmd, env, report_dir))
        print(f"gpu-check: {name}: {results[-1]['returncode']} in {results[-1]['seconds']} s", flush=True)
        if name == "build" and results[-1]["returncode"] != 0:
            break  # nothing else can run without the extension
    info["python"] = subprocess.run([args.python, "-c", "import platform; print(platform.python_version())"],
                                    capture_output=True, text=True).stdout.strip()
    report = {"machine": info, "seconds": round(time.time() - start, 1), "steps": results,
              "tests": test_summary(os.path.join(report_dir, "tests.xml")),
              "bench": bench_rows(os.path.join(report_dir, "bench-ops.json"))}
    with open(os.path.join(report_dir, "gpu-check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(report_dir, "gpu-check.md"), "w") as f:
        f.write(markdown(report))
    ok = all(s["returncode"] == 0 for s in results) and len(results) == len(plan)
    print(f"gpu-check: {'ok' if ok else 'FAILED'}; report in {report_dir}/gpu-check.md")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
