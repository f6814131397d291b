"""``python -m fflayers.explore``: the same as ``fflayers explore``."""

import sys

from fflayers.cli.explore import main

if __name__ == "__main__":
    sys.exit(main())
