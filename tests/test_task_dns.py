"""A task's own DNS settings, Docker's ``--dns``, ``--dns-search``, ``--dns-option`` (Compose's
``dns``, ``dns_search``, ``dns_opt``): the spec's checks, the CLI's create and update flags,
Compose, the resolv.conf each task gets (node/mesh.py ``resolv_conf``) and the resolvers the
node's DNS server forwards each asker's other names to (``task_upstreams``, node/dns.py
``upstreams_for``). No network but loopback."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.message
import dns.rcode
import dns.rrset
import pytest
from test_dns import ask, ips

from shoal.cli import specflags
from shoal.cli.compose import ComposeError, load_stack
from shoal.cli.main import build_parser
from shoal.node.dns import DnsConfig, host_options, serve
from shoal.node.mesh import HostResolv, forwards_for, resolv_conf, task_upstreams
from shoal.raft.errors import ValidationError
from shoal.raft.models import Network, Service, Task, TaskState, TaskStatus, to_dict
from shoal.raft.schema import encode_command
from shoal.raft.spec import TaskSpec
from shoal.raft.state import ClusterInfo, Snapshot
from shoal.raft.validate import validate_spec

HOST = HostResolv(servers=("10.255.0.53",), search=("corp.lan",), options=("edns0",))


def spec_with(**container: object) -> dict[str, object]:
    return {"name": "web", "task": {"container": {"command": ["x"], **container}}}


def task_spec(network_mode: str = "default", **container: object) -> TaskSpec:
    s = spec_with(**container)
    s["task"]["network_mode"] = network_mode  # type: ignore[index]
    return validate_spec(s).task


@pytest.mark.parametrize(("field", "value", "says"), [
    ("dns", ["10.0.0.999"], "not an IP address"),
    ("dns", ["dns.example"], "not an IP address"),
    ("dns", ["10.0.0.1"] * 9, "length <= 8"),
    ("dns_search", ["bad domain"], "not a domain name"),
    ("dns_search", ["-corp.example"], "not a domain name"),
    ("dns_options", ["ndots:2; rm -rf"], "not a resolv.conf option"),
    ("dns_options", ["\nnameserver 1.2.3.4"], "not a resolv.conf option"),
])
def test_bad_dns_settings_are_refused_naming_the_field(field: str, value: list[str],
                                                       says: str) -> None:
    """A value that would not be an address, a domain or one option word (a newline would
    write another resolv.conf line) is refused, and the error names the field."""
    with pytest.raises(ValidationError) as exc:
        validate_spec(spec_with(**{field: value}))
    assert exc.value.field == f"task.container.{field}" and says in exc.value.message


def test_good_dns_settings_are_kept_as_given() -> None:
    c = validate_spec(spec_with(dns=["10.0.0.2", "2001:db8::53"],
                                dns_search=["corp.example", "lab.example.", "."],
                                dns_options=["ndots:3", "timeout:1", "use-vc", "edns0"])
                      ).task.container
    assert c.dns == ("10.0.0.2", "2001:db8::53")
    assert c.dns_search == ("corp.example", "lab.example.", ".")
    assert c.dns_options == ("ndots:3", "timeout:1", "use-vc", "edns0")


def test_the_dns_fields_wait_for_cluster_schema_7() -> None:
    """A schema-6 node's strict decoder would refuse the new keys: a spec using one is refused
    naming it until every node reads schema 7; one leaving them empty is written without."""
    for field, value in (("dns", ["10.0.0.2"]), ("dns_search", ["corp.example"]),
                         ("dns_options", ["ndots:2"])):
        cmd = {"op": "service_create", "id": "s1", "now": 1.0,
               "spec": spec_with(**{field: value})}
        with pytest.raises(ValidationError) as exc:
            encode_command(cmd, {}, 6)
        assert exc.value.field == f"task.container.{field}" and "schema 7" in exc.value.message
        assert encode_command(cmd, {}, 7) == cmd
    plain = {"op": "service_create", "id": "s2", "now": 1.0,
             "spec": to_dict(validate_spec(spec_with()))}
    assert "dns" not in encode_command(plain, {}, 6)["spec"]["task"]["container"]


def test_dockers_dns_flags_on_create_and_update() -> None:
    """`service create --dns --dns-search --dns-option` (repeatable) and `service update
    --dns-add/--dns-rm`, `--dns-search-add/-rm`, `--dns-option-add/-rm`, as docker's."""
    p = build_parser()
    args = p.parse_args(["service", "create", "--name", "web", "--dns", "10.0.0.2", "--dns",
                         "10.0.0.3", "--dns-search", "corp.example", "--dns-option",
                         "ndots:3", "--dns-option", "timeout:1", "--", "sleep", "9"])
    spec = validate_spec(specflags.spec_from_create_args(args))
    c = spec.task.container
    assert c.dns == ("10.0.0.2", "10.0.0.3") and c.dns_search == ("corp.example",)
    assert c.dns_options == ("ndots:3", "timeout:1")
    args = p.parse_args(["service", "update", "--dns-rm", "10.0.0.2", "--dns-add", "::1",
                         "--dns-search-rm", "corp.example", "--dns-search-add", "lab.example",
                         "--dns-option-rm", "timeout:1", "--dns-option-add", "rotate", "web"])
    new = validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container
    assert new.dns == ("10.0.0.3", "::1") and new.dns_search == ("lab.example",)
    assert new.dns_options == ("ndots:3", "rotate")
    args = p.parse_args(["service", "update", "--replicas", "2", "web"])  # (left as they are)
    same = validate_spec(specflags.apply_update_args(to_dict(spec), args)).task.container
    assert (same.dns, same.dns_search, same.dns_options) == (c.dns, c.dns_search,
                                                             c.dns_options)


def test_compose_dns_dns_search_and_dns_opt_as_a_string_or_a_list(tmp_path: Path) -> None:
    stack = load_stack("app", [_write(tmp_path, """
services:
  one:
    image: busybox
    dns: 10.0.0.2
    dns_search: corp.example
    dns_opt: ndots:2
  many:
    image: busybox
    dns: [10.0.0.2, "2001:db8::53"]
    dns_search: [corp.example, lab.example]
    dns_opt: [ndots:3, use-vc]
""")], {})
    one, many = (next(s for s in stack.services if s.name == f"app_{k}").task.container
                 for k in ("one", "many"))
    assert (one.dns, one.dns_search, one.dns_options) == (("10.0.0.2",), ("corp.example",),
                                                          ("ndots:2",))
    assert many.dns == ("10.0.0.2", "2001:db8::53") and many.dns_options == ("ndots:3",
                                                                             "use-vc")
    assert not any("dns" in str(w) for w in stack.warnings)  # (no longer "not yet")
    with pytest.raises(ComposeError) as exc:
        load_stack("app", [_write(tmp_path, "services:\n  bad:\n    image: busybox\n"
                                  "    dns: [nameserver.example]\n")], {})
    assert "services.bad.dns" in str(exc.value), exc.value


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "compose.yml"
    p.write_text(text)
    return p


def test_each_task_gets_its_own_resolv_conf() -> None:
    """The node's DNS server stays the nameserver (service names resolve); shoal's domain
    first in the search list, then the task's domains instead of the host's; the task's
    options, its ndots winning over shoal's ndots:1."""
    assert resolv_conf(TaskSpec(), "10.99.0.1", HOST) == (
        "nameserver 10.99.0.1\nsearch shoal corp.lan\noptions ndots:1\n")
    mine = task_spec(dns=["10.0.0.2"], dns_search=["corp.example", "lab.example."],
                     dns_options=["ndots:3", "timeout:1"])
    assert resolv_conf(mine, "10.99.0.1", HOST) == (
        "nameserver 10.99.0.1\nsearch shoal corp.example lab.example\n"
        "options ndots:3 timeout:1\n")
    assert resolv_conf(task_spec(dns_options=["edns0"], dns_search=["."]), "10.99.0.1",
                       HOST) == "nameserver 10.99.0.1\nsearch shoal\noptions ndots:1 edns0\n"


def test_without_the_nodes_dns_server_the_tasks_servers_are_named_directly() -> None:
    """On the host's network with --dns, or on a node without its DNS server (dns_port 0),
    Docker's: the task's servers in its resolv.conf, no shoal domain; the host's servers,
    domains and options where it gives none; nothing written when it gives no setting."""
    mine = task_spec("host", dns=["10.0.0.2", "10.0.0.3"], dns_options=["rotate"])
    assert resolv_conf(mine, "10.99.0.1", HOST) == (
        "nameserver 10.0.0.2\nnameserver 10.0.0.3\nsearch corp.lan\noptions rotate\n")
    assert resolv_conf(task_spec(dns_search=["corp.example"]), "", HOST) == (
        "nameserver 10.255.0.53\nsearch corp.example\noptions edns0\n")
    assert resolv_conf(task_spec(), "", HOST) is None
    local = HostResolv(servers=("127.0.0.53", "10.255.0.53"))  # (systemd-resolved's stub)
    assert resolv_conf(task_spec(dns_options=["rotate"]), "", local) == (
        "nameserver 10.255.0.53\noptions rotate\n")
    # on the host's network without --dns: the node's DNS server still answers it
    assert str(resolv_conf(task_spec("host", dns_search=["corp.example"]), "10.99.0.1",
                           HOST)).startswith("nameserver 10.99.0.1\nsearch shoal corp.example\n")


def test_host_options_are_read_from_every_options_line(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.0.0.2\noptions edns0 trust-ad\noptions ndots:2\n")
    assert host_options(str(conf)) == ["edns0", "trust-ad", "ndots:2"]
    assert HostResolv.read(str(conf)) == HostResolv(("10.0.0.2",), (), ("edns0", "trust-ad",
                                                                        "ndots:2"))
    assert host_options(str(tmp_path / "missing")) == []


FRONT = Network(id="nf", name="front", subnet="10.96.0.0/24", gateway="10.96.0.1", vni=4096)
BACK = Network(id="nb", name="back", subnet="10.96.1.0/24", gateway="10.96.1.1", vni=4097,
               internal=True)


def _world() -> Snapshot:
    def service(sid: str, networks: list[str], mode: str = "default",
                **container: object) -> Service:
        s = spec_with(**container)
        s["name"] = sid
        s["task"].update(networks=networks, network_mode=mode)  # type: ignore[attr-defined]
        return Service(id=sid, spec=validate_spec(s))

    def task(tid: str, svc: Service, addr: str, state: TaskState = TaskState.RUNNING,
             **net_addrs: str) -> Task:
        return Task(id=tid, service_id=svc.id, service_name=svc.spec.name, slot=1,
                    spec=svc.spec.task, service_version=1, node_id="n1",
                    status=TaskStatus(state=state, addr=addr), net_addrs=dict(net_addrs))

    own = service("own", [], dns=["10.0.0.2", "10.0.0.3"])
    plain = service("plain", [])
    front = service("front", ["front"], dns=["2001:db8::53"])
    inner = service("inner", ["back"], dns=["10.0.0.2"])
    host = service("hostnet", [], "host", dns=["10.0.0.9"])
    svcs = (own, plain, front, inner, host)
    tasks = [task("t1", own, "10.99.0.2"), task("t2", plain, "10.99.0.3"),
             task("t3", front, "10.96.0.2", front="10.96.0.2"),
             task("t4", inner, "10.96.1.2", back="10.96.1.2"),
             task("t5", host, "10.77.0.11"),
             task("t6", own, "10.99.0.9", TaskState.FAILED)]
    return Snapshot(index=1, cluster=ClusterInfo(), nodes={},
                    services={s.id: s for s in svcs}, tasks={t.id: t for t in tasks},
                    networks={"nf": FRONT, "nb": BACK})


def test_the_asking_tasks_own_servers_are_its_upstreams() -> None:
    """The node's DNS server finds the asker by its source address: a task with --dns gets
    its other names forwarded to its servers; a task without, a task that ended (its address
    may be anyone's now), the node itself and a host-network task (its address is the
    node's) get the node's upstreams."""
    s = _world()
    assert task_upstreams(s, "10.99.0.2") == ["10.0.0.2", "10.0.0.3"]
    assert task_upstreams(s, "10.96.0.2") == ["2001:db8::53"]  # by its network address
    assert task_upstreams(s, "10.99.0.3") is None
    assert task_upstreams(s, "10.99.0.9") is None
    assert task_upstreams(s, "10.77.0.11") is None
    assert task_upstreams(s, "10.99.0.1") is None and task_upstreams(s, "") is None


def test_an_internal_networks_task_is_not_forwarded_whatever_its_servers() -> None:
    """--dns gives no way out: a task on internal networks only is refused before any
    upstream is chosen (CVE-2024-29018's shape)."""
    s = _world()
    assert task_upstreams(s, "10.96.1.2") == ["10.0.0.2"]
    assert forwards_for(s, "10.96.1.2") is False
    assert forwards_for(s, "10.99.0.2") is True


class _Upstream(asyncio.DatagramProtocol):
    """A resolver on loopback that answers every A query with one address."""

    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        self.asked.append(q.question[0].name.to_text())
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 5, "IN", "A", self.answer))
        self.t.sendto(r.to_wire(), addr)  # type: ignore[attr-defined]


async def test_the_dns_server_forwards_to_the_askers_own_upstreams() -> None:
    """An asker with its own servers gets their answer for an outside name, over UDP and
    TCP (forwarded over TCP); an asker without (or when the callback has none) gets the
    node's upstream's; shoal's own names are answered by the node either way; a refused
    asker stays refused."""
    loop = asyncio.get_running_loop()
    node_t, node_up = await loop.create_datagram_endpoint(lambda: _Upstream("192.0.2.1"),
                                                          local_addr=("127.0.0.1", 0))
    own_t, own_up = await loop.create_datagram_endpoint(lambda: _Upstream("198.51.100.7"),
                                                        local_addr=("127.0.0.1", 0))
    own_port = own_t.get_extra_info('sockname')[1]
    over_tcp: list[str] = []

    async def tcp_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        q = dns.message.from_wire(await reader.readexactly(
            int.from_bytes(await reader.readexactly(2), "big")))
        over_tcp.append(q.question[0].name.to_text())
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 5, "IN", "A", "198.51.100.8"))
        wire = r.to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.close()
    tcp_up = await asyncio.start_server(tcp_upstream, "127.0.0.1", own_port)
    own = [f"127.0.0.1:{own_port}"]
    chosen: dict[str, list[str] | None] = {"127.0.0.1": own}
    t, server = await serve({"web": ["10.98.0.1"]}.get, "127.0.0.1", 0,
                            DnsConfig(upstreams=[
                                f"127.0.0.1:{node_t.get_extra_info('sockname')[1]}"]),
                            upstreams_for=lambda client: chosen.get(client))
    port = t.get_extra_info("sockname")[1]
    try:
        assert ips(await ask(port, "outside.example")) == ["198.51.100.7"]
        assert own_up.asked == ["outside.example."] and node_up.asked == []
        assert ips(await ask(port, "web")) == ["10.98.0.1"]  # (not forwarded at all)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        wire = dns.message.make_query("tcp.example", "A").to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        size = int.from_bytes(await reader.readexactly(2), "big")
        # (a query that came over TCP goes upstream over TCP: a reply too big for UDP whole)
        assert ips(dns.message.from_wire(await reader.readexactly(size))) == ["198.51.100.8"]
        assert over_tcp == ["tcp.example."] and "tcp.example." not in own_up.asked
        writer.close()
        chosen["127.0.0.1"] = None
        assert ips(await ask(port, "outside.example")) == ["192.0.2.1"]
        assert node_up.asked == ["outside.example."]
        server.forwards = lambda client: False
        chosen["127.0.0.1"] = own
        r = await ask(port, "leak.example")
        assert r is not None and r.rcode() == dns.rcode.REFUSED
        assert "leak.example." not in own_up.asked
    finally:
        t.close()
        node_t.close()
        own_t.close()
        tcp_up.close()


async def test_one_asker_whose_servers_never_answer_cannot_starve_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's own --dns server that never answers: its forwards are capped per asker (64;
    4 here) and each gives up after FORWARD_DEADLINE over all its servers, so another task
    on the node is still answered (the node-wide 1,024 were all one task's before)."""
    import socket

    from shoal.node import dns as dns_mod
    monkeypatch.setattr(dns_mod, "MAX_FORWARDS_PER_CLIENT", 4)
    monkeypatch.setattr(dns_mod, "FORWARD_DEADLINE", 0.5)
    loop = asyncio.get_running_loop()
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # (takes queries, answers none)
    silent.bind(("127.0.0.1", 0))
    node_t, _ = await loop.create_datagram_endpoint(lambda: _Upstream("192.0.2.1"),
                                                          local_addr=("127.0.0.1", 0))
    dead = [f"127.0.0.1:{silent.getsockname()[1]}"] * 8
    t, server = await serve({}.get, "127.0.0.1", 0, DnsConfig(upstreams=[
        f"127.0.0.1:{node_t.get_extra_info('sockname')[1]}"], upstream_timeout=2.0),
        upstreams_for=lambda client: dead if client == "127.0.0.2" else None)
    port = t.get_extra_info("sockname")[1]
    flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flood.bind(("127.0.0.2", 0))
    try:
        for i in range(50):
            flood.sendto(dns.message.make_query(f"q{i}.example", "A").to_wire(),
                         ("127.0.0.1", port))
        await asyncio.sleep(0.1)
        assert len(server._pending) == 4  # (the rest SERVFAIL at once)
        assert ips(await ask(port, "other.example")) == ["192.0.2.1"]  # another asker
        await asyncio.sleep(0.6)
        assert not server._pending  # (each gave up within the deadline, not 8 x 2 s)
    finally:
        t.close()
        node_t.close()
        silent.close()
        flood.close()
