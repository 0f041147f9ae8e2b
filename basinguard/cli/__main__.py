"""`python -m basinguard.cli`."""

import sys

from basinguard.cli import main

sys.exit(main())
