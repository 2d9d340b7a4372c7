"""The version of shoal.

Owns: the version string itself — pyproject.toml reads it from here (``[tool.setuptools.dynamic]``),
so the wheel, ``shoal --version``, ``shoal info`` and the agent's gossip metadata (``node ls``)
say the same. A constant, not ``importlib.metadata.version("shoal")``: that import costs every
agent ~1.4 MiB of RSS (issue 16) to read back what the package already knows.
Must not touch: anything else.
"""

from __future__ import annotations

VERSION = "0.2.0"


def version() -> str:
    """shoal's version, e.g. "0.2.0"."""
    return VERSION
