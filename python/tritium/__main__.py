"""``python -m tritium``: the ``tritium`` command (e.g. under ``torchrun --nproc-per-node N -m tritium generate ...
--tp N``)."""
import sys

from .cli import main

sys.exit(main())
