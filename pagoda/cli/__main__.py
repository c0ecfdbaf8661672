"""`python -m pagoda.cli`: the same entry point as the `pagoda` console script."""

import sys

from pagoda.cli import main

sys.exit(main())
