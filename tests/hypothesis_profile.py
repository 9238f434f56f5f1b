"""Hypothesis made reproducible for the suite (imported once by tests/conftest.py).

- The "tritium" profile derandomises hypothesis: each @given test draws the same examples on every run and
  machine (a failure seen once is seen again), and keeps no example database between runs. A test's own
  @settings(...) overrides only the fields it names.
- torch's global generator is registered with hypothesis, which seeds it the same way before every example and
  restores it afterwards, so the tensors an example draws with torch.randn do not depend on the examples run
  before it (nor on shrinking's replays).

HYPOTHESIS_PROFILE=dev selects hypothesis' default, randomised search instead (for hunting new failures).
"""
import os

import torch
from hypothesis import register_random, settings


class _TorchRandom:
    """torch's global generator behind the seed/getstate/setstate interface hypothesis.register_random wants."""

    def seed(self, n):
        torch.manual_seed(n)

    def getstate(self):
        return torch.get_rng_state()

    def setstate(self, state):
        torch.set_rng_state(state)


TORCH_RANDOM = _TorchRandom()   # register_random keeps a weak reference: this one lives with the module
register_random(TORCH_RANDOM)

settings.register_profile("tritium", derandomize=True, database=None)
settings.register_profile("dev", settings.get_profile("default"))
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "tritium"))
