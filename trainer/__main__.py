"""`python -m trainer` runs the same command as the `trainer` console script."""

import sys

from trainer.cli import main

sys.exit(main())
