"""tritium bench models' alternating rounds (bench/models.py alternating_rounds), on a fake clock: the order of
the cases flips every round, every round of a case makes the same number of calls, and the speedup is the median
of the rounds' ratios, which a slow spell of the machine does not move. No timing is asserted."""
import itertools

from tritium.bench.models import alternating_rounds


class FakeClock:
    """Time advances only by the cost of the calls made; every call is logged by the case's name."""

    def __init__(self):
        self.now, self.log = 0.0, []

    def __call__(self):
        return self.now


def _case(clock, name, cost, factor=lambda: 1.0):
    def fn():
        clock.now += cost * factor()
        clock.log.append(name)
    return fn


def test_alternating_rounds_order_calls_and_ratio():
    clock = FakeClock()
    cases = {"a": _case(clock, "a", 1e-3), "b": _case(clock, "b", 3e-3)}
    per, ratio = alternating_rounds(cases, rounds=5, min_time=0.5, device="cpu", clock=clock)
    assert [len(v) for v in per.values()] == [5, 5]
    assert all(abs(t - 1e-3) < 1e-12 for t in per["a"]) and all(abs(t - 3e-3) < 1e-12 for t in per["b"])
    assert abs(ratio["a"] - 1.0) < 1e-9 and abs(ratio["b"] - 3.0) < 1e-9
    # 0.5 s over 5 rounds: 100 calls of a (1 ms), 33 of b (3 ms) a round, in the order a b | b a | a b | b a | a b
    timed = clock.log[-5 * (100 + 33):]
    runs = [(name, len(list(group))) for name, group in itertools.groupby(timed)]
    assert runs == [("a", 100), ("b", 66), ("a", 200), ("b", 66), ("a", 200), ("b", 33)]


def test_alternating_rounds_ratio_survives_a_slow_spell():
    clock = FakeClock()

    def spell():  # calls 3000 to 6000 (a stretch of rounds in the middle, either side) cost 4x
        return 4.0 if 3000 <= len(clock.log) < 6000 else 1.0

    cases = {"a": _case(clock, "a", 2e-3, spell), "b": _case(clock, "b", 5e-3, spell)}
    per, ratio = alternating_rounds(cases, rounds=9, min_time=9.0, device="cpu", clock=clock)
    assert abs(ratio["b"] - 2.5) < 1e-9
    assert max(per["a"]) > 3 * min(per["a"])  # the spell is in the times, not in the ratio
