"""`python -m ddft.cli ...`: the same as the `ddft` command."""

import sys

from ddft.cli import main

sys.exit(main())
