"""``python -m fflayers``: the ``fflayers`` command."""

import sys

from fflayers.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
