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
from test_mesh import RESPONDER, fetch, network_info, task_log, wait_published, wait_running

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


# Runs as a task on networks front and back: reaches every task of "web" by its own address
# (tasks.web: across the overlay, both subnets), web by name (its VIP) and db (on back) by
# name; prints one "OK {json}" line (retries until all worked).
PROBE = r"""
import json, socket, time, urllib.request
def get(url):
    return urllib.request.urlopen(url, timeout=5).read().decode()
for _ in range(240):
    try:
        ips = sorted(socket.gethostbyname_ex("tasks.web")[2])
        if len(ips) != 4:
            raise RuntimeError(f"tasks.web is {ips}")
        direct = {ip: get(f"http://{ip}:8000/") for ip in ips}
        vip = [get("http://web:8000/") for _ in range(12)]
        print("OK " + json.dumps({"direct": direct, "vip": vip, "db": get("http://db:8000/")}),
              flush=True)
        break
    except Exception as exc:
        print("retry", repr(exc), flush=True)
        time.sleep(0.5)
time.sleep(100000)
"""

# Runs as a task of service argv[4] on a network without web: once DNS answers for its own
# service, tries db by name, web by name, at its task address (argv[1]) and its VIP
# (argv[2]), and a node's API outside the overlays (argv[3]); prints "OK {json}" with what
# failed (True) or the answer.
ISOLATED = r"""
import json, socket, sys, time, urllib.request
def get(url):
    return urllib.request.urlopen(url, timeout=3).read().decode()
def attempt(fn):
    try:
        return fn() or False
    except Exception:
        return True
for _ in range(240):
    try:
        socket.gethostbyname(f"tasks.{sys.argv[4]}")
    except Exception as exc:
        print("retry", repr(exc), flush=True)
        time.sleep(0.5)
        continue
    out = {"db": attempt(lambda: get("http://db:8000/")),
           "web_name": attempt(lambda: socket.gethostbyname("web") and False),
           "web_task": attempt(lambda: get(f"http://{sys.argv[1]}:8000/")),
           "web_vip": attempt(lambda: get(f"http://{sys.argv[2]}:8000/")),
           "outside": attempt(lambda: socket.create_connection((sys.argv[3], 2377), 3)
                              .close())}
    print("OK " + json.dumps(out), flush=True)
    break
time.sleep(100000)
"""


def ok_line(lab: Lab, task: dict[str, Any]) -> dict[str, Any] | None:
    line = next((x for x in task_log(lab, task) if x.startswith("OK ")), None)
    return json.loads(line[3:]) if line is not None else None


def test_overlay_spans_routed_subnets_with_isolation_between_networks(
        lab_factory: Callable[..., Lab]) -> None:
    """Must-show 1, 2 and 4: hosts on two bridges joined only by a router (two routed subnets,
    no shared L2): tasks of a service on an overlay reach each other by name and address
    across it, and its published port answers on every node; a task on an --internal second
    network reaches its own network's service but not the first network's (by name, task
    address or VIP) nor anything outside; a network in use cannot be removed."""
    lab = lab_factory(4, routed=("10.78.0.0/24", 2))
    lab.form_cluster(managers=3, workers=1)
    h1 = lab.hosts[0]
    h1.cli("network", "create", "front")
    h1.cli("network", "create", "--internal", "--label", "tier=db", "back")
    nets = {n["name"]: n for n in h1.cli_json("network", "ls")}
    assert nets["back"]["internal"] and nets["front"]["vni"] != nets["back"]["vni"]
    h1.cli("service", "create", "--name", "web", "--replicas", "4", "--network", "front",
           "--publish", "8080:8000", "--", "python3", "-c", RESPONDER, "8000")
    h1.cli("service", "create", "--name", "db", "--network", "back", "--expose", "8000",
           "--", "python3", "-c", RESPONDER, "8000")
    web = wait_running(h1, "web", 4)
    assert len({t["node"] for t in web}) == 4  # tasks on both sides of the router
    wait_running(h1, "db", 1)
    h1.cli("service", "create", "--name", "probe", "--network", "front", "--network", "back",
           "--", "python3", "-c", PROBE)
    (probe,) = wait_running(h1, "probe", 1)
    res = wait_until(lambda: ok_line(lab, probe), timeout=90, interval=0.5,
                     what="the probe's OK line")
    front = h1.cli_json("network", "inspect", "front")[0]
    web_addrs = sorted(a for tid, a in front["tasks"].items()
                       if tid in {t["id"] for t in web})
    assert sorted(res["direct"]) == web_addrs, res
    assert set(res["direct"].values()) == {f"web-{i}" for i in range(1, 5)}, res
    assert set(res["vip"]) <= {f"web-{i}" for i in range(1, 5)} and len(set(res["vip"])) > 1
    assert res["db"] == "db-1"
    # the routing mesh reaches overlay tasks from every node, on both subnets
    urls = [f"http://{h.ip}:8080/" for h in lab.hosts for _ in range(3)]
    answers = fetch(h1, *urls)
    assert all(status == 200 for status, _ in answers), answers
    assert len({body for _, body in answers}) > 1, answers

    # isolation: a task on the internal network back reaches db there and nothing of front
    # nor outside; a task on a third, ordinary network reaches outside but nothing of front
    # or back
    (web_svc,) = h1.cli_json("service", "inspect", "web")
    h1.cli("network", "create", "side")
    for name, net in (("iso", "back"), ("side", "side")):
        h1.cli("service", "create", "--name", name, "--network", net, "--", "python3", "-c",
               ISOLATED, web_addrs[0], web_svc["vip"], h1.ip, name)
    for name, want in (("iso", {"db": "db-1", "web_name": True, "web_task": True,
                                "web_vip": True, "outside": True}),
                       ("side", {"db": True, "web_name": True, "web_task": True,
                                 "web_vip": True, "outside": False})):
        (task,) = wait_running(h1, name, 1)
        res = wait_until(lambda t=task: ok_line(lab, t), timeout=90, interval=0.5,
                         what=f"{name}'s OK line")
        assert res == want, (name, res)

    # an agent restart keeps its tasks' overlay addresses and their reachability
    h3 = lab.hosts[2]
    h3.restart_agent()
    wait_until(lambda: h3.cli("info", check=False).returncode == 0, timeout=30,
               what="h3's agent back")
    after = h1.cli_json("network", "inspect", "front")[0]["tasks"]
    assert all(after[t] == a for t, a in front["tasks"].items() if t in after), after
    assert len(set(after.values())) == len(after)  # (a task moved meanwhile: a new address)

    def h3_serves() -> bool:  # (its balancer listens again once its mesh is back up)
        answers = fetch(h1, *[f"http://{h3.ip}:8080/" for _ in range(8)])
        return all(status == 200 for status, _ in answers)
    wait_until(h3_serves, timeout=60, interval=0.5, what="h3's published port after restart")

    # a network in use cannot be removed; once its services are gone it can
    rm = h1.cli("network", "rm", "back", check=False)
    assert rm.returncode != 0 and "in use" in rm.stderr and "Traceback" not in rm.stderr
    h1.cli("service", "rm", "db", "iso", "probe", "side")
    wait_until(lambda: h1.cli("network", "rm", "back", check=False).returncode == 0,
               timeout=60, interval=0.5, what="network back removable")
    assert [n["name"] for n in h1.cli_json("network", "ls")] == ["front", "side"]


def test_host_network_tasks_use_the_nodes_namespace_and_none_has_only_lo(
        lab_factory: Callable[..., Lab]) -> None:
    """``--network host`` (Docker's): a global service's tasks listen in their node's own
    network namespace — each node's address answers on the task's port directly, with that
    node's task — their address is the node's, and the routing mesh publishes them on another
    port from every node. ``--network-mode none``: the task's namespace has only lo and no
    address."""
    lab = lab_factory(2)
    lab.form_cluster(managers=1, workers=1)
    h1 = lab.hosts[0]
    h1.cli("service", "create", "--name", "hweb", "--mode", "global", "--network", "host",
           "-p", "8090:8000", "--", "python3", "-c", RESPONDER, "8000")
    h1.cli("service", "create", "--name", "lone", "--network-mode", "none", "--",
           "sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1; sleep 100000")
    tasks = wait_running(h1, "hweb", 2)
    assert {t["addr"] for t in tasks} == {lab.host(t["node"]).ip for t in tasks} == \
        {h.ip for h in lab.hosts}
    (inspect,) = h1.cli_json("service", "inspect", "hweb")
    assert inspect["spec"]["task"]["network_mode"] == "host"
    assert inspect["spec"]["task"]["networks"] == []
    wait_published(lab, "hweb.8000", 2)
    for h in lab.hosts:
        direct = fetch(h, *[f"http://{x.ip}:8000/" for x in lab.hosts])
        assert [status for status, _ in direct] == [200, 200], direct
        assert direct[0][1] != direct[1][1]  # each node's own task answered on its address
        meshed = fetch(h, *[f"http://{x.ip}:8090/" for x in lab.hosts for _ in range(4)])
        assert all(status == 200 for status, _ in meshed), meshed
        assert {body for _, body in meshed} == {body for _, body in direct}
    (lone,) = wait_running(h1, "lone", 1)
    assert lone["addr"] == ""
    wait_until(lambda: [x.strip() for x in task_log(lab, lone)] == ["lo"], timeout=30,
               what="the none task's interfaces (only lo)")
