"""``fflayers neurons`` as a script: knowledge neurons of facts and the effect of suppressing / enhancing them
(see :mod:`fflayers.cli.neurons`). Runs under ``torchrun`` as it is."""

import sys

from fflayers.cli.neurons import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
