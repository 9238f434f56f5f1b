"""The timing-regression suite runs only when asked for (`make bench-regress`, i.e. pytest --benchmark-only):
speed is never asserted in the unit tests, and `make test` / a bare `pytest` do not collect its files. The other
files here test the bench code itself (no timing) and are always collected."""

TIMING_FILES = {"test_regress.py"}


def pytest_ignore_collect(collection_path, config):
    if collection_path.name in TIMING_FILES and not config.getoption("benchmark_only", False):
        return True
    return None
