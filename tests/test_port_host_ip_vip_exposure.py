"""Review finding (not fixed here): every VIP is a local address of every node (``local
VIP_CIDR dev lo``) and nothing filters packets to VIP_CIDR arriving on the node's own
interfaces, so a machine next to a node reaches any service at VIP:TARGET — including one
published at 127.0.0.1 only ("reachable from that node only"). Strict xfail until the INPUT
filter (VIP_CIDR accepted from lo and the task bridges only) lands."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_host_ports_cluster import PEER, ask

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns


@pytest.mark.xfail(strict=True, reason="VIPs answer packets from off the cluster")
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
