"""``fflayers memories agreement`` as a script: agreement between each FFN value's top prediction and its
key's trigger examples (see :mod:`fflayers.cli.memories_agreement`)."""

import sys

from fflayers.cli.memories_agreement import PROG, build_parser, main, run, to_tsv_frame

__all__ = ["PROG", "build_parser", "main", "run", "to_tsv_frame"]

if __name__ == "__main__":
    sys.exit(main())
