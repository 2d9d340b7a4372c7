"""The node's DNS server, over real UDP on loopback (forwarding to a fake upstream that is
itself a real DNS server on loopback)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from shoal.node.dns import DnsConfig, host_search, serve

NAMES = {"web": ["10.98.0.1"], "tasks.web": ["10.99.0.2", "10.99.1.2"]}


async def ask(port: int, name: str, raw: bytes | None = None) -> dns.message.Message | None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()

    class C(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            fut.set_result(data)

    t, _ = await loop.create_datagram_endpoint(C, remote_addr=("127.0.0.1", port))
    try:
        t.sendto(raw if raw is not None else
                 dns.message.make_query(name, dns.rdatatype.A).to_wire())
        try:
            return dns.message.from_wire(await asyncio.wait_for(fut, 2.0))
        except TimeoutError:
            return None
    finally:
        t.close()


def ips(reply: dns.message.Message | None) -> list[str]:
    assert reply is not None
    return sorted(r.address for rrset in reply.answer for r in rrset)


async def test_service_names_resolve_and_others_are_forwarded() -> None:
    class Upstream(asyncio.DatagramProtocol):  # a resolver that knows example.org
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            q = dns.message.from_wire(data)
            r = dns.message.make_response(q)
            r.answer.append(dns.rrset.from_text(q.question[0].name, 5, "IN", "A", "192.0.2.7"))
            self.t.sendto(r.to_wire(), addr)  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    upstream_t, _ = await loop.create_datagram_endpoint(Upstream,
                                                        local_addr=("127.0.0.1", 0))
    up_port = upstream_t.get_extra_info("sockname")[1]
    t, server = await serve(NAMES.get, "127.0.0.1", 0, DnsConfig(upstreams=[]))
    port = t.get_extra_info("sockname")[1]
    try:
        assert ips(await ask(port, "web")) == ["10.98.0.1"]
        assert ips(await ask(port, "web.shoal")) == ["10.98.0.1"]
        assert ips(await ask(port, "tasks.web.shoal")) == ["10.99.0.2", "10.99.1.2"]
        r = await ask(port, "nope.shoal")
        assert r is not None and r.rcode() == dns.rcode.NXDOMAIN
        # malformed packets are dropped and counted, the server keeps answering
        assert await ask(port, "", raw=b"\x00\x01garbage") is None
        assert server.stats["malformed"] == 1
        assert ips(await ask(port, "web")) == ["10.98.0.1"]
        # other names go to the upstream (a second server on loopback)
        server.upstreams = [f"127.0.0.1:{up_port}"]
        assert ips(await ask(port, "example.org")) == ["192.0.2.7"]
        assert server.stats["forwarded"] == 1
    finally:
        t.close()
        upstream_t.close()


async def test_unreachable_upstream_gives_servfail() -> None:
    t, _ = await serve(NAMES.get, "127.0.0.1", 0,
                       DnsConfig(upstreams=["127.0.0.1:9"], upstream_timeout=0.3))
    port = t.get_extra_info("sockname")[1]
    try:
        r = await ask(port, "example.org")  # nothing listens on 127.0.0.1:53
        assert r is not None and r.rcode() == dns.rcode.SERVFAIL
    finally:
        t.close()


async def ask_tcp(port: int, name: str) -> dns.message.Message:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        wire = dns.message.make_query(name, dns.rdatatype.A).to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        size = int.from_bytes(await reader.readexactly(2), "big")
        return dns.message.from_wire(await reader.readexactly(size))
    finally:
        writer.close()


async def test_big_answers_are_cut_with_tc_over_udp_and_whole_over_tcp() -> None:
    """`tasks.SERVICE` of 100 tasks is ~1.6 kB: it went out whole over UDP to resolvers that
    read 512 bytes (musl, Go) and no TCP listened. Now UDP answers fit 512 bytes (or the
    query's EDNS size) with the TC flag when cut, and TCP serves the whole answer."""
    big = [f"10.99.{i // 250}.{i % 250 + 2}" for i in range(100)]
    t, server = await serve({**NAMES, "tasks.big": big}.get, "127.0.0.1", 0,
                            DnsConfig(upstreams=[]))
    port = t.get_extra_info("sockname")[1]
    try:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()

        class C(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                if not fut.done():
                    fut.set_result(data)

        client, _ = await loop.create_datagram_endpoint(C, remote_addr=("127.0.0.1", port))
        client.sendto(dns.message.make_query("tasks.big", dns.rdatatype.A).to_wire())
        raw = await asyncio.wait_for(fut, 2.0)
        client.close()
        cut = dns.message.from_wire(raw)
        assert len(raw) <= 512 and cut.flags & dns.flags.TC
        assert 0 < len(ips(cut)) < 100 and set(ips(cut)) <= set(big)
        # with EDNS (4096 bytes) it fits whole
        fut = loop.create_future()
        client, _ = await loop.create_datagram_endpoint(C, remote_addr=("127.0.0.1", port))
        client.sendto(dns.message.make_query("tasks.big", dns.rdatatype.A, use_edns=0,
                                             payload=4096).to_wire())
        whole = dns.message.from_wire(await asyncio.wait_for(fut, 2.0))
        client.close()
        assert not whole.flags & dns.flags.TC and sorted(ips(whole)) == sorted(big)
        over_tcp = await ask_tcp(port, "tasks.big")
        assert not over_tcp.flags & dns.flags.TC and sorted(ips(over_tcp)) == sorted(big)
        assert ips(await ask_tcp(port, "web")) == ["10.98.0.1"]
    finally:
        t.close()
    await asyncio.sleep(0.01)
    assert server.tcp is None  # (closed with the UDP transport)


async def test_other_names_of_a_task_without_a_way_out_are_refused_not_forwarded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A task on internal networks only may not reach the outside, DNS included (its
    queries were forwarded: a way to send data out); shoal's names still answer. And no more
    than MAX_FORWARDS upstream queries wait at once (one socket each: a task flooding names
    an upstream never answers took the agent to 4,000 open files)."""
    asked: list[str] = []
    t, server = await serve(NAMES.get, "127.0.0.1", 0,
                            DnsConfig(upstreams=["127.0.0.1:9"], upstream_timeout=0.3),
                            forwards=lambda client: asked.append(client) or False)
    port = t.get_extra_info("sockname")[1]
    try:
        r = await ask(port, "secret-data.example.org")
        assert r is not None and r.rcode() == dns.rcode.REFUSED and asked == ["127.0.0.1"]
        assert ips(await ask(port, "web")) == ["10.98.0.1"]
        assert server.stats["refused"] == 1 and "forwarded" not in server.stats
        server.forwards = None
        monkeypatch.setattr("shoal.node.dns.MAX_FORWARDS", 0)
        r = await ask(port, "example.org")
        assert r is not None and r.rcode() == dns.rcode.SERVFAIL
    finally:
        t.close()


def test_tasks_get_the_hosts_search_domains_after_shoals(tmp_path: Path) -> None:
    """Short names of the host's network (`db` for db.corp.example) resolved on the host but
    not in tasks: a task's resolv.conf had `search shoal` alone (Docker copies the host's)."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 10.0.0.2\ndomain old.example\nsearch corp.example. lab.example"
                    " shoal\noptions edns0\n")
    assert host_search(str(conf)) == ["corp.example", "lab.example"]
    conf.write_text("nameserver 10.0.0.2\n")
    assert host_search(str(conf)) == []
    assert host_search(str(tmp_path / "missing")) == []
