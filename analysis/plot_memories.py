"""``fflayers memories plot`` as a script: figures and per-layer tables of the key-value memory analyses
(see :mod:`fflayers.cli.memories_plot`)."""

import sys

from fflayers.cli.memories_plot import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
