"""``fflayers memories textual`` as a script: trigger-examples JSONL -> one text file per key
(see :mod:`fflayers.cli.memories_textual`)."""

import sys

from fflayers.cli.memories_textual import PROG, build_parser, main, run

__all__ = ["PROG", "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
