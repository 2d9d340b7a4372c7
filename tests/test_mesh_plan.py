"""The mesh's pure planning (node/mesh.py): state snapshot → balancer tables, DNS answers,
routes. No network: each test names the property a user would notice."""

from __future__ import annotations

from shoal.lb.model import Algorithm, Endpoint, Frontend, Proto
from shoal.node.mesh import lookup, peer_routes, plan_tables, stopping_tasks
from shoal.raft.models import (
    Node,
    NodeRole,
    PortSpec,
    Service,
    Task,
    TaskState,
    TaskStatus,
    to_dict,
)
from shoal.raft.state import ClusterInfo, Snapshot
from shoal.raft.validate import validate_spec


def snap(*tasks: Task, ports: tuple[PortSpec, ...] = (PortSpec(8080, 8000),),
         algorithm: str = "round-robin") -> Snapshot:
    spec = validate_spec({"name": "web", "command": ["x"], "ports": [to_dict(p) for p in ports],
                          "lb_algorithm": algorithm, "stop_grace_period": 7.0})
    svc = Service(id="s1", spec=spec, vip="10.98.0.2")
    bare = Service(id="s2", spec=validate_spec({"name": "db", "command": ["x"]}),
                   vip="10.98.0.3")
    nodes = {f"n{i}": Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.77.0.1{i}", api_port=2377,
                           raft_port=2378, role=NodeRole.MANAGER, subnet=f"10.99.{i}.0/24")
             for i in (1, 2, 3)}
    return Snapshot(index=1, cluster=ClusterInfo(), nodes=nodes,
                    services={"s1": svc, "s2": bare}, tasks={t.id: t for t in tasks})


def task(tid: str, state: TaskState = TaskState.RUNNING, addr: str = "10.99.1.2",
         desired: TaskState = TaskState.RUNNING, service: str = "s1") -> Task:
    spec = validate_spec({"name": "web" if service == "s1" else "db", "command": ["x"],
                          "stop_grace_period": 7.0})
    return Task(id=tid, service_id=service, service_name=spec.name, slot=1, spec=spec.task,
                service_version=1, desired_state=desired, node_id="n1",
                status=TaskStatus(state=state, addr=addr))


def test_only_running_tasks_with_an_address_receive_traffic() -> None:
    tables = plan_tables(snap(task("a"), task("b", TaskState.STARTING, "10.99.1.3"),
                              task("c", TaskState.FAILED, "10.99.1.4"), task("d", addr="")), {})
    (table,) = tables.values()
    assert table.endpoints == (Endpoint("10.99.1.2", "a"),)
    assert table.frontends == (Frontend(8080, Proto.TCP),) and table.vip == "10.98.0.2"
    assert table.target_port == 8000 and table.name == "web.8000"


def test_task_being_stopped_drains_until_its_grace_period() -> None:
    s = snap(task("a"), task("b", addr="10.99.2.2", desired=TaskState.SHUTDOWN))
    assert stopping_tasks(s) == {"b"}
    (table,) = plan_tables(s, {"b": 100.0}).values()
    assert Endpoint("10.99.2.2", "b", None, 107.0) in table.endpoints
    assert Endpoint("10.99.1.2", "a") in table.endpoints


def test_one_table_per_target_port_with_its_protocols_and_algorithm() -> None:
    ports = (PortSpec(53, 5353, "udp"), PortSpec(5353, 5353, "tcp"), PortSpec(80, 8000))
    tables = plan_tables(snap(task("a"), ports=ports, algorithm="least-conn"), {})
    assert sorted(tables) == ["web.5353", "web.8000"]
    assert set(tables["web.5353"].frontends) == {Frontend(53, Proto.UDP),
                                                 Frontend(5353, Proto.TCP)}
    assert all(t.algorithm is Algorithm.LEAST_CONNECTIONS for t in tables.values())
    for t in tables.values():
        t.validate()


def test_dns_names_vip_for_published_services_and_tasks_for_the_rest() -> None:
    s = snap(task("a"), task("b", addr="10.99.2.2"),
             task("c", addr="10.99.3.2", desired=TaskState.SHUTDOWN),
             task("d", addr="10.99.3.3", service="s2"))
    assert lookup(s, "web") == ["10.98.0.2"]
    assert lookup(s, "tasks.web") == ["10.99.1.2", "10.99.2.2"]  # not the one stopping
    assert lookup(s, "db") == ["10.99.3.3"]  # no published port: no VIP listener to use
    assert lookup(s, "nope") is None and lookup(s, "tasks.nope") is None


def test_routes_to_every_other_node_subnet_via_its_address() -> None:
    assert peer_routes(snap(), "n1") == [("10.99.2.0/24", "10.77.0.12"),
                                         ("10.99.3.0/24", "10.77.0.13")]
