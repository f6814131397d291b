"""``fflayers memories mine`` as a script, with the flags of the original ``analysis/generate_outputs.py``
(see :mod:`fflayers.cli.memories_mine`)."""

import sys

from fflayers.cli.memories_mine import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
