"""The mesh's pure planning (node/mesh.py): state snapshot → balancer tables, DNS answers,
routes. No network: each test names the property a user would notice."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest

from shoal.lb.model import Algorithm, Endpoint, Frontend, Proto
from shoal.node.mesh import lookup, peer_routes, plan_tables, stopping_tasks
from shoal.raft.errors import ValidationError
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
    s = snap(task("a"), task("b", addr="10.99.2.2", desired=TaskState.SHUTDOWN),
             task("c", addr="10.99.2.3", desired=TaskState.SHUTDOWN, service="s2"))
    assert stopping_tasks(s) == {"b"}  # (c's service has no port: no connection to drain)
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


def test_dns_names_the_vip_of_services_with_a_port_and_tasks_for_the_rest() -> None:
    s = snap(task("a"), task("b", addr="10.99.2.2"),
             task("c", addr="10.99.3.2", desired=TaskState.SHUTDOWN),
             task("d", addr="10.99.3.3", service="s2"))
    assert lookup(s, "web") == ["10.98.0.2"]
    assert lookup(s, "tasks.web") == ["10.99.1.2", "10.99.2.2"]  # not the one stopping
    assert lookup(s, "db") == ["10.99.3.3"]  # declares no port: a VIP would refuse everything
    assert lookup(s, "db", lambda image: ((5432, "tcp"),)) == ["10.99.3.3"]  # (no image)
    assert lookup(s, "nope") is None and lookup(s, "tasks.nope") is None


def with_service(s: Snapshot, **endpoint: Any) -> Snapshot:
    spec = validate_spec({"name": "api", "task": {"container": {"command": ["x"],
                                                                "image": endpoint.pop(
                                                                    "image", "")}},
                          "endpoint": endpoint})
    svc = Service(id="s3", spec=spec, vip="10.98.0.4")
    return replace(s, services={**s.services, "s3": svc})


def api_task(tid: str, addr: str) -> Task:
    return replace(task(tid, addr=addr, service="s2"), service_id="s3", service_name="api")


def test_an_unpublished_service_with_an_exposed_port_gets_a_balanced_vip() -> None:
    s = with_service(snap(api_task("x", "10.99.1.7"), api_task("y", "10.99.2.7")),
                     expose=[{"port": 9000}, {"port": 9053, "protocol": "udp"}])
    assert lookup(s, "api") == ["10.98.0.4"]
    tables = plan_tables(s, {})
    assert tables["api.9000"].endpoints == (Endpoint("10.99.1.7", "x"),
                                            Endpoint("10.99.2.7", "y"))
    listeners = {(f.addr, f.port, f.proto) for f in tables["api.9000"].all_frontends()}
    assert listeners == {("10.98.0.4", 9000, Proto.TCP)}  # the VIP only, no node port
    udp = {(f.addr, f.port, f.proto) for f in tables["api.9053"].all_frontends()}
    assert udp == {("10.98.0.4", 9053, Proto.UDP)}
    for t in tables.values():
        t.validate()


def test_the_image_exposed_ports_give_the_vip_its_ports() -> None:
    s = with_service(snap(api_task("x", "10.99.1.7")), image="api:1")
    assert "api.8080" not in plan_tables(s, {})
    ports = {"api:1": ((8080, "tcp"),)}

    def image_ports(ref: str) -> tuple[tuple[int, str], ...]:
        return ports.get(ref, ())
    assert lookup(s, "api", image_ports) == ["10.98.0.4"]
    assert plan_tables(s, {}, image_ports)["api.8080"].vip == "10.98.0.4"


def test_a_published_port_keeps_its_vip_and_exposing_another_protocol_adds_one() -> None:
    s = with_service(snap(api_task("x", "10.99.1.7")),
                     ports=[{"published": 8053, "target": 53}], expose=[{"port": 53,
                                                                        "protocol": "udp"}])
    (table,) = [t for n, t in plan_tables(s, {}).items() if n.startswith("api.")]
    got = {(f.addr, f.port, f.proto) for f in table.all_frontends()}
    assert got == {(None, 8053, Proto.TCP), ("10.98.0.4", 53, Proto.TCP),
                   ("10.98.0.4", 53, Proto.UDP)}
    table.validate()


def test_dnsrr_answers_task_addresses_in_varying_order_and_has_no_vip_table() -> None:
    s = with_service(snap(*(api_task(f"t{i}", f"10.99.1.{10 + i}") for i in range(4))),
                     mode="dnsrr", expose=[{"port": 9000}])
    assert not [n for n in plan_tables(s, {}) if n.startswith("api.")]
    rng = random.Random(7)
    answers = {tuple(lookup(s, "api", shuffle=rng.shuffle) or ()) for _ in range(20)}
    assert len(answers) > 1  # the order changes from query to query
    assert all(sorted(a) == [f"10.99.1.{10 + i}" for i in range(4)] for a in answers)


def test_dnsrr_with_published_ports_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        validate_spec({"name": "x", "task": {"container": {"command": ["x"]}},
                       "endpoint": {"mode": "dnsrr", "ports": [{"published": 80,
                                                               "target": 80}]}})
    assert err.value.field == "endpoint.mode"


def test_routes_to_every_other_node_subnet_via_its_address() -> None:
    assert peer_routes(snap(), "n1") == [("10.99.2.0/24", "10.77.0.12"),
                                         ("10.99.3.0/24", "10.77.0.13")]


def test_image_exposed_ports_are_read_and_kept_in_the_manifest_config() -> None:
    from shoal.runtime.images import ImageConfig
    cfg = ImageConfig.from_json({"ExposedPorts": {"8000/tcp": {}, "53/udp": {}, "x/tcp": {},
                                                  "9000": {}}})
    assert cfg.exposed_ports == ((53, "udp"), (8000, "tcp"), (9000, "tcp"))
    assert ImageConfig.from_json(cfg.to_json()) == cfg
    assert "ExposedPorts" not in ImageConfig().to_json()  # images without keep their id


def test_expose_flags_add_and_remove_by_port_and_protocol() -> None:
    import argparse

    from shoal.cli.specflags import add_update_flags, apply_update_args
    p = argparse.ArgumentParser()
    add_update_flags(p)
    args = p.parse_args(["--expose-add", "9000", "--expose-add", "53/udp",
                         "--expose-rm", "8000", "--endpoint-mode", "vip"])
    cur = {"endpoint": {"expose": [{"port": 8000, "protocol": "tcp"}], "mode": "dnsrr"}}
    got = apply_update_args(cur, args)["endpoint"]
    assert got["mode"] == "vip"
    assert got["expose"] == [{"port": 9000, "protocol": "tcp"}, {"port": 53, "protocol": "udp"}]


def test_a_host_network_service_has_no_vip_and_its_name_is_its_tasks_nodes() -> None:
    """Tasks on the host's network: no VIP listener (it would hold the very port they bind on
    their node), the published port leads to their nodes' addresses, and DNS answers each
    node once however many of its tasks run there."""
    spec = validate_spec({"name": "edge", "task": {"container": {"command": ["x"]},
                                                   "network_mode": "host"},
                          "endpoint": {"ports": [{"published": 8443, "target": 443}],
                                       "expose": [{"port": 9100}]}})
    base = snap()
    tasks = [replace(task(f"e{i}", addr=a, service="s2"), service_id="s4", service_name="edge")
             for i, a in enumerate(("10.77.0.11", "10.77.0.11", "10.77.0.12"))]
    s = replace(base, services={**base.services, "s4": Service(id="s4", spec=spec,
                                                               vip="10.98.0.5")},
                tasks={t.id: t for t in tasks})
    tables = {n: t for n, t in plan_tables(s, {}).items() if n.startswith("edge.")}
    assert list(tables) == ["edge.443"]  # (no VIP table for the exposed 9100 either)
    table = tables["edge.443"]
    assert table.vip is None
    assert {(f.addr, f.port) for f in table.all_frontends()} == {(None, 8443)}
    assert [e.addr for e in table.endpoints] == ["10.77.0.11", "10.77.0.11", "10.77.0.12"]
    assert lookup(s, "edge") == lookup(s, "tasks.edge") == ["10.77.0.11", "10.77.0.12"]


def test_tasks_of_indexes_the_tasks_once_and_follows_a_grown_dict() -> None:
    s = snap(task("a"), task("b", service="s2"))
    assert [t.id for t in s.tasks_of("s1")] == ["a"]
    assert s._by_service is not None and s.tasks_of("none") == []
    s.tasks["c"] = task("c")  # (a builder adding one after a read: the index is rebuilt)
    assert [t.id for t in s.tasks_of("s1")] == ["a", "c"]
    s.tasks_of("s1").clear()  # a new list each call: the index is not the caller's
    assert len(s.tasks_of("s1")) == 2
