"""``python -m medseg``: the same command as ``medseg``."""

import sys

from medseg.cli import main

sys.exit(main())
