"""Network aliases (``task.network_aliases``: Docker's ``--network name=N,alias=A``,
Compose's ``networks: {N: {aliases: [...]}}``) without a cluster: the spec's rules, the CLI's
flags on create and update, the Compose key, and the DNS answers (node/mesh.py ``lookup`` on
a hand-built state; node/dns.py for a dotted alias)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import dns.message
import dns.rcode
import pytest

from shoal.cli import specflags
from shoal.cli.compose import load_stack
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser
from shoal.node.dns import DnsConfig, DnsServer
from shoal.node.mesh import lookup
from shoal.raft.errors import ValidationError
from shoal.raft.models import (
    Network,
    Node,
    NodeRole,
    Service,
    Task,
    TaskState,
    TaskStatus,
    to_dict,
)
from shoal.raft.state import ClusterInfo, Snapshot
from shoal.raft.validate import validate_spec


def spec_with(aliases: dict[str, list[str]], networks: tuple[str, ...] = ("back", "front")
              ) -> dict[str, object]:
    return {"name": "db", "task": {"container": {"command": ["x"]},
                                   "networks": list(networks), "network_aliases": aliases}}


def refusal(aliases: dict[str, list[str]], networks: tuple[str, ...] = ("back", "front")
            ) -> ValidationError:
    with pytest.raises(ValidationError) as exc:
        validate_spec(spec_with(aliases, networks))
    return exc.value


# ----------------------------------------------------------------------------- the spec

def test_aliases_are_dns_names_on_a_network_the_service_joins() -> None:
    """An alias names the service on one of its networks: another network, a name that is no
    DNS name, one given twice (whatever its case), the DNS server's own forms (tasks.X,
    X.shoal) and more than 16 are refused, each naming task.network_aliases."""
    ok = validate_spec(spec_with({"back": ["primary", "db.internal", "pg_1"], "front": []}))
    assert ok.task.network_aliases == {"back": ("primary", "db.internal", "pg_1")}
    err = refusal({"side": ["x"]})
    assert err.field == "task.network_aliases.side" and "not one of the service's" in err.message
    assert refusal({"back": ["x"]}, networks=()).field == "task.network_aliases.back"
    for bad in ("a b", "-x", "x-", "a..b", "é", "x" * 64, ".".join(["a" * 63] * 4 + ["b"])):
        assert refusal({"back": ["ok", bad]}).field == "task.network_aliases.back[1]", bad
    err = refusal({"back": ["Primary", "primary"]})
    assert err.field == "task.network_aliases.back[1]" and "twice" in err.message
    for own in ("tasks.db", "db.shoal", "TASKS.db"):
        assert refusal({"back": [own]}).field == "task.network_aliases.back[0]", own
    err = refusal({"back": [f"a{i}" for i in range(17)]})
    assert err.field == "task.network_aliases.back" and "16" in err.message
    validate_spec(spec_with({"back": [f"a{i}" for i in range(16)]}))


# ----------------------------------------------------------------------------- the CLI

def test_network_flag_long_form_gives_aliases_on_create_and_update() -> None:
    """docker's ``--network name=back,alias=db,alias=db2`` beside the short ``--network
    front``; ``--network-add`` adds a network with its aliases, ``--network-rm`` drops its
    aliases with it (first, as docker's: rm then add is how aliases change)."""
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "db", "--network",
                         "name=back,alias=primary,alias=pg", "--network", "front",
                         "--", "sleep", "9"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    assert spec.task.networks == ("back", "front")
    assert spec.task.network_aliases == {"back": ("primary", "pg")}

    args = p.parse_args(["service", "update", "--network-rm", "front", "--network-add",
                         "name=front,alias=db-front", "--network-add", "name=side,alias=s", "db"])
    new = validate_spec(specflags.apply_update_args(to_dict(spec), args))
    assert new.task.networks == ("back", "front", "side")
    assert new.task.network_aliases == {"back": ("primary", "pg"), "front": ("db-front",),
                                        "side": ("s",)}
    # docker's order: --network-rm, then --network-add (how docker changes aliases); an add
    # of a network still attached is refused, as docker's
    args = p.parse_args(["service", "update", "--network-rm", "back", "--network-rm", "front",
                         "--network-add", "front", "db"])
    new = validate_spec(specflags.apply_update_args(to_dict(new), args))
    assert new.task.networks == ("side", "front")
    assert new.task.network_aliases == {"side": ("s",)}
    args = p.parse_args(["service", "update", "--network-rm", "side", "--network-add",
                         "name=side,alias=s2", "db"])
    again = validate_spec(specflags.apply_update_args(to_dict(new), args))
    assert again.task.networks == ("front", "side")
    assert again.task.network_aliases == {"side": ("s2",)}
    args = p.parse_args(["service", "update", "--network-add", "front", "db"])
    with pytest.raises(CliError, match="already attached to network front"):
        specflags.apply_update_args(to_dict(new), args)
    args = p.parse_args(["service", "update", "--env-add", "A=1", "db"])  # (others untouched)
    assert validate_spec(specflags.apply_update_args(to_dict(new), args)).task \
        .network_aliases == {"side": ("s",)}


@pytest.mark.parametrize("value", ["name=", "alias=x", "name=back,foo=1",
                                   "name=back,driver-opt=a=b", "back,alias=x"])
def test_a_bad_long_network_form_names_the_flag(value: str) -> None:
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "db", "--network", value, "--",
                         "sleep", "9"])
    with pytest.raises(CliError, match="--network"):
        specflags.spec_from_create_args(args)
    args = p.parse_args(["service", "update", "--network-add", value, "db"])
    with pytest.raises(CliError, match="--network-add"):
        specflags.apply_update_args(to_dict(validate_spec(spec_with({}))), args)


def test_an_api_error_about_aliases_names_the_network_flag() -> None:
    assert specflags.flag_of_field("task.network_aliases.back[0]") == "--network"


# ----------------------------------------------------------------------------- Compose

def test_compose_aliases_are_the_services_names_on_that_network(tmp_path: Path) -> None:
    """``networks: {back: {aliases: [...]}}`` → aliases on the stack's network (its name in
    the cluster); the other per-network keys are still reported as ignored."""
    (tmp_path / "compose.yml").write_text("""
services:
  db:
    command: sleep 1
    networks:
      back: {aliases: [primary, database], ipv4_address: 10.97.9.9}
      front:
      shared: {aliases: corp-db}
  web: {command: sleep 1, networks: {front: {aliases: []}}}
networks:
  back: {}
  front: {}
  shared: {external: true, name: corp-net}
""")
    st = load_stack("app", [tmp_path / "compose.yml"], {})
    specs = {s.name: s for s in st.services}
    db = specs["app_db"].task
    assert db.networks == ("app_back", "app_front", "corp-net")
    assert db.network_aliases == {"app_back": ("primary", "database"), "corp-net": ("corp-db",)}
    assert specs["app_web"].task.network_aliases == {}
    assert [w.split(":")[0] for w in st.warnings] == ["networks.ipv4_address"], st.warnings


# ----------------------------------------------------------------------------- DNS

BACK = Network(id="nb", name="back", subnet="10.96.1.0/24", gateway="10.96.1.1", vni=4097)
FRONT = Network(id="nf", name="front", subnet="10.96.0.0/24", gateway="10.96.0.1", vni=4096)


def service(name: str, *networks: str, aliases: dict[str, list[str]] | None = None,
            vip: bool = True) -> Service:
    spec = validate_spec({"name": name, "task": {"container": {"command": ["x"]},
                                                 "networks": list(networks),
                                                 "network_aliases": aliases or {}},
                          "endpoint": {"expose": [{"port": 80}] if vip else []}})
    return Service(id=name, spec=spec, vip=f"10.98.0.{len(name)}")


def task(tid: str, svc: Service, **addrs: str) -> Task:
    return Task(id=tid, service_id=svc.id, service_name=svc.spec.name, slot=1,
                spec=svc.spec.task, service_version=1, node_id="n1",
                status=TaskStatus(state=TaskState.RUNNING,
                                  addr=next(iter(addrs.values()), "10.99.0.5")),
                net_addrs=dict(addrs))


def state(*pairs: tuple[Service, list[Task]]) -> Snapshot:
    node = Node(id="n1", hostname="h1", addr="10.77.0.11", api_port=2377, raft_port=2378,
                role=NodeRole.MANAGER, subnet="10.99.0.0/24")
    return Snapshot(index=1, cluster=ClusterInfo(), nodes={"n1": node},
                    services={s.id: s for s, _ in pairs},
                    tasks={t.id: t for _, ts in pairs for t in ts},
                    networks={"nb": BACK, "nf": FRONT})


def test_an_alias_resolves_as_the_service_name_only_on_its_network() -> None:
    """db (on back and front) has the alias `primary` on back: a task on back gets db's VIP
    for `primary` and the tasks' back addresses for `tasks.primary` (as libnetwork's
    tasks.ALIAS); a task only on front does not know the name (forwarded, as any unknown
    one); the node itself does."""
    db = service("db", "back", "front", aliases={"back": ["Primary"]})
    client, other = service("client", "back"), service("other", "front")
    s = state((db, [task("d1", db, back="10.96.1.2", front="10.96.0.2"),
                    task("d2", db, back="10.96.1.3", front="10.96.0.3")]),
              (client, [task("c1", client, back="10.96.1.9")]),
              (other, [task("o1", other, front="10.96.0.9")]))
    assert lookup(s, "primary", asker="10.96.1.9") == [db.vip] == lookup(s, "db",
                                                                         asker="10.96.1.9")
    assert lookup(s, "tasks.primary", asker="10.96.1.9") == ["10.96.1.2", "10.96.1.3"]
    assert lookup(s, "primary", asker="10.96.0.9") is None  # front: db is there, not the alias
    assert lookup(s, "tasks.primary", asker="10.96.0.9") is None
    assert lookup(s, "db", asker="10.96.0.9") == [db.vip]
    assert lookup(s, "primary") == [db.vip]  # the node itself: no filter
    assert lookup(s, "tasks.primary") == ["10.96.1.2", "10.96.1.3"]  # (on back)
    # endpoint mode dnsrr / no port: the tasks' addresses on the alias's network
    rr = service("db", "back", "front", aliases={"back": ["primary"]}, vip=False)
    s2 = replace(s, services={**s.services, "db": rr})
    assert lookup(s2, "primary", asker="10.96.1.9") == ["10.96.1.2", "10.96.1.3"]


def test_a_service_name_wins_over_another_services_alias() -> None:
    """`cache` is a service on back and an alias of db there: the service answers; where the
    service `cache` is not on the asker's network, the alias does; two services with one
    alias on the asker's network answer together (Docker's records pile up likewise)."""
    db = service("db", "back", "front", aliases={"back": ["cache"], "front": ["cache", "pair"]})
    cache = service("cache", "back")
    mate = service("mate", "front", aliases={"front": ["pair"]})
    client, other = service("client", "back"), service("other", "front")
    s = state((db, [task("d1", db, back="10.96.1.2", front="10.96.0.2")]),
              (cache, [task("k1", cache, back="10.96.1.4")]),
              (mate, [task("m1", mate, front="10.96.0.4")]),
              (client, [task("c1", client, back="10.96.1.9")]),
              (other, [task("o1", other, front="10.96.0.9")]))
    assert lookup(s, "cache", asker="10.96.1.9") == [cache.vip]
    assert lookup(s, "cache", asker="10.96.0.9") == [db.vip]  # front: no service cache there
    assert sorted(lookup(s, "pair", asker="10.96.0.9") or []) == sorted([db.vip, mate.vip])
    assert lookup(s, "pair", asker="10.96.1.9") is None


def test_the_dns_server_answers_a_dotted_alias_and_forwards_other_dotted_names() -> None:
    """A name with a dot was never a shoal name (services have none): an alias may have one
    (db.internal), so the server asks the lookup; what it does not know still goes upstream
    (None: not answered here)."""
    db = service("db", "back", aliases={"back": ["db.internal"]})
    client, plain = service("client", "back"), service("plain")
    s = state((db, [task("d1", db, back="10.96.1.2")]),
              (client, [task("c1", client, back="10.96.1.9")]),
              (plain, [task("p1", plain)]))  # (on the default network: 10.99.0.5)
    server = DnsServer(lambda name: lookup(s, name), DnsConfig(upstreams=[]),
                       lookup_from=lambda name, asker: lookup(s, name, asker=asker))
    reply = server.answer(dns.message.make_query("db.internal.", "A"), "10.96.1.9")
    assert reply is not None and reply.rcode() == dns.rcode.NOERROR
    assert [r.address for rrset in reply.answer for r in rrset] == [db.vip]
    reply = server.answer(dns.message.make_query("db.internal.shoal.", "A"), "10.96.1.9")
    assert reply is not None and [r.address for rrset in reply.answer for r in rrset] == [db.vip]
    assert server.answer(dns.message.make_query("example.org.", "A"), "10.96.1.9") is None
    assert server.answer(dns.message.make_query("db.internal.", "A"), "10.99.0.5") is None


def test_a_build_step_on_the_task_bridge_sees_the_names_a_default_network_task_does(
        tmp_path: Path) -> None:
    """The node's DNS server (Mesh._dns_lookup_from) asked from an address of this node's
    task subnet that no task of the state has — an `image build` RUN step (node/buildnet.py),
    or a task whose address the state does not show yet — answers as to a task of the
    default network: not the names of services on other networks (db, on the overlay
    network back, internal or not), which the node itself (the gateway: its own queries,
    host-network tasks and RUNs) and a client outside any subnet still get."""
    from shoal.node.mesh import Mesh
    from shoal.node.network import NodeNetwork

    db, web = service("db", "back"), service("web")  # (web: the default network)
    s = state((db, [task("d1", db, back="10.96.1.2")]), (web, [task("w1", web)]))
    mesh = Mesh(tmp_path, "n1", "10.77.0.11", snapshot=lambda: s, is_ready=lambda: True,
                live_tasks=lambda: ())
    mesh.network = NodeNetwork(tmp_path, "10.99.0.0/24", "10.99.0.0/16")
    mesh._snap = s
    assert mesh._dns_lookup_from("db", "10.99.0.5") is None  # w1, a default-network task
    assert mesh._dns_lookup_from("web", "10.99.0.5") == [web.vip]
    for run_step in ("10.99.0.77", "10.99.0.254"):  # (no task has it)
        assert mesh._dns_lookup_from("db", run_step) is None, run_step
        assert mesh._dns_lookup_from("tasks.db", run_step) is None, run_step
        assert mesh._dns_lookup_from("web", run_step) == [web.vip], run_step
    assert mesh._dns_lookup_from("db", "10.99.0.1") == [db.vip]  # the node (its gateway)
    assert mesh._dns_lookup_from("db", "10.96.1.2") == [db.vip]  # d1 itself, on back
