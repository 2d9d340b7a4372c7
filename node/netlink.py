"""pyroute2's ``IPRoute`` and ``NetlinkError``, imported without the rest of pyroute2.

``pyroute2/__init__.py`` imports every module the library has (NDB with sqlite3, IPDB,
WireGuard, nl80211, IPVS, conntrack, plan9, …): 188 modules and 9.2 MiB resident on top of
the agent's other libraries, which uses one class of them. ``import_iproute`` registers the
``pyroute2`` package without running that file and imports only ``pyroute2.iproute.linux``:
121 modules, 4.1 MiB (``bench/agent_rss.py``; a running agent 77.2 → 71.6 MiB).

The same is done for the standard library's ``unittest`` while pyroute2 is imported:
``pyroute2.netlink.rtnl.iprsocket`` has ``from unittest import mock`` at module level for its
mock-netlink mode, which shoal never turns on. ``unittest.mock`` itself is small, but the
``unittest`` package's ``__init__.py`` loads its test case, loader, runner and ``difflib``
(0.8 MiB); registered bare, only ``unittest.mock`` and ``unittest.util`` are read.

The package stays whole for any other code in the process: a name the bare package lacks
is resolved the usual way — a submodule is imported; anything else (``pyroute2.NDB``), a
name the ``__init__.py`` binds over its submodule (``unittest.main``, its ``TestProgram``:
``_REBOUND``) or ``dir()`` of it runs the real ``__init__.py`` once, into the same module
object. If ``pyroute2`` is already imported (a test that uses it), nothing is changed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

# names a package's ``__init__.py`` binds to something other than its submodule of that name
# (``unittest.main`` is ``TestProgram``): asked of the bare package, they run it first
_REBOUND = {"unittest": frozenset({"main"}), "pyroute2": frozenset()}


def _bare_package(name: str) -> ModuleType:
    """Package ``name`` as a module object whose ``__init__.py`` has not run (see above)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"{name} is not installed")
    package = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def __getattr__(attr: str) -> Any:  # PEP 562: only names the module does not have
        if attr.startswith("__") and attr not in ("__version__", "__all__"):
            raise AttributeError(attr)  # probes such as __wrapped__ need not load it all
        if attr not in _REBOUND.get(name, ()) and \
                importlib.util.find_spec(f"{package.__name__}.{attr}") is not None:
            return importlib.import_module(f"{package.__name__}.{attr}")
        load()
        return getattr(package, attr)

    def __dir__() -> list[str]:  # dir(), help(): the whole package
        load()
        return dir(package)  # (the real __init__'s own __dir__, if it has one)

    def load() -> None:
        del package.__getattr__  # the real __init__ defines everything from here on
        del package.__dir__
        loader.exec_module(package)

    package.__getattr__ = __getattr__  # type: ignore[method-assign]
    package.__dir__ = __dir__  # type: ignore[method-assign]
    return package


def import_iproute() -> tuple[type, type[Exception]]:
    """Return (IPRoute, NetlinkError) for Linux."""
    for name in ("pyroute2", "unittest"):
        if name not in sys.modules:
            sys.modules[name] = _bare_package(name)
    from pyroute2.iproute.linux import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError
    return IPRoute, NetlinkError
