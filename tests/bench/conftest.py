"""The timing-regression suite runs only when asked for (`make bench-regress`, i.e. pytest --benchmark-only):
speed is never asserted in the unit tests, and `make test` / a bare `pytest` do not collect these files."""


def pytest_ignore_collect(collection_path, config):
    if collection_path.name.startswith("test_") and not config.getoption("benchmark_only", False):
        return True
    return None
