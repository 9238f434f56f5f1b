"""tritium bench models' decode rows (bench/models.py decode_per_token, decode_rows): which steps a position's
figure is the median of (on a fake clock), and the rows of the byte LMs and the Llama contrast at the tiny size and a
few positions, end to end. No timing is asserted."""
import pytest
import torch

from tritium.bench.models import LMS, decode_per_token, decode_rows


def test_decode_per_token_medians_the_window_from_each_position():
    now = [0.0]
    fed = []

    def start():
        return torch.zeros(1, 5), "state"

    def step(token, state, pos):
        assert state == "state" and token.shape == (1,)
        fed.append(pos)
        now[0] += pos * 1e-3  # a step's cost: its position in ms
        return torch.zeros(1, 5)

    per = decode_per_token(start, step, positions=(2, 10), window=3, clock=lambda: now[0])
    assert fed == list(range(1, 14))  # one generation through the last position's window
    # the window from position p feeds positions p+1 .. p+window; its median the middle one
    assert per == pytest.approx({2: 4e-3, 10: 12e-3})


def test_decode_rows_tiny_lms_and_llama():
    rows = decode_rows(LMS, "cpu", positions=(2, 9), window=2, size="tiny")
    assert [r["model"] for r in rows] == list(LMS) + ["llama"]
    for r in rows:
        assert r["mode"] == "decode" and list(r["per_token_ms"]) == ["2", "9"]
        assert all(t > 0 for t in r["per_token_ms"].values())
        # flat_ratio is rounded to 3 decimals (an absolute 5e-4), the per-token ms to 4: on a noisy run a small
        # ratio (0.0375 -> 0.038) is more than 1% off by that rounding alone
        assert r["flat_ratio"] == pytest.approx(r["per_token_ms"]["9"] / r["per_token_ms"]["2"], rel=1e-2, abs=6e-4)
