"""``python -m tritium.cli``: the same as the ``tritium`` command."""
import sys

from . import main

sys.exit(main())
