"""`python -m ffscale.cli ...` = `ffscale ...` (where the console script is not on PATH)."""

import sys

from ffscale.cli import main

sys.exit(main())
