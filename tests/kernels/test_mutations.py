"""Tests of the tests: each accumulation a Triton kernel carries across rows or blocks (a backward's dW / dB / dalpha
sums, attention's dK / dV / dQ, softmax's row sums) is broken on purpose in a temporary copy of its kernel module
(`acc += x` -> `acc = x`: only the last row or block counts), and the check that covers it must then fail. A check
that still passes would not catch the bug on a GPU either: it runs too few rows or blocks to reach that loop."""
import importlib.util
import re
import sys

import pytest
import torch

import tritium.kernels
from tests.kernels import test_activations, test_attention, test_norms, test_softmax
from tests.util import on_device

F32 = torch.float32
pytestmark = pytest.mark.slow


def _softmax(log):
    # 20000 float32 columns: past one block, so the backward sums the row in a loop
    return lambda m: test_softmax._check(m, torch.randn(2, 20000, 1, dtype=torch.float64).to(F32), 1.0, log, F32)


def _attention(m):
    # 70 queries and keys at head dim 16: two query blocks per dK/dV program, two key blocks per dQ program
    test_attention._run_case(m, F32, 1, 1, 1, 70, 70, 16)


def _dropped(line, term):
    return line, line.replace(term, "", 1)


def _assigned(line):
    return line, line.replace(" += ", " = ", 1)


# (kernel module, (source line, its mutant), the check that must fail)
MUTATIONS = [
    ("norms", _assigned("dw += dy * xhat"), lambda m: test_norms.check_many_rows(m, F32, 123)),
    ("norms", _assigned("db += dy"), lambda m: test_norms.check_layer_norm(m, F32, 123, "wb", rows=19)),
    ("norms", _dropped("tl.store(DW_PART + part + c, prev + dy * xhat, mask=mask)", "prev + "),
     lambda m: test_norms.check_many_rows(m, F32, 20000)),
    ("norms", _dropped("tl.store(DB_PART + part + c, prev + dy, mask=mask)", "prev + "),
     lambda m: test_norms.check_layer_norm(m, F32, 20000, "wb", rows=19)),
    ("activations", _assigned("da += g * x"), lambda m: test_activations.check_dyt(m, F32, 19, (7,))),
    ("activations", _assigned("dw += dy * t"), lambda m: test_activations.check_dyt(m, F32, 19, (7,))),
    ("activations", _assigned("db += dy"), lambda m: test_activations.check_dyt(m, F32, 19, (7,))),
    ("activations", _assigned("db += dy * x * x * s * (1.0 - s)"),
     lambda m: test_activations.check_swish_beta(m, F32, 19, (7,))),
    ("activations", _assigned("acc += contrib"), lambda m: test_activations.check_prelu(m, F32, False, 19, (1,))),
    ("attention", _assigned("dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)"), _attention),
    ("attention", _assigned("dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)"), _attention),
    ("attention", _assigned("dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)"), _attention),
    ("softmax", _assigned("acc += dy"), _softmax(True)),
    ("softmax", _assigned("acc += dy * tl.load(Y + cc * INNER, mask=mask, other=0.0).to(tl.float32)"), _softmax(False)),
]


def _load_copy(module, tmp_path, line=None, mutant=None):
    """A copy of tritium.kernels.<module> from a temporary file, with the one source line equal to `line` (after
    its indentation) replaced by `mutant`. Loaded as a sibling of the real module so its relative imports work."""
    path = importlib.util.find_spec(f"tritium.kernels.{module}").origin
    lines = open(path).read().split("\n")
    if line is not None:
        hits = [i for i, s in enumerate(lines) if s.strip() == line]
        assert len(hits) == 1, f"kernels/{module}.py has {len(hits)} lines `{line}` (the mutation needs exactly 1)"
        i = hits[0]
        lines[i] = lines[i][: len(lines[i]) - len(lines[i].lstrip())] + mutant
    name = f"_copy_{module}_{len(list(tmp_path.iterdir()))}"
    file = tmp_path / f"{name}.py"
    file.write_text("\n".join(lines))
    spec = importlib.util.spec_from_file_location(f"tritium.kernels.{name}", file)
    copy = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = copy
    try:
        spec.loader.exec_module(copy)
    finally:
        del sys.modules[spec.name]
    assert copy.__package__ == tritium.kernels.__name__
    return on_device(copy)


@pytest.mark.parametrize("module,change,check", MUTATIONS,
                         ids=[f"{m}-" + re.sub(r"\W+", "_", c[0])[:32].strip("_") for m, c, _ in MUTATIONS])
def test_mutant_fails(module, change, check, tmp_path):
    mutant = _load_copy(module, tmp_path, *change)
    with pytest.raises(AssertionError, match="> bound"):  # assert_within_torch_error's message
        check(mutant)


def test_unmutated_copy_passes(tmp_path):
    """The copying itself changes nothing: an unmutated copy passes the same check."""
    test_norms.check_many_rows(_load_copy("norms", tmp_path), F32, 123)
