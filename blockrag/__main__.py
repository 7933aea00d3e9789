"""``python -m blockrag ...``: the same command line as the ``blockrag`` script."""

import sys

from blockrag.cli import main

sys.exit(main())
