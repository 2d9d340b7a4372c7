"""A published port's host address end to end: real agents on two netns hosts, driven by the
CLI (Compose's ``127.0.0.1:5432:5432``: "reachable from this machine only").

``-p 127.0.0.1:8080:80`` answers at 127.0.0.1:8080 inside each node's own namespace and is
refused at the node's lab address, from the node itself and from the other node; a port
without an address answers at both; the service's VIP still serves its target; a port given
another node's address is published only on that node (the other one skips it, said once);
a host-mode port given an address is translated there only, not at the node's other
addresses (its task-network gateway).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from test_host_ports_cluster import PEER, ask

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns


def test_a_port_published_on_127_0_0_1_answers_on_each_nodes_loopback_only(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1, h2 = lab.hosts
    # (the tasks on h2: h1's answers come through the mesh from the other node)
    on_h2 = ("--constraint", f"node.hostname=={h2.name}")
    h1.cli("service", "create", "--name", "local", *on_h2, "-p", "127.0.0.1:8080:80",
           "--", "python3", "-c", PEER, "80")
    h1.cli("service", "create", "--name", "open", *on_h2, "-p", "9090:90",
           "--", "python3", "-c", PEER, "90")
    h1.cli("service", "create", "--name", "only2", *on_h2, "-p", f"{h2.ip}:6060:60",
           "--", "python3", "-c", PEER, "60")
    h1.cli("service", "create", "--name", "direct", *on_h2,
           "-p", f"mode=host,published=7070,target=70,host_ip={h2.ip}",
           "--", "python3", "-c", PEER, "70")
    view = h1.cli("service", "inspect", "--pretty", "local").stdout
    assert "PublishedPort = 8080" in view and "HostIP = 127.0.0.1" in view, view
    assert "127.0.0.1:8080->80/tcp" in h1.cli("service", "ls").stdout

    def answers(h: Host, ip: str, port: int) -> bool:
        return ask(h, ip, port).count(".") == 3  # (the address the task saw)

    for h in (h1, h2):
        wait_until(lambda h=h: answers(h, "127.0.0.1", 8080) or None, timeout=60,
                   interval=0.5, what=f"{h.name}: 127.0.0.1:8080 through the mesh")
        for ip in ("127.0.0.1", h.ip):
            wait_until(lambda h=h, ip=ip: answers(h, ip, 9090) or None, timeout=60,
                       interval=0.5, what=f"{h.name}: {ip}:9090 through the mesh")
    for h in (h1, h2):  # (the mesh is up on both: 9090 answers at the lab addresses)
        for client in (h1, h2):
            assert ask(client, h.ip, 8080) == "refused", (client.name, h.name)
    # the service's VIP still serves its target (every VIP is local on every node)
    vip = h1.cli_json("service", "inspect", "local")[0]["vip"]
    assert vip and answers(h1, vip, 80) and answers(h2, vip, 80)

    # another node's address: published on h2 only; h1 skips it, saying so once
    wait_until(lambda: answers(h1, h2.ip, 6060) or None, timeout=60, interval=0.5,
               what="h2's address:6060 through the mesh")
    assert ask(h1, h1.ip, 6060) == "refused" and ask(h1, "127.0.0.1", 6060) == "refused"
    said = [line for line in h1.agent_log.read_text(errors="replace").splitlines()
            if "not publishing 6060/tcp (only2)" in line]
    assert len(said) == 1 and "INFO" in said[0], said

    # host mode: translated at h2's address (the client's own address kept), not at h2's
    # task-network gateway, which the mesh's ports (9090) answer at
    gateway = h2.run("ip", "-4", "-o", "addr", "show", "dev", "shoal0").stdout.split()[3]
    gateway = gateway.partition("/")[0]
    wait_until(lambda: ask(h1, h2.ip, 7070) == h1.ip or None, timeout=60, interval=0.5,
               what="h2's address:7070 straight to the task")
    assert answers(h1, gateway, 9090)
    assert ask(h1, gateway, 7070) == "refused"
