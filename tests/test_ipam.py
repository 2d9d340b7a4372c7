"""Node subnet allocation (raft/ipam.py), pure: the one-pass allocator picks exactly the subnet
the plain rule names — the lowest /prefix of the cluster CIDR that overlaps no taken subnet —
on random clusters with holes, foreign sizes and ranges outside the CIDR."""

from __future__ import annotations

import ipaddress
import random

import pytest

from shoal.raft.errors import IpamError
from shoal.raft.ipam import allocate_subnet


def lowest_free(cidr: str, prefix: int, used: list[str]) -> str | None:
    """The rule, checked the slow way: every candidate against every taken subnet."""
    taken = [ipaddress.ip_network(u) for u in used]
    for sub in ipaddress.ip_network(cidr).subnets(new_prefix=prefix):
        if not any(sub.overlaps(t) for t in taken):
            return str(sub)
    return None


def test_the_lowest_free_subnet_on_random_clusters() -> None:
    rng = random.Random(7)
    for _ in range(300):
        cidr = rng.choice(["10.99.0.0/16", "10.64.0.0/20", "172.20.0.0/22"])
        net = ipaddress.ip_network(cidr)
        prefix = rng.choice([24, 25, 26])
        subs = list(net.subnets(new_prefix=prefix))
        used = [str(s) for s in rng.sample(subs, rng.randint(0, len(subs)))]
        for _ in range(rng.randint(0, 4)):  # other sizes, and ranges outside the CIDR
            other = rng.choice([23, 24, 27, 28])
            base = int(net.network_address) + rng.randrange(-256, net.num_addresses + 256)
            used.append(str(ipaddress.ip_network((base >> (32 - other) << (32 - other),
                                                  other))))
        rng.shuffle(used)
        want = lowest_free(cidr, prefix, used)
        if want is None:
            with pytest.raises(IpamError):
                allocate_subnet(cidr, prefix, used)
        else:
            assert allocate_subnet(cidr, prefix, [*used, ""]) == want, (cidr, prefix, used)


def test_a_thousand_nodes_fill_a_cluster_network_in_order() -> None:
    used: list[str] = []
    for _ in range(1024):
        used.append(allocate_subnet("10.112.0.0/14", 24, used))
    assert used == [str(s) for s in ipaddress.ip_network("10.112.0.0/14").subnets(
        new_prefix=24)]
    with pytest.raises(IpamError, match="no free /24"):
        allocate_subnet("10.112.0.0/14", 24, used)
