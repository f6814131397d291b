"""``fflayers recall`` as a script: dissecting factual recall (facts, knockout, project, extraction,
enrichment, sublayer-knockout, plot; see :mod:`fflayers.cli.recall`)."""

import sys

from fflayers.cli.recall import PROG, build_parser, main, run
from fflayers.cli.tables import read_table

__all__ = ["PROG", "build_parser", "main", "read_table", "run"]

if __name__ == "__main__":
    sys.exit(main())
