"""The README runs as pasted: every ```python block executes in a fresh interpreter, every `tritium ...` command
of a ```bash block answers --help, every `make` target it names exists, and its op table matches the ops the
package exports. A block that cannot run here is preceded by `<!-- no-test: reason -->`.

Also: the Makefile's declared .PHONY targets exist, and bench/results/README.md is what tools/readme_table.py
generates from the recorded JSON.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
TRITIUM = [str(pathlib.Path(sys.executable).with_name("tritium"))]  # the console script pip installed


def _blocks(lang: str):
    """(index, code) of each ```lang block not preceded by a no-test comment; the comment must give a reason."""
    out = []
    for m in re.finditer(r"(<!-- no-test:(.*?)-->\s*\n)?```" + lang + r"\n(.*?)```", README, re.S):
        if m.group(1):
            assert m.group(2).strip(), f"a no-test comment must say why: {m.group(0)[:80]!r}"
            continue
        out.append((README.count("\n", 0, m.start()) + 1, m.group(3)))
    return out


PYTHON_BLOCKS = _blocks("python")
BASH_BLOCKS = _blocks("bash")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: the CPU path never imports triton
    return env


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"line{n}" for n, _ in PYTHON_BLOCKS])
def test_python_block_runs(line, code):
    """Each block in a fresh interpreter, as a user pastes it (no state from the other blocks or the tests)."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README python block at line {line} failed:\n{r.stderr[-3000:]}"


def _commands():
    """Every distinct `tritium <command> [<suite>]` and `make <target>` named in the bash blocks."""
    tritium, make = set(), set()
    for _, code in BASH_BLOCKS:
        for raw in code.splitlines():
            words = shlex.split(raw.split("#", 1)[0])
            if words[:1] == ["tritium"] and len(words) > 1:
                tritium.add(tuple(words[1:3]) if words[1] == "bench" else (words[1],))
            elif words[:1] == ["make"] and len(words) > 1:
                make.add(words[1])
    return sorted(tritium), sorted(make)


TRITIUM_COMMANDS, MAKE_TARGETS = _commands()


@pytest.mark.parametrize("command", TRITIUM_COMMANDS, ids=[" ".join(c) for c in TRITIUM_COMMANDS])
def test_bash_command_help(command):
    r = subprocess.run(TRITIUM + list(command) + ["--help"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "usage" in r.stdout.lower(), f"tritium {' '.join(command)} --help:\n{r.stderr}"


def _make_targets():
    return set(re.findall(r"^([A-Za-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.search(r"^\.PHONY:(.*)$", makefile, re.M).group(1).split())
    targets = _make_targets()
    assert phony <= targets, f"declared .PHONY but missing: {sorted(phony - targets)}"
    assert set(MAKE_TARGETS) <= targets, f"the README names missing make targets: {set(MAKE_TARGETS) - targets}"
    assert {"demo", "test"} <= set(MAKE_TARGETS)


def _op_table():
    """{op name: row cells} from the README's op table (first column: backticked names, comma-separated)."""
    section = README.split("## Ops\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `"):
            for name in re.findall(r"`(\w+)`", cells[0]):
                rows[name] = cells
    return rows


def test_op_table_matches_exports():
    import tritium.inference
    import tritium.ops

    table = _op_table()
    exported = set(tritium.ops.__all__) | {"paged_attention_decode", "append_kv"}
    assert set(tritium.inference.__all__) >= {"paged_attention_decode", "append_kv"}
    assert exported == set(table), (f"README op table vs exports: missing rows {sorted(exported - set(table))}, "
                                    f"rows for nothing exported {sorted(set(table) - exported)}")
    for name, cells in table.items():
        assert len(cells) == 6, f"{name}: the table has 6 columns, got {cells}"
        for path in re.findall(r"(?:csrc|kernels)/\w+\.(?:cpp|py)", cells[1] + " " + cells[2]):
            assert (ROOT / path).exists(), f"{name}: {path} does not exist"


def test_op_table_kernels_are_registered():
    """A row claiming a C++ kernel has a CPU kernel registered under its family's schemas."""
    import torch

    import tritium  # noqa: F401  (registers the ops)

    table = _op_table()
    schemas = {"rms_norm": "rms_norm_fwd", "softmax": "softmax_fwd", "cross_entropy": "cross_entropy_fwd",
               "kl_div": "kl_div_fwd", "rope": "rope_fwd", "flash_attention": "flash_attn_fwd",
               "lstm": "lstm_cell_fwd", "paged_attention_decode": "paged_attention_decode",
               "sample": "sample_fwd", "batch_norm_act": "batch_norm_act_fwd", "dyt": "dyt_fwd"}
    for public, op in schemas.items():
        assert table[public][1].startswith("csrc/")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"tritium::{op}", "CPU"), f"no CPU kernel for {op}"


def test_docs_are_linked_and_name_real_files():
    for doc in ("docs/architecture.md", "docs/adding-an-op.md"):
        assert doc in README, f"README does not link {doc}"
        text = (ROOT / doc).read_text()
        for path in set(re.findall(r"`((?:python/tritium|kernels|csrc|tests|tools|bench)/[\w/.-]+\.(?:py|cpp|h))`",
                                   text)):
            assert (ROOT / path).exists(), f"{doc} names {path}, which does not exist"


def test_bench_results_page_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_table.py"), "--check"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_contributor_guide_names_real_code():
    """Every private name the guide quotes (`_fake_rms_fwd`, `_norm_fwd_kernel`, ...) exists in the code."""
    text = (ROOT / "docs" / "adding-an-op.md").read_text()
    code = "\n".join(p.read_text() for d in ("python", "kernels", "csrc", "tests")
                     for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".cpp", ".h"))
    names = set(re.findall(r"`(_\w+)", text))
    assert names, "the guide quotes no code names"
    missing = sorted(n for n in names if n not in code)
    assert not missing, f"docs/adding-an-op.md quotes names that no longer exist: {missing}"
