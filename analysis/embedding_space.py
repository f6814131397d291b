"""``fflayers embedding`` as a script: parameters in embedding space (keys, values, heads, tsne,
neurons-vs-hidden, export; see :mod:`fflayers.cli.embedding`)."""

import sys

from fflayers.cli.embedding import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
