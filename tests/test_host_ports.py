"""Ports published in host mode (``--publish mode=host``, ``endpoint.host_ports``) as pure code:
the spec's refusals naming the field, the schema-7 gate, the CLI's create/update flags,
Compose's long syntax, the cluster's port conflicts, one task per node, the service view and
the node's DNAT rules built from a hand-built state. No network, no processes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import converge

from shoal.cli import pretty, specflags
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.node.hostports import CHAIN, hostport_rules
from shoal.node.mesh import plan_tables
from shoal.raft.errors import ValidationError
from shoal.raft.models import Node, NodeRole, NodeState, TaskState, to_dict
from shoal.raft.state import ClusterState
from shoal.raft.validate import validate_spec

HOSTP = {"name": "web", "task": {"container": {"command": ["x"]}},
         "endpoint": {"host_ports": [{"published": 8080, "target": 80}]}}


def spec_with(**endpoint: Any) -> dict[str, Any]:
    return {"name": "web", "task": {"container": {"command": ["x"]}}, "endpoint": endpoint}


def refused(spec: dict[str, Any]) -> ValidationError:
    with pytest.raises(ValidationError) as exc:
        validate_spec(spec)
    return exc.value


# ------------------------------------------------------------------ spec
def test_a_host_port_is_refused_naming_the_field_when_it_cannot_be_served() -> None:
    err = refused(spec_with(host_ports=[{"published": 0, "target": 80}]))
    assert err.field == "endpoint.host_ports[0].published" and "published" in err.message
    err = refused(spec_with(host_ports=[{"published": 2377, "target": 80}]))
    assert err.field == "endpoint.host_ports[0].published" and "shoal itself" in err.message
    err = refused(spec_with(host_ports=[{"published": 8080, "target": 80},
                                        {"published": 8080, "target": 81}]))
    assert err.field == "endpoint.host_ports[1].published" and "twice" in err.message
    err = refused(spec_with(ports=[{"published": 8080, "target": 80}],
                            host_ports=[{"published": 8080, "target": 81}]))
    assert err.field == "endpoint.host_ports[0].published" and "twice" in err.message
    for mode in ("host", "none"):
        err = refused({**HOSTP, "task": {"network_mode": mode,
                                         "container": {"command": ["x"]}}})
        assert err.field == "endpoint.host_ports" and mode in err.message
    err = refused({**HOSTP, "task": {"container": {"command": ["x"]},
                                     "placement": {"max_replicas": 2}}})
    assert err.field == "task.placement.max_replicas"
    # the same number on another protocol is another port
    ok = validate_spec(spec_with(ports=[{"published": 8080, "target": 80}],
                                 host_ports=[{"published": 8080, "target": 80,
                                              "protocol": "udp"}]))
    assert ok.endpoint.host_ports[0].protocol == "udp"


def test_a_replicated_service_with_host_ports_is_stored_one_task_per_node() -> None:
    spec = validate_spec({**HOSTP, "mode": {"replicas": 3}})
    assert spec.task.placement.max_replicas == 1
    assert not spec.endpoint.ports  # (nothing for the routing mesh)
    glob = validate_spec({**HOSTP, "mode": {"type": "global"}})
    assert glob.task.placement.max_replicas == 0  # (one per node anyway)


def test_a_schema_6_cluster_refuses_host_ports_naming_the_field() -> None:
    from shoal.raft.schema import encode_command

    cmd = {"op": "service_create", "id": "s1", "now": 1.0, "spec": HOSTP}
    with pytest.raises(ValidationError) as exc:
        encode_command(cmd, {}, 6)
    assert exc.value.field == "endpoint.host_ports" and "schema 7" in exc.value.message
    assert encode_command(cmd, {}, 7) == cmd
    # a spec that does not use them is written without the key for schema 6's nodes
    plain = to_dict(validate_spec(spec_with(ports=[{"published": 8080, "target": 80}])))
    out = encode_command({"op": "service_create", "id": "s1", "now": 1.0, "spec": plain},
                         {}, 6)
    assert "host_ports" not in out["spec"]["endpoint"] and out["spec"]["endpoint"]["ports"]


# ------------------------------------------------------------------ CLI
def create(*argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["service", "create", "--name", "web", *argv,
                                      "--", "sleep", "1"])
    return specflags.spec_from_create_args(args)


def update(current: dict[str, Any], *argv: str) -> dict[str, Any]:
    args = build_parser().parse_args(["service", "update", *argv, "web"])
    return specflags.apply_update_args(current, args)


def test_publish_mode_host_goes_to_host_ports_on_create() -> None:
    spec = create("-p", "mode=host,published=8080,target=80", "-p", "9000:90",
                  "-p", "published=53,target=5353,protocol=udp,mode=host")
    assert spec["endpoint"]["ports"] == [{"published": 9000, "target": 90, "protocol": "tcp"}]
    assert spec["endpoint"]["host_ports"] == [
        {"published": 8080, "target": 80, "protocol": "tcp"},
        {"published": 53, "target": 5353, "protocol": "udp"}]
    assert validate_spec(spec).endpoint.host_ports[1].protocol == "udp"
    only = create("-p", "mode=host,published=8080,target=80")
    assert "ports" not in only["endpoint"] or not only["endpoint"]["ports"]
    with pytest.raises(CliError, match="mode=host needs published"):
        create("-p", "mode=host,target=80")
    with pytest.raises(CliError, match="mode must be ingress or host"):
        create("-p", "mode=bogus,published=1,target=80")


def test_publish_add_and_rm_change_host_ports_on_update() -> None:
    current = to_dict(validate_spec(spec_with(ports=[{"published": 9000, "target": 90}],
                                              host_ports=[{"published": 8080, "target": 80}])))
    spec = update(current, "--publish-add", "mode=host,published=8081,target=81")
    ep = spec["endpoint"]
    assert [p["published"] for p in ep["host_ports"]] == [8080, 8081]
    assert [p["published"] for p in ep["ports"]] == [9000]
    spec = update(current, "--publish-rm", "8080")
    assert spec["endpoint"]["host_ports"] == [] and spec["endpoint"]["ports"]
    # the same published port given again replaces it, in either mode
    spec = update(current, "--publish-add", "mode=host,published=8080,target=88")
    assert [p["target"] for p in spec["endpoint"]["host_ports"]] == [88]
    spec = update(current, "--publish-add", "8080:80")
    assert spec["endpoint"]["host_ports"] == []
    assert [p["published"] for p in spec["endpoint"]["ports"]] == [9000, 8080]
    spec = update(current, "--publish-add", "mode=host,published=9000,target=90")
    assert [p["published"] for p in spec["endpoint"]["ports"]] == []
    assert [p["published"] for p in spec["endpoint"]["host_ports"]] == [8080, 9000]
    validate_spec(spec)


def test_compose_long_syntax_mode_host_goes_to_host_ports(tmp_path: Path) -> None:
    path = tmp_path / "compose.yml"
    path.write_text("services:\n  web:\n    command: [sleep, '1']\n    ports:\n"
                    "      - {target: 80, published: 8080, mode: host}\n"
                    "      - {target: 90, published: 9000}\n      - '7000:70'\n")
    stack = load_stack("app", [path], {})
    web = stack.services[0]
    assert [(p.published, p.target) for p in web.endpoint.host_ports] == [(8080, 80)]
    assert [(p.published, p.target) for p in web.endpoint.ports] == [(9000, 90), (7000, 70)]
    assert not [w for w in stack.warnings if "mode" in str(w)]
    path.write_text("services:\n  web:\n    command: [sleep, '1']\n    ports:\n"
                    "      - {target: 80, mode: host}\n")
    with pytest.raises(ComposeError, match="published"):
        load_stack("app", [path], {})


# ------------------------------------------------------------------ the cluster
def node(i: int) -> Node:
    return Node(id=f"n{i}", hostname=f"h{i}", addr=f"10.0.0.{i}", api_port=2377,
                raft_port=2378, role=NodeRole.WORKER, state=NodeState.READY)


def state(*nodes: Node) -> ClusterState:
    st = ClusterState()
    st.apply({"op": "cluster_init", "cluster_id": "c", "now": 1.0, "worker_secret": "w",
              "manager_secret": "m", "digest": "d", "schema": 7})
    for n in nodes:
        assert "ok" in st.apply({"op": "node_add", "now": 1.0, "node": to_dict(n)})
    return st


def test_a_host_port_is_one_services_and_no_routing_mesh_listener() -> None:
    st = state()
    assert st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": HOSTP})["ok"]
    for i, (spec, field) in enumerate((
            ({**HOSTP, "name": "two"}, "endpoint.host_ports"),
            (spec_with(ports=[{"published": 8080, "target": 80}]), "endpoint.ports"),
            ({"name": "hn", "task": {"network_mode": "host", "container": {"command": ["x"]}},
              "endpoint": {"expose": [{"port": 8080}]}}, "task.network_mode"))):
        res = st.apply({"op": "service_create", "id": f"x{i}", "now": 1.0,
                        "spec": {**spec, "name": f"other{i}"}})
        assert res["error"]["code"] == "conflict" and res["error"]["field"] == field, res
        assert "8080/tcp" in res["error"]["message"]
    # and the other way round: a host port on a routing-mesh port
    assert st.apply({"op": "service_create", "id": "s2", "now": 1.0, "spec": spec_with(
        ports=[{"published": 9000, "target": 80}]) | {"name": "mesh"}})["ok"]
    res = st.apply({"op": "service_create", "id": "s3", "now": 1.0, "spec": spec_with(
        host_ports=[{"published": 9000, "target": 80}]) | {"name": "late"}})
    assert res["error"]["field"] == "endpoint.host_ports" and "mesh" in res["error"]["message"]
    # a port the managers assign skips host ports
    assert st.apply({"op": "service_create", "id": "s4", "now": 1.0, "spec": spec_with(
        host_ports=[{"published": 30000, "target": 80}]) | {"name": "h30"}})["ok"]
    assert st.apply({"op": "service_create", "id": "s5", "now": 1.0, "spec": spec_with(
        ports=[{"published": 0, "target": 80}]) | {"name": "auto"}})["ok"]
    assert st.services["s5"].spec.endpoint.ports[0].published == 30001


def run_all(st: ClusterState, now: float = 10.0) -> None:
    for i, t in enumerate(sorted(st.tasks.values(), key=lambda t: t.id)):
        if t.node_id and t.status.state != TaskState.RUNNING:
            st.apply({"op": "task_status", "task_id": t.id, "node_id": t.node_id, "now": now,
                      "status": {"state": int(TaskState.RUNNING), "timestamp": now,
                                 "addr": f"10.99.{t.node_id[1:]}.{i + 2}"}})


def test_the_scheduler_places_one_task_per_node_and_the_node_dnats_to_its_own() -> None:
    st = state(node(1), node(2))
    assert st.apply({"op": "service_create", "id": "s1", "now": 1.0,
                     "spec": {**HOSTP, "mode": {"replicas": 3}}})["ok"]
    converge(st)
    placed = [t.node_id for t in st.tasks.values() if t.node_id]
    assert sorted(placed) == ["n1", "n2"]  # the third waits for a node
    run_all(st)
    snap = st.snapshot()
    mine = next(t for t in snap.tasks.values() if t.node_id == "n2")
    nat, fwd = hostport_rules(snap, "n2")
    assert nat == [f"-A {CHAIN} -d {snap.cluster.vip_cidr} -j RETURN",
                   f"-A {CHAIN} -p tcp --dport 8080 -j DNAT --to-destination "
                   f"{mine.status.addr}:80"]
    assert f"-A {CHAIN} -d {mine.status.addr}/32 -p tcp --dport 80 -m conntrack " \
           "--ctstate DNAT -j ACCEPT" in fwd
    assert hostport_rules(snap, "n3") == ([], [])  # no task there: not published
    assert plan_tables(snap, {}) == {}  # the routing mesh does not listen on it
    # the task stops: its rules go
    st.apply({"op": "task_status", "task_id": mine.id, "node_id": "n2", "now": 11.0,
              "status": {"state": int(TaskState.FAILED), "timestamp": 11.0}})
    assert hostport_rules(st.snapshot(), "n2") == ([], [])


def test_service_view_prints_host_ports_with_publish_mode_host() -> None:
    spec = to_dict(validate_spec(spec_with(ports=[{"published": 9000, "target": 90}],
                                           host_ports=[{"published": 8080, "target": 80}])))
    text = pretty.service({"id": "s1", "name": "web", "spec": spec, "vip": "10.98.0.2",
                           "update_status": {"state": "", "message": "", "started_at": 0.0,
                                             "completed_at": 0.0}})
    assert "PublishMode = ingress" in text
    host = text.split("PublishedPort = 8080")[1]
    assert "TargetPort = 80" in host and "PublishMode = host" in host
