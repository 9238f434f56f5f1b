"""`tritium bench ops --against FILE`: rows whose tritium time grew by more than REGRESSION over the recording are
listed, rows the recording lacks and rows within the factor are not (no timing: rows made up)."""
import json

from tritium.bench.ops import REGRESSION, compare


def _row(op, ms, shape=(8, 4), dtype="float32", mode="fwd"):
    return {"op": op, "shape": list(shape), "dtype": dtype, "mode": mode, "tritium_ms": ms}


def test_compare_marks_only_rows_slower_than_recorded(tmp_path):
    path = tmp_path / "then.json"
    path.write_text(json.dumps({"machine": {}, "rows": [_row("relu", 1.0), _row("relu", 1.0, mode="fwdbwd"),
                                                        _row("gelu", 2.0), _row("silu", 1.0, dtype="bfloat16")]}))
    now = [_row("relu", 1.0 * REGRESSION * 1.01), _row("relu", 1.0 * REGRESSION * 0.99, mode="fwdbwd"),
           _row("gelu", 1.0), _row("silu", 5.0), _row("tanh", 9.0)]
    lines = compare(now, str(path))
    assert len(lines) == 1 and lines[0].startswith("slower than recorded: relu 8x4 float32 fwd: tritium 1.161 ms, "
                                                   "was 1.000 ms (1.16x)"), lines
