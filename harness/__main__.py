"""``python -m harness``: the command line of :mod:`harness.cli`."""

import sys

from harness.cli import main

sys.exit(main())
