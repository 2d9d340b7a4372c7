"""Node subnet allocation (raft/ipam.py), pure: the one-pass allocator picks exactly the subnet
the plain rule names — the lowest /prefix of the cluster CIDR that overlaps no taken subnet —
on random clusters with holes, foreign sizes and ranges outside the CIDR."""

from __future__ import annotations

import ipaddress
import random
from pathlib import Path

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


def test_a_nodes_task_addresses_go_round_the_subnet_before_one_is_given_again() -> None:
    """Serial allocation (Docker's IPAM): the address a task just gave back is not the next
    one handed out, so a rule still naming it for a moment reaches no new task."""
    from shoal.raft.ipam import allocate_after

    net = "10.99.3.0/29"  # hosts .1-.6; .1 is the node's gateway (skip_first=1)
    assert allocate_after(net, [], "", skip_first=1) == "10.99.3.2"
    assert allocate_after(net, ["10.99.3.2"], "10.99.3.2", skip_first=1) == "10.99.3.3"
    # .3 given back: the next is .4, not .3 again
    assert allocate_after(net, ["10.99.3.2"], "10.99.3.3", skip_first=1) == "10.99.3.4"
    # past the end it wraps to the first free one
    assert allocate_after(net, ["10.99.3.2"], "10.99.3.6", skip_first=1) == "10.99.3.3"
    assert allocate_after(net, [], "garbage", skip_first=1) == "10.99.3.2"
    assert allocate_after(net, [], "10.99.3.1", skip_first=1) == "10.99.3.2"
    with pytest.raises(IpamError, match="no free address"):
        allocate_after(net, [f"10.99.3.{i}" for i in range(2, 7)], "10.99.3.4", skip_first=1)


def test_the_node_keeps_the_address_given_last_across_a_restart(tmp_path: Path) -> None:
    """NodeNetwork's network.json keeps the last address with the tasks' (an agent restarted
    goes on round the subnet rather than back to its start)."""
    from shoal.node.network import NodeNetwork

    net = NodeNetwork(tmp_path, "10.99.0.0/24", "10.99.0.0/16")
    net.addrs, net.last = {"t1": "10.99.0.2"}, "10.99.0.9"
    net._save()
    again = NodeNetwork(tmp_path, "10.99.0.0/24", "10.99.0.0/16")
    assert (again.addrs, again.last) == ({"t1": "10.99.0.2"}, "10.99.0.9")
