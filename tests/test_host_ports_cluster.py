"""Ports published in host mode end to end: real agents on two netns hosts, driven by the CLI.

A host-mode port (``--publish mode=host,published=8080,target=80``) answers only on the node
running the task, straight from the client to the task (the task sees the client's own
address); the other node does not answer on it; a routing-mesh port answers on both.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from netlab import Host, Lab, wait_until

pytestmark = pytest.mark.netns

# A TCP server on port argv[1] of every address that answers each connection with the
# address it sees the connection come from, then closes it.
PEER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
while True:
    c, (ip, _) = s.accept()
    c.sendall(ip.encode())
    c.close()
"""

# Connect to argv[1]:argv[2]; print what the server says, or "refused" / the error.
ASK = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as c:
        print(c.recv(100).decode() or "empty")
except ConnectionRefusedError:
    print("refused")
except OSError as exc:
    print(repr(exc))
"""


def ask(host: Host, ip: str, port: int) -> str:
    return host.run("python3", "-c", ASK, ip, str(port)).stdout.strip()


def test_a_host_mode_port_answers_only_where_its_task_runs_with_the_clients_address(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1, h2 = lab.hosts
    h1.cli("service", "create", "--name", "direct", "--constraint", f"node.hostname=={h2.name}",
           "-p", "mode=host,published=8080,target=80", "--", "python3", "-c", PEER, "80")
    h1.cli("service", "create", "--name", "meshed", "--constraint", f"node.hostname=={h2.name}",
           "-p", "9090:90", "--", "python3", "-c", PEER, "90")
    view = h1.cli("service", "inspect", "--pretty", "direct").stdout
    assert "PublishedPort = 8080" in view and "PublishMode = host" in view

    # straight to the task on h2: it sees h1's own address
    wait_until(lambda: ask(h1, h2.ip, 8080) == h1.ip or None, timeout=60, interval=0.5,
               what="h2:8080 answering h1 with h1's address")
    # not published on h1 (no task there), and no routing-mesh listener on it
    assert ask(h2, h1.ip, 8080) == "refused"
    # the routing mesh's port answers on both nodes (through a balancer)
    for h in (h1, h2):
        wait_until(lambda h=h: ask(h1, h.ip, 9090).count(".") == 3 or None,  # (an address)
                   timeout=60, interval=0.5, what=f"{h.name}:9090 through the routing mesh")

    # the task goes: so does the port
    h1.cli("service", "rm", "direct")
    wait_until(lambda: ask(h1, h2.ip, 8080) == "refused" or None, timeout=30, interval=0.5,
               what="h2:8080 closed once the service is gone")
