"""``python -m conveyor``: the command line (see :mod:`conveyor.cli`)."""

from __future__ import annotations

from conveyor.cli import entry

if __name__ == "__main__":
    entry()
