"""``python -m conveyor``: the command line (see :mod:`conveyor.cli`)."""

from __future__ import annotations

import sys

from conveyor.cli import main

if __name__ == "__main__":
    sys.exit(main())
