"""User-defined networks in the replicated state: the allocation rules (pure).

Owns: the deterministic rules the state machine applies to networks (``shoal network
create``) — a subnet from the cluster's default address pool (or the user's ``--subnet``,
which must not overlap any other network, the cluster CIDR or the VIP range), its gateway
(the first host address unless ``--gateway``), a VXLAN network identifier (the lowest free
from ``VNI_MIN``), each task's address on each of its networks (the lowest free from the
bottom of the subnet when the task is assigned to a node), and each node's own address on
every overlay network (from the top of the subnet, derived from the node's host-gw subnet
index so every agent computes it without a write). Must not touch: I/O, clocks, randomness.

Address layout of an overlay subnet (a /24 here)::

    .1               gateway: on every node's bridge for the network (/32, answered locally)
    .2 ... top-N-1   tasks (allocated in the state, released when the task ends)
    top-N ... .254   nodes: node with host-gw subnet index i gets .254 - i (its source
                     address towards the network: replies come back to the right node)

with N = ``node_slots(subnet)``. Errors: ``IpamError`` (shoal.raft.errors), naming what is
exhausted or invalid.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from shoal.raft.errors import IpamError

DEFAULT_ADDR_POOL = "10.96.0.0/15"  # next to the task (10.99/16) and VIP (10.98/16) ranges
DEFAULT_POOL_SIZE = 24  # prefix of each network cut from the pool
VNI_MIN = 4096  # (Docker's overlay driver starts at 4096 too)
VNI_MAX = (1 << 24) - 1
DRIVERS = ("overlay",)
NETWORK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_NETWORKS_PER_TASK = 16
# names a user network cannot take: the built-in default network's names
RESERVED_NAMES = ("default", "host", "none", "ingress", "bridge")


def node_slots(subnet: str) -> int:
    """How many addresses at the top of ``subnet`` belong to nodes: a quarter of it, at
    least 2, at most 1024."""
    size = ipaddress.ip_network(subnet).num_addresses
    return max(2, min(1024, size // 4))


def node_index(node_subnet: str, cluster_cidr: str) -> int:
    """The index of a node's host-gw subnet inside the cluster CIDR (0 for the first)."""
    sub, cluster = ipaddress.ip_network(node_subnet), ipaddress.ip_network(cluster_cidr)
    return (int(sub.network_address) - int(cluster.network_address)) // sub.num_addresses


def node_address(subnet: str, index: int) -> str:
    """The node's own address on an overlay network ("" when its index has no slot)."""
    net = ipaddress.ip_network(subnet)
    if not 0 <= index < node_slots(subnet):
        return ""
    return str(net.broadcast_address - 1 - index)


def validate_name(name: object) -> str:
    if not isinstance(name, str) or not NETWORK_NAME_RE.match(name):
        raise IpamError(f"network name {name!r} must be 1-63 of A-Z a-z 0-9 _ . - "
                        "(starting with a letter or digit)")
    if name.lower() in RESERVED_NAMES:
        raise IpamError(f"network name {name!r} is reserved")
    return name


def pick_subnet(pool: str, prefix: int, used: Iterable[str], wanted: str = "",
                avoid: Iterable[str] = ()) -> str:
    """``wanted`` (checked) or the lowest /``prefix`` of ``pool`` that overlaps nothing in
    ``used`` (other networks) or ``avoid`` (cluster CIDR, VIP range)."""
    taken = [ipaddress.ip_network(u) for u in used if u]
    blocked = [ipaddress.ip_network(a) for a in avoid if a]
    if wanted:
        try:
            net = ipaddress.ip_network(wanted, strict=True)
        except ValueError as exc:
            raise IpamError(f"subnet {wanted!r} is not a network in CIDR form ({exc})") \
                from None
        if net.version != 4 or not 8 <= net.prefixlen <= 28:
            raise IpamError(f"subnet {wanted} must be IPv4 with a prefix /8 to /28")
        for other in taken + blocked:
            if net.overlaps(other):
                raise IpamError(f"subnet {wanted} overlaps {other}, already in use")
        return str(net)
    for sub in ipaddress.ip_network(pool).subnets(new_prefix=prefix):
        if not any(sub.overlaps(t) for t in taken + blocked):
            return str(sub)
    raise IpamError(f"the default address pool {pool} has no free /{prefix} left")


def pick_gateway(subnet: str, wanted: str = "") -> str:
    net = ipaddress.ip_network(subnet)
    if not wanted:
        return str(net.network_address + 1)
    try:
        gw = ipaddress.ip_address(wanted)
    except ValueError:
        raise IpamError(f"gateway {wanted!r} is not an IPv4 address") from None
    top = int(net.broadcast_address) - node_slots(subnet)
    if gw not in net or gw == net.network_address or int(gw) >= top:
        raise IpamError(f"gateway {wanted} must be an address of {subnet} below "
                        f"{ipaddress.ip_address(top)}")
    return str(gw)


def pick_vni(used: Iterable[int]) -> int:
    taken = set(used)
    for vni in range(VNI_MIN, VNI_MAX + 1):
        if vni not in taken:
            return vni
    raise IpamError("no free VXLAN network identifier left")  # pragma: no cover


def pick_task_address(subnet: str, gateway: str, used: set[str]) -> str:
    """The lowest free task address of ``subnet`` (below the nodes' slots)."""
    net = ipaddress.ip_network(subnet)
    top = int(net.broadcast_address) - node_slots(subnet)
    for n in range(int(net.network_address) + 1, top):
        addr = str(ipaddress.ip_address(n))
        if addr != gateway and addr not in used:
            return addr
    raise IpamError(f"network {subnet} has no free task address left")
