"""Networks end to end (issue 19): real agents on netns hosts, driven by the CLI.

Each test names the user-visible property it checks: an unpublished service's VIP balances
over all its tasks from clients on several nodes; dnsrr answers task addresses in varying
order. Requests are made from inside tasks (their logs carry the results), so only
addresses inside the lab's namespaces are used.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from test_mesh import RESPONDER, network_info, task_log, wait_running

from netlab import Lab, wait_until

pytestmark = pytest.mark.netns

# Runs as a task: fetches http://api:8000/ 20 times (api resolves to its VIP), then resolves
# the dnsrr service "rr" 12 times; prints one "OK {json}" line (retries until all worked).
CLIENT = r"""
import json, socket, time, urllib.request
for _ in range(240):
    try:
        vip = socket.gethostbyname("api")
        bodies = [urllib.request.urlopen("http://api:8000/", timeout=5).read().decode()
                  for _ in range(20)]
        orders = [socket.gethostbyname_ex("rr")[2] for _ in range(12)]
        if len(orders[0]) != 3:
            raise RuntimeError(f"rr has {orders[0]}")
        print("OK " + json.dumps({"vip": vip, "bodies": bodies, "orders": orders}), flush=True)
        break
    except Exception as exc:
        print("retry", repr(exc), flush=True)
        time.sleep(0.5)
time.sleep(100000)
"""


def test_unpublished_service_vip_balances_from_every_node_and_dnsrr_shuffles(
        lab_factory: Callable[..., Lab]) -> None:
    """Must-show 3: from tasks on two different nodes, 20 requests to http://api:8000/ of an
    unpublished 3-replica service (``--expose 8000``) go to its VIP and reach all 3 replicas;
    a ``--endpoint-mode dnsrr`` service resolves to its 3 task addresses in varying order."""
    lab = lab_factory(3)
    lab.form_cluster(managers=3)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "api", "--replicas", "3", "--expose", "8000",
           "--", "python3", "-c", RESPONDER, "8000")
    h1.cli("service", "create", "--name", "rr", "--replicas", "3", "--endpoint-mode",
           "dnsrr", "--", "sleep", "100000")
    api = wait_running(h1, "api", 3)
    assert len({t["node"] for t in api}) == 3
    wait_running(h1, "rr", 3)
    (inspect,) = h1.cli_json("service", "inspect", "api")
    assert inspect["spec"]["endpoint"]["expose"] == [{"port": 8000, "protocol": "tcp"}]
    h1.cli("service", "create", "--name", "cli", "--replicas", "2",
           "--", "python3", "-c", CLIENT)
    clients = wait_running(h1, "cli", 2)
    assert len({t["node"] for t in clients}) == 2  # two different nodes' balancers

    def results() -> list[dict[str, Any]] | None:
        out = []
        for t in clients:
            line = next((x for x in task_log(lab, t) if x.startswith("OK ")), None)
            if line is None:
                return None
            out.append(json.loads(line[3:]))
        return out
    for res in wait_until(results, timeout=90, interval=0.5, what="both clients' OK lines"):
        assert res["vip"] == inspect["vip"], res
        assert set(res["bodies"]) == {"api-1", "api-2", "api-3"}, res["bodies"]
        rr_addrs = {a for h in lab.hosts for a in network_info(h)["tasks"].values()}
        assert all(set(o) <= rr_addrs and len(o) == 3 for o in res["orders"]), res
        assert len({tuple(o) for o in res["orders"]}) > 1, res["orders"]
    assert not any(info["errors"] for info in map(network_info, lab.hosts))
