"""Service discovery: the node's DNS server for its tasks.

Owns: answering tasks' DNS queries on the node's task bridge address. ``SERVICE`` and
``SERVICE.shoal`` resolve to the service's virtual IP (served by the node's balancer,
stable across task restarts); ``tasks.SERVICE[.shoal]`` resolves to the addresses of its
running tasks (Swarm's ``tasks.`` name); a task of a stack also resolves the stack's other
services by their short names (``web`` for ``STACK_web``, before any service named ``web``);
a service's network aliases (``ALIAS``, ``tasks.ALIAS``, dotted too) answer as its name;
with ``lookup_from`` the answer may depend on the asking task (service names and aliases
resolve only on networks it shares with the service). Other names are forwarded to the
host's upstream resolvers (from /etc/resolv.conf), so tasks reach the outside by name
too — or to the asking task's own servers (``upstreams_for``: Docker's ``--dns``, which
moby's embedded resolver likewise uses as its upstreams) — not for a task whose networks
are all internal (``forwards``: REFUSED, whatever its own servers), and at most
MAX_FORWARDS at once (SERVFAIL past that). UDP answers fit the asker's size (512 bytes, or
its EDNS payload), else they are cut with the TC flag and the asker retries over TCP,
served on the same address and port (as Docker's resolver). Wire format by dnspython,
imported at the first query (an idle agent does not hold it); a malformed query is dropped
and counted, never raised.

Must not touch: the store (it gets a ``lookup`` function from the agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # dnspython (~2.6 MiB) is imported at the first query, inside the methods:
    import dns.message  # an agent whose tasks never ask for a name never loads it
    import dns.rcode

log = logging.getLogger("shoal.dns")

DOMAIN = "shoal"
Lookup = Callable[[str], list[str] | None]  # name (lower-case, no trailing dot) → IPs
# (name, the asking task's address) → IPs: names that depend on who asks (a stack's short
# service names, node/mesh.py ``stack_lookup``); None = not such a name, ask ``Lookup``.
ScopedLookup = Callable[[str, str], list[str] | None]
# (name, the asking client's IP) → IPs: answers that depend on who asks (the networks a
# task shares with a service, node/mesh.py)
LookupFrom = Callable[[str, str], list[str] | None]
# the asking client's IP → whether its other names may go upstream (node/mesh.py)
Forwards = Callable[[str], bool]
# the asking client's IP → the resolvers its other names go to ("IP" or "IP:PORT": a task's
# own, Docker's --dns; node/mesh.py); None or empty = the node's ``upstreams``
UpstreamsFor = Callable[[str], list[str] | None]
MAX_FORWARDS = 1024  # upstream queries in flight at once (moby's resolver: 1024 too)
# ... of one asker: a task whose own --dns server never answers cannot take every slot of
# its node (moby runs a resolver per container, so one cannot starve another)
MAX_FORWARDS_PER_CLIENT = 64
FORWARD_DEADLINE = 5.0  # seconds for one forward over all servers (a resolver asks again)
UDP_SIZE = 512  # an answer's size over UDP when the query has no EDNS (RFC 1035)
TCP_IDLE = 10.0  # seconds a TCP client may keep its connection without a query
MAX_TCP = 256  # TCP clients at once (more are closed at once: tasks cannot hold them all)


@dataclass
class DnsConfig:
    # TTL of answers for service names, seconds. Short: tasks move.
    ttl: int = 5
    # Upstream resolvers ("IP" or "IP:PORT") for other names; None = the host's
    # /etc/resolv.conf.
    upstreams: list[str] | None = None
    # Seconds to wait for an upstream answer before giving up (the task retries).
    upstream_timeout: float = 2.0
    stats: dict[str, int] = field(default_factory=dict)


def host_search(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's search domains (its last ``search`` or ``domain`` line, as the resolver
    reads it), which a task's resolv.conf lists after shoal's own (as Docker copies them):
    short names of the host's network resolve in tasks as on the host."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("search", "domain"):
                out = [d.rstrip(".") for d in parts[1:] if d.rstrip(".")]
    return [d for d in dict.fromkeys(out) if d != DOMAIN]


def host_options(path: str = "/etc/resolv.conf") -> list[str]:
    """The host's resolver options (every ``options`` line), which a task that names its
    own servers directly keeps unless it gives its own (as Docker copies them)."""
    out: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "options":
                out += parts[1:]
    return out


def host_upstreams(path: str = "/etc/resolv.conf") -> list[str]:
    out = []
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver":
                out.append(parts[1])
    return out


class DnsServer(asyncio.DatagramProtocol):
    def __init__(self, lookup: Lookup, config: DnsConfig | None = None,
                 scoped: ScopedLookup | None = None,
                 lookup_from: LookupFrom | None = None,
                 forwards: Forwards | None = None,
                 upstreams_for: UpstreamsFor | None = None) -> None:
        self.lookup = lookup
        self.scoped = scoped
        self.lookup_from = lookup_from  # used instead of ``lookup`` when set
        self.forwards = forwards
        self.upstreams_for = upstreams_for  # an asker's own upstreams, else ``upstreams``
        self.config = config or DnsConfig()
        self.upstreams = (self.config.upstreams if self.config.upstreams is not None
                          else host_upstreams())
        self.stats = self.config.stats
        self.transport: asyncio.DatagramTransport | None = None
        self.tcp: asyncio.Server | None = None
        self._tcp_clients = 0
        self._pending: set[asyncio.Future[None]] = set()
        self._per_client: dict[str, int] = {}  # forwards in flight by asker

    def close_tcp(self) -> None:
        if self.tcp is not None:
            self.tcp.close()
            self.tcp = None

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.close_tcp()  # (closing the UDP transport closes the server)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        query = self._parse(data)
        if query is None:
            return
        reply = self.answer(query, addr[0])
        if reply is not None:
            limit = max(UDP_SIZE, query.payload) if query.edns >= 0 else UDP_SIZE
            self._send(fitted(reply, limit), addr)
            return
        refused = self._refuse_forward(query, addr[0])
        if refused is not None:
            self._send(refused.to_wire(), addr)
            return
        task = asyncio.ensure_future(self._forward(data, addr, query))
        self._pending.add(task)
        client = addr[0]
        self._per_client[client] = self._per_client.get(client, 0) + 1

        def done(t: asyncio.Future[None]) -> None:
            self._pending.discard(t)
            left = self._per_client.pop(client, 1) - 1
            if left:
                self._per_client[client] = left
        task.add_done_callback(done)

    def _parse(self, data: bytes) -> dns.message.Message | None:
        import dns.exception  # (dnspython at the first query: see the imports above)
        import dns.message
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, IndexError):
            self._count("malformed")
            return None
        if not query.question:
            self._count("malformed")
            return None
        return query

    def _refuse_forward(self, query: dns.message.Message,
                        client: str) -> dns.message.Message | None:
        """The reply instead of forwarding ``query`` upstream, or None to forward it."""
        import dns.rcode  # (dnspython at the first query: see the imports above)
        if self.forwards is not None and not self.forwards(client):
            self._count("refused")  # (an internal network's task: no way out, not even DNS)
            return _error(query, dns.rcode.REFUSED)
        if len(self._pending) >= MAX_FORWARDS or \
                self._per_client.get(client, 0) >= MAX_FORWARDS_PER_CLIENT:
            self._count("servfail")
            return _error(query, dns.rcode.SERVFAIL)
        return None

    async def handle_tcp(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        """DNS over TCP (RFC 7766): each message after its 2-byte length; the whole answer
        (a client comes here after a truncated UDP one)."""
        peer = writer.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else ""
        if self._tcp_clients >= MAX_TCP:
            self._count("tcp_refused")
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                async with asyncio.timeout(TCP_IDLE):
                    size = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(size)
                query = self._parse(data)
                if query is None:
                    return
                reply = self.answer(query, client)
                if reply is not None:
                    wire: bytes | None = reply.to_wire()
                else:
                    refused = self._refuse_forward(query, client)
                    wire = refused.to_wire() if refused is not None else \
                        await self._ask_upstreams(data, query, client, tcp=True)
                assert wire is not None
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            self._count("tcp_closed")  # (the client went away or idled past TCP_IDLE)
        finally:
            self._tcp_clients -= 1
            writer.close()

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def answer(self, query: dns.message.Message,
               client: str = "") -> dns.message.Message | None:
        """The reply for names shoal owns, or None to forward upstream. ``client``: the
        asking task's address (for names that depend on who asks: a stack's ``web``, the
        networks it shares with a service)."""
        import dns.flags  # (dnspython at the first query: see the imports above)
        import dns.message
        import dns.rcode
        import dns.rdataclass
        import dns.rdatatype
        import dns.rrset
        q = query.question[0]
        name = q.name.to_text().rstrip(".").lower()
        short = name[: -len(DOMAIN) - 1] if name.endswith("." + DOMAIN) else name
        # a service's name, tasks.NAME (and a stack's short names) have no other dot; a
        # network alias may (db.internal): the lookup answers None for what is not ours
        plain = "." not in short or short.startswith("tasks.")
        ips = self.scoped(short, client) if plain and client and self.scoped else None
        if ips is None:
            ips = self.lookup_from(short, client) if self.lookup_from is not None else \
                self.lookup(short)
        owned = name.endswith("." + DOMAIN) or name == DOMAIN
        if ips is None and not owned:
            return None
        reply = dns.message.make_response(query)
        reply.flags |= dns.flags.AA
        if ips is None:
            reply.set_rcode(dns.rcode.NXDOMAIN)
            self._count("nxdomain")
            return reply
        if q.rdtype in (dns.rdatatype.A, dns.rdatatype.ANY) and ips:
            rrset = dns.rrset.from_text_list(q.name, self.config.ttl, dns.rdataclass.IN,
                                             dns.rdatatype.A, ips)
            reply.answer.append(rrset)
        self._count("answered")
        return reply

    async def _forward(self, data: bytes, addr: tuple[str, int],
                       query: dns.message.Message) -> None:
        self._send(await self._ask_upstreams(data, query, addr[0]), addr)

    async def _ask_upstreams(self, data: bytes, query: dns.message.Message,
                             client: str = "", tcp: bool = False) -> bytes:
        """An upstream's reply to ``data`` (each upstream in turn: ``client``'s own if it
        has any, else the node's; over TCP for a query that came over TCP, so a reply too
        big for UDP arrives whole), or SERVFAIL — within ``FORWARD_DEADLINE`` in all."""
        own = self.upstreams_for(client) if self.upstreams_for is not None and client \
            else None
        try:
            async with asyncio.timeout(FORWARD_DEADLINE):
                for upstream in own or self.upstreams:
                    host, _, port = upstream.rpartition(":") if upstream.count(":") == 1 \
                        else (upstream, "", "53")
                    try:
                        ask = _ask_tcp if tcp else _ask_udp
                        reply = await asyncio.wait_for(ask(data, host, int(port)),
                                                       self.config.upstream_timeout)
                    except (OSError, TimeoutError, asyncio.IncompleteReadError):
                        continue
                    self._count("forwarded")
                    return reply
        except TimeoutError:
            log.debug("no upstream of %s answered within %gs", client or "the node",
                      FORWARD_DEADLINE)
        import dns.rcode  # (dnspython at the first query: see the imports above)
        self._count("servfail")
        return _error(query, dns.rcode.SERVFAIL).to_wire()


async def _ask_udp(data: bytes, host: str, port: int) -> bytes:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        functools.partial(_Reply, fut), remote_addr=(host, port))
    try:
        transport.sendto(data)
        return await fut
    finally:
        transport.close()


async def _ask_tcp(data: bytes, host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        size = int.from_bytes(await reader.readexactly(2), "big")
        return await reader.readexactly(size)
    finally:
        writer.close()


def _error(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    import dns.message  # (dnspython at the first query: see the imports above)
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    return reply


def fitted(reply: dns.message.Message, limit: int) -> bytes:
    """``reply`` on the wire within ``limit`` bytes: whole if it fits, else with as many
    answer records as fit and the TC flag (the asker retries over TCP)."""
    import dns.exception  # (dnspython at the first query: see the imports above)
    import dns.flags
    import dns.rrset
    with contextlib.suppress(dns.exception.TooBig):  # (too big: cut below)
        return reply.to_wire(max_size=limit)
    reply.flags |= dns.flags.TC
    answers = [(rrset, list(rrset)) for rrset in reply.answer]
    reply.answer = []
    wire = reply.to_wire(max_size=limit)  # (the header and question alone always fit)
    for rrset, items in answers:
        for n in range(len(items), 0, -1):  # (a few dozen at most: one A record each)
            cut = dns.rrset.from_rdata_list(rrset.name, rrset.ttl, items[:n])
            reply.answer.append(cut)
            try:
                wire = reply.to_wire(max_size=limit)
                break
            except dns.exception.TooBig:
                reply.answer.pop()
        else:
            break
    return wire


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future[bytes]) -> None:
        self.fut = fut

    def datagram_received(self, data: bytes, _addr: tuple[str, int]) -> None:
        if not self.fut.done():
            self.fut.set_result(data)


async def serve(lookup: Lookup, host: str, port: int = 53,
                config: DnsConfig | None = None, scoped: ScopedLookup | None = None,
                lookup_from: LookupFrom | None = None, forwards: Forwards | None = None,
                upstreams_for: UpstreamsFor | None = None
                ) -> tuple[asyncio.DatagramTransport, DnsServer]:
    """The server on UDP and TCP ``host:port`` (``server.tcp``: the TCP listener; closing
    the returned UDP transport closes both)."""
    loop = asyncio.get_running_loop()
    server = DnsServer(lookup, config, scoped, lookup_from, forwards, upstreams_for)
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=(host, port))
    try:  # (TCP on the port UDP got: port 0 picks one)
        server.tcp = await asyncio.start_server(server.handle_tcp, host,
                                                transport.get_extra_info("sockname")[1])
    except BaseException:
        transport.close()
        raise
    return transport, server
