"""``python -m fflayers.explore``: the same as ``fflayers explore``."""

import sys

from fflayers.cli.explore import main

sys.exit(main())
