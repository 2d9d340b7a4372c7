"""A published port's host address (``PortSpec.host_ip``, Compose's ``127.0.0.1:5432:5432``)
as pure code: the spec's refusals naming the field, the schema-13 gate (refused while an older
node is in, on propose and by the state machine; an empty one left out of what older nodes
read), the CLI's ``-p IP:PUB:TARGET`` and ``host_ip=``, Compose's short and long syntax, the
views, and the node's plan: balancer frontends at that address only (the VIP listener kept; a
node without the address skips the port) and host-mode DNAT rules to it only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gates import assert_waits_for, old_release_results, written_below
from test_cli_ports_envfile import create, update

from shoal.cli import output, pretty, specflags
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.errors import CliError
from shoal.lb.model import Frontend, Listener, Listeners, Proto
from shoal.node.hostports import CHAIN, hostport_rules
from shoal.node.mesh import has_address, plan_tables
from shoal.node.views import service_view
from shoal.raft.errors import ValidationError
from shoal.raft.models import (
    Node,
    NodeRole,
    Service,
    Task,
    TaskState,
    TaskStatus,
    to_dict,
)
from shoal.raft.schema import PORT_HOST_IP, SCHEMA, encode_command
from shoal.raft.spec import ServiceSpec
from shoal.raft.state import ClusterInfo, Snapshot
from shoal.raft.validate import validate_spec


def _spec(**endpoint: Any) -> dict[str, Any]:
    return {"name": "db", "task": {"container": {"command": ["x"]}}, "endpoint": endpoint}


LOCAL = _spec(ports=[{"published": 5432, "target": 5432, "host_ip": "127.0.0.1"}])


# ------------------------------------------------------------------ spec
def test_host_ip_is_one_ipv4_address_and_a_bad_one_names_the_field() -> None:
    port = validate_spec(LOCAL).endpoint.ports[0]
    assert (port.host_ip, port.published, port.key) == ("127.0.0.1", 5432, "5432/tcp")
    assert validate_spec(_spec(ports=[{"published": 80, "target": 80}])).endpoint.ports[
        0].host_ip == ""  # (every address, as before)
    for bad, why in (("::1", "IPv6 is not supported"), ("localhost", "not an IPv4 address"),
                     ("10.0.0.300", "not an IPv4 address"), ("0.0.0.0", "leave host_ip empty"),
                     ("224.0.0.1", "multicast or broadcast"),
                     ("255.255.255.255", "multicast or broadcast"),
                     ("2001:db8::1234:5678:9abc", "IPv6")):
        with pytest.raises(ValidationError) as exc:
            validate_spec(_spec(ports=[{"published": 80, "target": 80, "host_ip": bad}]))
        assert exc.value.field == "endpoint.ports[0].host_ip" and why in exc.value.message, bad
    # a host-mode port is not translated for the node's own connections: on 127.0.0.1
    # nothing could reach it
    with pytest.raises(ValidationError) as exc:
        validate_spec(_spec(host_ports=[{"published": 80, "target": 80,
                                         "host_ip": "127.0.0.1"}]))
    assert exc.value.field == "endpoint.host_ports[0].host_ip"
    assert "routing mesh" in exc.value.message
    ok = validate_spec(_spec(host_ports=[{"published": 80, "target": 80,
                                          "host_ip": "10.0.0.5"}]))
    assert ok.endpoint.host_ports[0].host_ip == "10.0.0.5"


# ------------------------------------------------------------------ schema 13
@pytest.mark.parametrize(("spec", "field"), [
    (LOCAL, "endpoint.ports[0].host_ip"),
    (_spec(host_ports=[{"published": 80, "target": 80, "host_ip": "10.0.0.5"}]),
     "endpoint.host_ports[0].host_ip")])
def test_host_ip_waits_for_schema_13_on_propose_and_in_the_state_machine(
        spec: dict[str, Any], field: str) -> None:
    """A schema-12 node does not know the key (and would publish on every address): while
    one is in, a port with an address is refused naming it (create and update); at 13 it
    goes."""
    assert SCHEMA >= PORT_HOST_IP == 13
    assert_waits_for(13, to_dict(validate_spec(spec)), to_dict(validate_spec(
        _spec(ports=[{"published": 80, "target": 80}]))), field)


def test_below_13_a_port_is_written_without_host_ip_as_schema_12_writes_it() -> None:
    full = to_dict(validate_spec(_spec(ports=[{"published": 80, "target": 80}],
                                       host_ports=[{"published": 81, "target": 81}])))
    assert full["endpoint"]["ports"][0]["host_ip"] == ""
    sent, stored = written_below(13, full)
    assert [list(p) for p in sent["endpoint"]["ports"]] == [["published", "target", "protocol"]]
    assert "host_ip" not in sent["endpoint"]["host_ports"][0]
    assert "host_ip" in full["endpoint"]["ports"][0]  # (not mutated)
    assert "host_ip" not in stored["endpoint"]["ports"][0]
    # schema 1 (shoal 0.1's flat spec) cannot say it either
    with pytest.raises(ValidationError) as exc:
        encode_command({"op": "service_create", "id": "s2", "now": 1.0,
                        "spec": to_dict(validate_spec(LOCAL))}, {}, 1)
    assert exc.value.field == "endpoint.ports[0].host_ip"


def test_the_schema_12_release_refuses_host_ip_so_the_gate_is_needed() -> None:
    """The schema-12 release's own state machine refuses a port's host_ip key (what a
    replica of it would do with one were it not gated) and takes the port without it."""
    from test_mixed_state_bytes import SCHEMA_12

    results = old_release_results(SCHEMA_12, 12, [_spec(ports=[port]) for port in (
        {"published": 80, "target": 80, "host_ip": "127.0.0.1"},
        {"published": 81, "target": 81})])
    assert "host_ip" in results[1]["error"]["message"]
    assert results[2].get("ok")


# ------------------------------------------------------------------ CLI
def ports(spec: ServiceSpec) -> list[tuple[str, int, int, str]]:
    return [(p.host_ip, p.published, p.target, p.protocol) for p in spec.endpoint.ports]


def test_publish_takes_dockers_host_address_in_both_forms() -> None:
    spec = create("-p", "127.0.0.1:8080:80", "-p", "127.0.0.1:5353:53/udp",
                  "-p", "host_ip=127.0.0.1,published=8443,target=443",
                  "-p", "10.0.0.5:9000-9001:90-91", "-p", "0.0.0.0:81:81",
                  "-p", "127.0.0.1::82",
                  "-p", "mode=host,published=7070,target=70,host_ip=10.0.0.5")
    assert ports(spec) == [("127.0.0.1", 8080, 80, "tcp"), ("127.0.0.1", 5353, 53, "udp"),
                           ("127.0.0.1", 8443, 443, "tcp"), ("10.0.0.5", 9000, 90, "tcp"),
                           ("10.0.0.5", 9001, 91, "tcp"), ("", 81, 81, "tcp"),
                           ("127.0.0.1", 0, 82, "tcp")]
    assert [(p.host_ip, p.published) for p in spec.endpoint.host_ports] == [("10.0.0.5", 7070)]
    # --publish-rm still names PUBLISHED/PROTO; --publish-add of the same port replaces it
    spec = update(spec, "--publish-rm", "8080", "--publish-rm", "5353/udp",
                  "--publish-add", "8443:443")
    assert ("", 8443, 443, "tcp") in ports(spec) and not {8080, 5353} & {
        p.published for p in spec.endpoint.ports}
    assert update(spec, "--publish-rm", "7070").endpoint.host_ports == ()
    # a port the managers assigned (-p 82) moves to an address, keeping its number
    assigned = create("-p", "82").endpoint.ports[0]
    spec = validate_spec({**to_dict(spec), "endpoint": {"ports": [
        {**to_dict(assigned), "published": 30000}]}})
    assert ports(update(spec, "--publish-add", "127.0.0.1::82")) == [
        ("127.0.0.1", 30000, 82, "tcp")]
    assert ports(update(spec, "--publish-add", "82")) == [("", 30000, 82, "tcp")]
    for bad, why in (("[::1]:80:80", "IPv6 host addresses are not supported"),
                     ("::1:80:80", "IPv6 host addresses are not supported"),
                     ("host_ip=fe80::1,published=80,target=80", "IPv6"),
                     ("80:80:80:x", "expects [[HOST_IP:]PUBLISHED:]TARGET")):
        with pytest.raises(CliError) as exc:
            create("-p", bad)
        assert str(exc.value).startswith("--publish") and why in str(exc.value), bad
    for bad in ("localhost:80:80", "a:b:80:80"):  # (the spec checks the address itself)
        with pytest.raises(ValidationError) as verr:
            create("-p", bad)
        assert verr.value.field == "endpoint.ports[0].host_ip"
        assert "not an IPv4 address" in verr.value.message
        assert specflags.flag_of_field(verr.value.field) == "--publish"


def test_service_ls_and_inspect_pretty_show_the_address() -> None:
    spec = create("-p", "127.0.0.1:8080:80", "-p", "9090:90")
    svc = Service(id="s1", spec=spec, vip="10.98.0.2")
    view = service_view(svc, Snapshot(index=1, cluster=ClusterInfo(), nodes={},
                                      services={"s1": svc}, tasks={}))
    assert view["ports"] == [{"published": 8080, "target": 80, "protocol": "tcp",
                              "host_ip": "127.0.0.1"},
                             {"published": 9090, "target": 90, "protocol": "tcp"}]
    assert output._ports(view) == "127.0.0.1:8080->80/tcp, *:9090->90/tcp"
    text = pretty.service({"id": "s1", "name": "web", "spec": to_dict(spec), "vip": "",
                           "update_status": {"state": "", "message": "", "started_at": 0.0,
                                             "completed_at": 0.0}})
    assert "PublishedPort = 8080\n  Protocol = tcp\n  TargetPort = 80\n  PublishMode = " \
           "ingress\n  HostIP = 127.0.0.1\n PublishedPort = 9090" in text, text


# ------------------------------------------------------------------ Compose
COMPOSE = """\
services:
  web:
    image: plausible
    ports: ["127.0.0.1:8000:8000", "0.0.0.0:81:81", "127.0.0.1:5353:53/udp", "82"]
  db:
    image: postgres
    ports:
      - {target: 5432, published: 5432, host_ip: 127.0.0.1}
      - {target: 6000, published: 6000, host_ip: 10.0.0.5, mode: host}
"""


def test_compose_ports_on_a_host_address_are_published_there_without_a_warning(
        tmp_path: Path) -> None:
    (tmp_path / "compose.yml").write_text(COMPOSE)
    st = load_stack("app", [tmp_path / "compose.yml"], {})
    web, db = st.services
    assert ports(web) == [("127.0.0.1", 8000, 8000, "tcp"), ("", 81, 81, "tcp"),
                          ("127.0.0.1", 5353, 53, "udp"), ("", 0, 82, "tcp")]
    assert ports(db) == [("127.0.0.1", 5432, 5432, "tcp")]
    assert [(p.host_ip, p.published) for p in db.endpoint.host_ports] == [("10.0.0.5", 6000)]
    assert not any("ports" in w for w in st.warnings), st.warnings


@pytest.mark.parametrize(("items", "where", "why"), [
    ('["[::1]:80:80"]', "ports[0]", "IPv6 host addresses are not supported"),
    ('[{target: 80, published: 80, host_ip: "::1"}]', "ports[0].host_ip", "IPv6"),
    ('["localhost:80:80"]', "ports[0].host_ip", "not an IPv4 address")])
def test_compose_a_host_address_shoal_cannot_listen_on_names_the_key(
        tmp_path: Path, items: str, where: str, why: str) -> None:
    f = tmp_path / "compose.yml"
    f.write_text(f"services:\n  web:\n    image: nginx\n    ports: {items}\n")
    with pytest.raises(ComposeError) as exc:
        load_stack("app", [f], {})
    assert str(exc.value).startswith(f"services.web.{where}") and why in str(exc.value)


# ------------------------------------------------------------------ the node's plan
def _snap(*ports: dict[str, Any], host_ports: tuple[dict[str, Any], ...] = (),
          network_mode: str = "default") -> Snapshot:
    spec = validate_spec({"name": "web", "task": {"container": {"command": ["x"]},
                                                  "network_mode": network_mode},
                          "endpoint": {"ports": list(ports), "host_ports": list(host_ports)}})
    svc = Service(id="s1", spec=spec, vip="" if network_mode == "host" else "10.98.0.2")
    task = Task(id="t1", service_id="s1", service_name="web", slot=1, spec=spec.task,
                service_version=1, desired_state=TaskState.RUNNING, node_id="n1",
                status=TaskStatus(state=TaskState.RUNNING, addr="10.99.1.2"))
    node = Node(id="n1", hostname="h1", addr="10.77.0.11", api_port=2377, raft_port=2378,
                role=NodeRole.MANAGER, subnet="10.99.1.0/24")
    return Snapshot(index=1, cluster=ClusterInfo(vip_cidr="10.98.0.0/16"), nodes={"n1": node},
                    services={"s1": svc}, tasks={"t1": task})


def test_the_mesh_listens_at_the_host_ip_only_and_the_vip_listener_stays() -> None:
    snap = _snap({"published": 8080, "target": 80, "host_ip": "127.0.0.1"},
                 {"published": 8081, "target": 80, "protocol": "udp"})
    (table,) = plan_tables(snap, {}).values()
    assert table.frontends == (Frontend(8080, Proto.TCP, "127.0.0.1"),
                               Frontend(8081, Proto.UDP),
                               Frontend(80, Proto.TCP, "10.98.0.2"))
    table.validate()
    # (the node's listen addresses are its own, 127.0.0.1 and the gateway)
    got = Listeners.of(table, ("10.77.0.11", "127.0.0.1", "10.99.1.1")).items
    assert set(got) == {Listener("127.0.0.1", 8080, Proto.TCP),
                        *(Listener(a, 8081, Proto.UDP)
                          for a in ("10.77.0.11", "127.0.0.1", "10.99.1.1")),
                        Listener("10.98.0.2", 80, Proto.TCP), Listener("10.98.0.2", 80,
                                                                      Proto.UDP)}


def test_a_node_without_the_address_leaves_the_port_out_and_keeps_the_rest() -> None:
    snap = _snap({"published": 8080, "target": 80, "host_ip": "10.77.0.12"},
                 {"published": 9090, "target": 90})
    tables = plan_tables(snap, {}, has_addr=lambda a: a != "10.77.0.12")
    assert tables["web.80"].frontends == (Frontend(80, Proto.TCP, "10.98.0.2"),)  # (VIP)
    assert tables["web.90"].frontends == (Frontend(9090, Proto.TCP),)
    # a service on the host's network has no VIP: no table at all for that port there
    host = _snap({"published": 8080, "target": 80, "host_ip": "10.77.0.12"},
                 network_mode="host")
    assert plan_tables(host, {}, has_addr=lambda a: False) == {}
    assert plan_tables(host, {})["web.80"].frontends == (
        Frontend(8080, Proto.TCP, "10.77.0.12"),)


def test_has_address_is_what_this_namespace_can_bind() -> None:
    assert has_address("127.0.0.1")
    assert not has_address("192.0.2.77")  # (TEST-NET-1: no host has it)


def test_a_port_at_an_address_the_node_lacks_is_said_once_at_info(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Every pass (every applied entry, every 2 s) checks the addresses: the skipped port is
    logged once, not at each pass; another port there is said once too."""
    import logging

    from shoal.node.mesh import Mesh

    snap = _snap({"published": 8080, "target": 80, "host_ip": "192.0.2.77"},
                 {"published": 8081, "target": 81, "host_ip": "127.0.0.1"})
    mesh = Mesh(tmp_path, "n1", "10.77.0.11", lambda: snap, lambda: True, lambda: ())
    with caplog.at_level(logging.INFO, logger="shoal.mesh"):
        for _ in range(3):
            assert mesh._has_addresses(snap) == {"127.0.0.1"}
        more = _snap({"published": 8080, "target": 80, "host_ip": "192.0.2.77"},
                     {"published": 9090, "target": 90, "host_ip": "192.0.2.77"})
        mesh._has_addresses(more)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert said == [
        ("INFO", "not publishing 8080/tcp (web) at 192.0.2.77: not an address of this node"),
        ("INFO", "not publishing 9090/tcp (web) at 192.0.2.77: not an address of this node")]
    assert mesh.describe()["absent_host_ips"] == ["192.0.2.77"]


def test_host_mode_dnat_matches_the_host_ip_only() -> None:
    snap = _snap(host_ports=({"published": 7070, "target": 70, "host_ip": "10.77.0.11"},
                             {"published": 7071, "target": 71}))
    nat, _ = hostport_rules(snap, "n1")
    assert f"-A {CHAIN} -d 10.77.0.11/32 -p tcp --dport 7070 -j DNAT --to-destination " \
           "10.99.1.2:70" in nat
    assert f"-A {CHAIN} -p tcp --dport 7071 -j DNAT --to-destination 10.99.1.2:71" in nat
