"""The network of a build's RUN steps (``shoal image build --network``, Compose's
``build.network``), as Docker's builder gives one.

Owns: the modes (``NETWORK_MODES``) and their check, and ``RunNetwork``, the interface the
builder (shoal.runtime.build) is given to put a RUN on the node's task network. Must not
touch: the node's network itself — the agent's implementation of ``RunNetwork`` does
(shoal.node.buildnet: a veth on the task bridge, an address for the RUN's lifetime, the
node's outbound NAT and DNS, as a task of the default network has them).

The modes, Docker's ``docker build --network``:

- ``default``: the RUN is on the node's task network with an address of its own (released
  when the RUN ends, also when it fails or the build is cancelled), reaching outside the
  cluster through the node's masquerading, its /etc/resolv.conf naming the node's DNS server
  (which forwards other names to the node's resolvers) — ``apt-get install``, ``pip
  install``, ``wget`` work. A builder given no ``RunNetwork`` (a node that has none: unit
  tests' builders) runs such a RUN as ``none``.
- ``none``: no network but ``lo``.
- ``host``: the node's own network namespace (as a ``host_network`` task: no isolation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from shoal.runtime.errors import BuildError
from shoal.runtime.records import FileValue

NETWORK_MODES = ("default", "none", "host")


def check_network(value: str, field: str = "network") -> str:
    """``value`` if it is a mode ("" is ``default``), else a BuildError naming ``field``."""
    mode = value or "default"
    if mode not in NETWORK_MODES:
        raise BuildError(f"{field} must be one of {', '.join(NETWORK_MODES)}, got {value!r} "
                         "(shoal's builder has no user-defined networks)", field=field)
    return mode


class RunNetwork(Protocol):
    """What the agent gives the builder to attach a RUN of mode ``default``."""

    def files(self) -> Mapping[str, FileValue]:
        """Files the RUN must see (its /etc/resolv.conf); raises (any Exception, its message
        said to the user) when the node has no task network to give."""

    async def attach(self, task_id: str, pid: int) -> str:
        """A ``before_start`` hook (shoal.runtime.controller.BeforeStart): put the namespace of
        ``pid`` on the task network; its address."""

    async def detach(self, task_id: str) -> None:
        """Release what ``attach`` took (its address, its veth); idempotent, and harmless for
        a task never attached."""
