"""The version of the installed shoal.

Owns: reading it once from the installed distribution's metadata (pyproject's ``version``),
for ``shoal --version``, ``shoal info`` and the agent's gossip metadata (``node ls``).
Must not touch: anything else.
"""

from __future__ import annotations

import functools
from importlib import metadata

UNKNOWN = "0+unknown"  # run from a source tree that was never installed


@functools.cache
def version() -> str:
    """shoal's version, e.g. "0.1.0" (UNKNOWN when no distribution is installed)."""
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return UNKNOWN
