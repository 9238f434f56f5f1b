"""Timing regressions of the headline ops and a decode step, against the baseline saved on this machine.

    make bench-baseline   # record bench/baselines/<machine>/NNNN_baseline.json (pytest-benchmark's storage)
    make bench-regress    # measure again, compare, fail when a median is more than 25% slower

Only tritium's side is timed (eager and torch.compile are the benchmark's business, `tritium bench`). The op
rows are `tritium bench ops --quick`'s, at their headline shapes, from the same case declarations.
"""
import pytest
import torch

from tritium.bench.common import parse_dtype
from tritium.bench.ops import QUICK, _grad_inputs, _runner
from tritium.bench.suites import all_cases

CASES = {c.name: c for c in all_cases()}


@pytest.mark.parametrize("name,dtype,mode", QUICK, ids=[f"{n}-{d}-{m}" for n, d, m in QUICK])
def test_op(benchmark, name, dtype, mode):
    case = CASES[name]
    shape = case.shapes[0]
    inputs = case.make(shape, parse_dtype(dtype), torch.device("cpu"))
    run = _runner(case.tritium, inputs, mode, _grad_inputs(case, inputs))
    benchmark.extra_info.update(shape=list(shape), threads=torch.get_num_threads())
    benchmark.pedantic(run, warmup_rounds=1, rounds=5, iterations=1)


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_decode_step(benchmark, dtype):
    """One greedy decode step of SmolLM2-135M at batch 1 through the engine (the model installed by make install)."""
    import tritium.models
    from tritium.inference import Engine

    model, _ = tritium.models.load(None, parse_dtype(dtype))
    eng = Engine(model, None, max_batch=1, num_blocks=64)
    eng.add_request(list(range(1, 33)), max_new_tokens=64, stop_token_ids=[])  # more than the steps taken
    eng.step()  # the prefill
    eng.step()  # the first decode step (warm-up)
    benchmark.pedantic(eng.step, warmup_rounds=1, rounds=20, iterations=1)
