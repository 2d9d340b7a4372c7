"""Address management in the replicated state: node subnets and service virtual IPs.

Owns: the deterministic allocation rules the state machine applies — each node gets the
lowest free /``node_prefix`` subnet of the cluster CIDR when it is added (released when it
is removed), each service the lowest free address of the VIP range when it is created
(released when it is removed). Task addresses are allocated by each node inside its own
subnet (shoal's runtime) and reported in the task status, so they are unique across the
cluster because node subnets never overlap. Must not touch: I/O, clocks, randomness.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from shoal.raft.errors import IpamError

# Defaults chosen away from the ranges home/office LANs and Docker use most (192.168/16,
# 10.0/16, 10.1/16, 172.17-31/16): a /16 for tasks, cut into /24 per node (254 tasks per
# node, 256 nodes), and a /16 for service virtual IPs.
DEFAULT_CLUSTER_CIDR = "10.99.0.0/16"
DEFAULT_VIP_CIDR = "10.98.0.0/16"
DEFAULT_NODE_PREFIX = 24


def validate_cidr(text: str, field: str, min_prefix: int = 8, max_prefix: int = 28) -> str:
    try:
        net = ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise IpamError(f"{field} {text!r} is not a network in CIDR form ({exc})") from None
    if net.version != 4:
        raise IpamError(f"{field} must be an IPv4 network")
    if not min_prefix <= net.prefixlen <= max_prefix:
        raise IpamError(f"{field} prefix must be between /{min_prefix} and /{max_prefix}")
    return str(net)


def allocate_subnet(cluster_cidr: str, prefix: int, used: Iterable[str]) -> str:
    """The lowest /prefix subnet of ``cluster_cidr`` that overlaps none of ``used``.

    One pass over the taken ranges sorted by start (O(n log n) for n nodes): the state
    machine runs this for every node_add on the tick thread, and comparing every candidate
    with every taken subnet cost seconds per add at 1,000 nodes (bench/snapshot_bench.py)."""
    net = ipaddress.ip_network(cluster_cidr)
    size = 1 << (net.max_prefixlen - prefix)
    if prefix < net.prefixlen:
        raise IpamError(f"the cluster network {cluster_cidr} has no free /{prefix} left for "
                        "another node")
    taken = sorted((int(t.network_address), int(t.broadcast_address))
                   for t in (ipaddress.ip_network(u) for u in used if u))
    pos, last = int(net.network_address), int(net.broadcast_address)
    for start, end in taken:
        if end < pos:
            continue
        if start > pos + size - 1:
            break  # (every later range starts later still: the candidate at pos is free)
        pos = (end + size) // size * size  # the next aligned candidate past this range
    if pos + size - 1 <= last:
        return str(ipaddress.ip_network((pos, prefix)))
    raise IpamError(f"the cluster network {cluster_cidr} has no free /{prefix} left for "
                    "another node")


def allocate_address(cidr: str, used: Iterable[str], skip_first: int = 0) -> str:
    """The lowest host address of ``cidr`` not in ``used`` (after ``skip_first`` hosts)."""
    net = ipaddress.ip_network(cidr)
    taken = {u for u in used if u}
    for i, host in enumerate(net.hosts()):
        if i < skip_first:
            continue
        if str(host) not in taken:
            return str(host)
    raise IpamError(f"no free address left in {cidr}")


def allocate_after(cidr: str, used: Iterable[str], after: str = "", skip_first: int = 0) -> str:
    """The first host address of ``cidr`` after ``after`` (the one given last; "" = from the
    start) not in ``used``, wrapping round to the start (after ``skip_first`` hosts): serial
    allocation, as Docker's IPAM, so an address just given back is handed out again only
    once the range has gone round. A node's task addresses (shoal.node.network): rules that
    still name a released address for a moment (host ports, the balancer's backends) never
    reach the next task. Not for the state machine's VIPs (``allocate_address``, whose lowest
    free rule needs no history)."""
    net = ipaddress.ip_network(cidr)
    first = int(net.network_address) + 1 + skip_first  # (hosts: past the network address)
    last = int(net.broadcast_address) - 1
    if net.num_addresses <= 2 or first > last:
        raise IpamError(f"no free address left in {cidr}")
    taken = {int(ipaddress.ip_address(u)) for u in used if u}
    try:
        prev = int(ipaddress.ip_address(after)) if after else last
    except ValueError:
        prev = last
    start = prev + 1 if first <= prev < last else first
    count = last - first + 1
    for i in range(count):
        addr = first + (start - first + i) % count
        if addr not in taken:
            return str(ipaddress.ip_address(addr))
    raise IpamError(f"no free address left in {cidr}")
