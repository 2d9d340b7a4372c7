"""Entry point of ``python -m shoal.gossip`` (see runner.py)."""

import sys

from .runner import main

sys.exit(main())
