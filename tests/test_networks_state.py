"""User-defined networks in the state machine (raft/state.py, raft/networks.py): pure, no
network. Each test names the property a user would notice."""

from __future__ import annotations

from typing import Any

from shoal.raft import networks as netalloc
from shoal.raft.models import TaskState, to_dict
from shoal.raft.schema import SCHEMA
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec
from shoal.raft.wire import state_from_bytes, state_to_bytes


def cluster(**extra: Any) -> ClusterState:
    st = ClusterState()
    res = st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "",
                    "manager_secret": "", "digest": "", "schema": SCHEMA, **extra})
    assert res.get("ok"), res
    for i in (1, 2):
        st.apply({"op": "node_add", "now": 1.0, "node": {
            "id": f"n{i}", "hostname": f"h{i}", "addr": f"10.77.0.1{i}", "api_port": 2377,
            "raft_port": 2378, "role": "manager"}})
    return st


def ok(st: ClusterState, **cmd: Any) -> dict[str, Any]:
    res = st.apply({"now": 2.0, **cmd})
    assert res.get("ok"), res
    return res


def err(st: ClusterState, **cmd: Any) -> dict[str, Any]:
    res = st.apply({"now": 2.0, **cmd})
    assert "error" in res, res
    error: dict[str, Any] = res["error"]
    return error


def service(st: ClusterState, sid: str, *networks: str) -> dict[str, Any]:
    spec = {"name": sid, "task": {"container": {"command": ["x"]},
                                  "networks": list(networks)}}
    return st.apply({"op": "service_create", "id": sid, "now": 2.0, "spec": spec})


def task(st: ClusterState, sid: str, tid: str, node: str = "n1") -> None:
    svc = st.services[sid]
    ok(st, op="leader", term=1, ops=[
        ("create", {"id": tid, "service_id": sid, "service_name": svc.spec.name, "slot": 1,
                    "spec": to_dict(svc.spec.task), "service_version": 1, "desired_state": 512,
                    "status": {"state": 0}}),
        ("assign", tid, node)])


def test_networks_get_distinct_subnets_vnis_and_gateways_from_the_pool() -> None:
    st = cluster(default_addr_pool="10.200.0.0/16")
    a = ok(st, op="network_create", id="na", name="front")
    b = ok(st, op="network_create", id="nb", name="back", internal=True, labels={"k": "v"})
    c = ok(st, op="network_create", id="nc", name="own", subnet="192.168.50.0/24",
           gateway="192.168.50.9")
    assert (a["subnet"], b["subnet"], c["subnet"]) == ("10.200.0.0/24", "10.200.1.0/24",
                                                       "192.168.50.0/24")
    assert len({a["vni"], b["vni"], c["vni"]}) == 3 and a["vni"] >= netalloc.VNI_MIN
    assert st.networks["nc"].gateway == "192.168.50.9" and st.networks["na"].gateway == \
        "10.200.0.1"
    assert st.networks["nb"].internal and st.networks["nb"].labels == {"k": "v"}
    # the replicated state round-trips through its wire form (Raft dump)
    assert state_from_bytes(state_to_bytes(st)).networks == st.networks


def test_bad_networks_are_refused_naming_the_field() -> None:
    st = cluster()
    ok(st, op="network_create", id="na", name="front", subnet="10.50.0.0/24")
    assert err(st, op="network_create", id="nb", name="front")["code"] == "exists"
    assert err(st, op="network_create", id="nb", name="x", subnet="10.50.0.0/16")[
        "field"] == "subnet"  # overlaps front
    assert err(st, op="network_create", id="nb", name="x", subnet="10.99.3.0/24")[
        "field"] == "subnet"  # inside the cluster's task network
    assert err(st, op="network_create", id="nb", name="x", subnet="10.51.0.0/24",
               gateway="10.52.0.1")["field"] == "gateway"
    assert err(st, op="network_create", id="nb", name="x", driver="macvlan")["field"] == \
        "driver"
    assert err(st, op="network_create", id="nb", name="ingress")["field"] == "name"
    assert service(st, "s1", "nope")["error"]["field"] == "task.networks[0]"


def test_an_old_schema_cluster_refuses_networks() -> None:
    st = cluster(schema=1)
    assert err(st, op="network_create", id="na", name="front")["code"] == "invalid"


def test_tasks_get_an_address_per_network_and_removal_is_refused_while_in_use() -> None:
    st = cluster()
    ok(st, op="network_create", id="na", name="front")
    ok(st, op="network_create", id="nb", name="back")
    assert service(st, "s1", "front", "back").get("ok")
    task(st, "s1", "t1")
    task(st, "s1", "t2", "n2")
    assert st.tasks["t1"].net_addrs == {"front": "10.96.0.2", "back": "10.96.1.2"}
    assert st.tasks["t2"].net_addrs == {"front": "10.96.0.3", "back": "10.96.1.3"}
    e = err(st, op="network_remove", id="na")
    assert e["code"] == "in_use" and "s1" in e["message"]
    # the service leaves the network: its running tasks still hold addresses on it
    spec = validate_spec({"name": "s1", "task": {"container": {"command": ["x"]},
                                                 "networks": ["back"]}})
    ok(st, op="service_update", id="s1", spec=to_dict(spec))
    assert err(st, op="network_remove", id="na")["code"] == "in_use"
    # once its tasks ended, the addresses are free again and the network can go
    for tid in ("t1", "t2"):
        node = st.tasks[tid].node_id
        ok(st, op="task_status", task_id=tid, node_id=node,
           status={"state": int(TaskState.SHUTDOWN)})
    task(st, "s1", "t3")
    assert st.tasks["t3"].net_addrs == {"back": "10.96.1.2"}  # t1's, released
    # an orphaned task (its node unreachable: it may still run) keeps its address
    ok(st, op="leader", term=1, ops=[("orphan", "t3", "node down")])
    task(st, "s1", "t4")
    assert st.tasks["t4"].net_addrs == {"back": "10.96.1.3"}
    ok(st, op="network_remove", id="na")
    assert "na" not in st.networks


def test_node_addresses_come_from_the_top_of_the_subnet_by_node_index() -> None:
    assert netalloc.node_index("10.99.2.0/24", "10.99.0.0/16") == 2
    assert netalloc.node_address("10.96.0.0/24", 0) == "10.96.0.254"
    assert netalloc.node_address("10.96.0.0/24", 2) == "10.96.0.252"
    assert netalloc.node_address("10.96.0.0/24", 64) == ""  # beyond the node slots
    top = netalloc.pick_task_address("10.96.0.0/28", "10.96.0.1",
                                     {f"10.96.0.{i}" for i in range(2, 10)})
    assert top == "10.96.0.10"  # .11-.14 are the 4 node slots of a /28
