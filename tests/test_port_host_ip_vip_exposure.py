"""Every VIP is a local address of every node (``local VIP_CIDR dev lo``): a machine next to
a node that routes VIP_CIDR to it reached any service at VIP:TARGET — one published at
127.0.0.1 only ("reachable from that node only") included (review). The INPUT filter
SHOAL-VIP-IN (shoal.node.network) lets in only the node itself and its task bridges."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_host_ports_cluster import ASK, PEER, ask

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns


def test_a_127_published_service_is_reachable_from_off_the_cluster_at_its_vip(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(3)
    lab.form_cluster(managers=1, workers=1)
    h1, h2, h3 = lab.hosts  # h3: no agent, a machine on the nodes' network
    h1.cli("service", "create", "--name", "local", "--constraint",
           f"node.hostname=={h2.name}", "-p", "127.0.0.1:8080:80",
           "--", "python3", "-c", PEER, "80")
    wait_until(lambda: ask(h1, "127.0.0.1", 8080).count(".") == 3 or None, timeout=60,
               interval=0.5, what="127.0.0.1:8080 on h1")
    assert ask(h3, h1.ip, 8080) == "refused"
    vip = h1.cli_json("service", "inspect", "local")[0]["vip"]
    h3.run("ip", "route", "add", f"{vip}/32", "via", h1.ip)
    got = ask(h3, vip, 80)
    assert got.count(".") != 3, f"off-cluster host reached the 127.0.0.1-only service: {got}"
    # the cluster's own ways to the VIP still work: the node itself, a task on each node
    assert ask(h1, vip, 80).count(".") == 3 and ask(h2, vip, 80).count(".") == 3
    h1.cli("service", "create", "--name", "client", "--restart-condition", "none", "--",
           "python3", "-c", ASK, vip, "80")

    def task_answered() -> bool:
        out = h1.cli("service", "logs", "--raw", "client", check=False).stdout
        return any(line.strip().count(".") == 3 and "Error" not in line
                   for line in out.splitlines())
    wait_until(lambda: task_answered() or None, timeout=60, interval=0.5,
               what="a task reaching the VIP")


def test_the_vip_filter_names_the_overlay_bridges() -> None:
    from shoal.node import network, overlay

    assert network.OVERLAY_BRIDGES == overlay.BRIDGE_PREFIX
