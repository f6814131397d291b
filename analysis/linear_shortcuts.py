"""``fflayers shortcuts`` as a script: linear shortcuts between layers (fit, r2, evaluate, early-exit,
submodules, all, plot; see :mod:`fflayers.cli.shortcuts`)."""

import sys

from fflayers.cli.shortcuts import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
