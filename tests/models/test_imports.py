"""The package's import arrows: ``import tritium`` stays cheap and reaches the sub-packages lazily; the models
import nothing from the serving engine, the benchmarks or the command line (they import the models)."""
import ast
import os
import subprocess
import sys

import pytest

import tritium

MODELS_DIR = os.path.join(os.path.dirname(tritium.__file__), "models")
FORBIDDEN = ("inference", "bench", "cli")


def _imported_modules(path):
    """Absolute names of the tritium modules a file under tritium/models imports (relative imports resolved)."""
    tree = ast.parse(open(path).read(), path)
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:   # relative to a file in tritium/models: level 1 is tritium.models, level 2 tritium
                base = ".".join(["tritium", "models"][:3 - node.level])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            names.append(mod)
            names += [f"{mod}.{a.name}" for a in node.names]   # `from tritium import inference` names a package
    return names


def test_models_import_neither_inference_bench_nor_cli():
    files = [f for f in os.listdir(MODELS_DIR) if f.endswith(".py")]
    assert "llama.py" in files
    bad = []
    for f in files:
        for name in _imported_modules(os.path.join(MODELS_DIR, f)):
            parts = name.split(".")
            if parts[0] == "tritium" and len(parts) > 1 and parts[1] in FORBIDDEN:
                bad.append(f"{f}: {name}")
    assert not bad, bad


def test_import_resolution_helper_sees_forbidden_imports(tmp_path):
    """The check above must be able to fail: both spellings of a forbidden import are caught."""
    p = tmp_path / "x.py"
    p.write_text("from ..inference.engine import Engine\nimport tritium.bench.common\nfrom tritium import cli\n")
    assert {"tritium.inference.engine", "tritium.bench.common", "tritium.cli"} <= set(_imported_modules(str(p)))


def test_import_tritium_is_cheap_and_subpackages_are_lazy():
    code = ("import sys, tritium\n"
            "heavy = [m for m in ('triton', 'transformers', 'tritium.inference', 'tritium.models', 'tritium.bench',"
            " 'tritium.cli', 'gguf') if m in sys.modules]\n"
            "assert not heavy, heavy\n"
            "assert callable(tritium.models.load) and 'tritium.models' in sys.modules\n"
            "assert 'tritium.inference' not in sys.modules, 'the models must not import the engine'\n"
            "assert tritium.inference.Engine\n"
            "try:\n"
            "    tritium.no_such_thing\n"
            "except AttributeError as e:\n"
            "    assert 'no_such_thing' in str(e)\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["models", "inference", "reference", "utils", "cli"])
def test_subpackages_reachable_from_import_tritium(name):
    assert getattr(tritium, name).__name__ == f"tritium.{name}"
