"""``fflayers merge`` as a script: merge the partial results of a ``generate_outputs.py --shard I/N`` job
array (see :mod:`fflayers.cli.merge`)."""

import sys

from fflayers.cli.merge import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
