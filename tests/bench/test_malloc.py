"""`tritium bench --malloc`: in "retain" mode glibc keeps freed large blocks (a second large allocation reuses
resident memory instead of fresh pages), in "default" mode it returns them; peak-memory measurements
(released_memory) see every byte a call allocates whatever the mode and whatever tritium's output pool holds,
and restore the mode and the pool afterwards. Each check runs in a fresh process: the mode is process-wide."""
import subprocess
import sys

import pytest

from tritium.bench.common import set_malloc

_CHILD = r"""
import sys, torch, tritium
from tritium.bench.common import machine_info, set_malloc
from tritium.bench.ops import peak_extra_bytes

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

print("mode", set_malloc(sys.argv[1]), machine_info()["malloc"])
x = torch.empty(64 << 18).fill_(1.0)          # 64 MiB of float32, resident
before = rss_mib()
del x
print("freed", before - rss_mib())           # MiB the free gave back to the OS
y = torch.randn(2048, 4096)                  # tritium.rms_norm's 32 MiB output comes from its pool once warm
w = torch.ones(4096)
for _ in range(3):
    tritium.rms_norm(y, (4096,), w)
limit = tritium.pool_stats()["limit_bytes"]
print("peak", peak_extra_bytes(lambda: torch.empty(64 << 18).fill_(1.0)) / 2**20,
      peak_extra_bytes(lambda: tritium.rms_norm(y, (4096,), w)) / 2**20)
print("after", machine_info()["malloc"], tritium.pool_stats()["limit_bytes"] == limit)
"""


def _run(mode):
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and /proc/self/status: Linux")
@pytest.mark.parametrize("mode", ["retain", "default"])
def test_malloc_modes_and_peak_measurement(mode):
    res = _run(mode)
    assert res["mode"] == [mode, mode]
    freed = float(res["freed"][0])
    if mode == "retain":
        assert freed < 8, f"retain mode gave {freed:.0f} MiB back to the OS"
    else:
        assert freed > 56, f"default mode kept {64 - freed:.0f} of 64 MiB resident"
    fresh, pooled = map(float, res["peak"])
    assert 60 < fresh < 72, fresh      # the 64 MiB allocation counted in full, retained memory or not
    assert 30 < pooled < 40, pooled    # rms_norm's 32 MiB output counted although the pool holds a block for it
    assert res["after"] == [mode, "True"]


def test_malloc_mode_names_the_argument():
    with pytest.raises(ValueError, match="malloc mode: expected one of retain, default, got 'warm'"):
        set_malloc("warm")
