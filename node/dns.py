"""Service discovery: the node's DNS server for its tasks.

Owns: answering tasks' DNS queries on the node's task bridge address. ``SERVICE`` and
``SERVICE.shoal`` resolve to the service's virtual IP (served by the node's balancer,
stable across task restarts); ``tasks.SERVICE[.shoal]`` resolves to the addresses of its
running tasks (Swarm's ``tasks.`` name); a task of a stack also resolves the stack's other
services by their short names (``web`` for ``STACK_web``, before any service named ``web``);
with ``lookup_from`` the answer may depend on the asking task (service names resolve only on
networks it shares with the service). Other names are forwarded to the host's upstream
resolvers (from /etc/resolv.conf), so tasks
reach the outside by name too. Wire format by
dnspython; a malformed query is dropped and counted, never raised.

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

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

log = logging.getLogger("shoal.dns")

DOMAIN = "shoal"
Lookup = Callable[[str], list[str] | None]  # name (lower-case, no trailing dot) → IPs
# (name, the asking task's address) → IPs: names that depend on who asks (a stack's short
# service names, node/mesh.py ``stack_lookup``); None = not such a name, ask ``Lookup``.
ScopedLookup = Callable[[str, str], list[str] | None]
# (name, the asking client's IP) → IPs: answers that depend on who asks (the networks a
# task shares with a service, node/mesh.py)
LookupFrom = Callable[[str, str], list[str] | None]


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
                 lookup_from: LookupFrom | None = None) -> None:
        self.lookup = lookup
        self.scoped = scoped
        self.lookup_from = lookup_from  # used instead of ``lookup`` when set
        self.config = config or DnsConfig()
        self.upstreams = (self.config.upstreams if self.config.upstreams is not None
                          else host_upstreams())
        self.stats = self.config.stats
        self.transport: asyncio.DatagramTransport | None = None
        self._pending: set[asyncio.Future[None]] = set()

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, IndexError):
            self._count("malformed")
            return
        if not query.question:
            self._count("malformed")
            return
        reply = self.answer(query, addr[0])
        if reply is not None:
            self._send(reply.to_wire(), addr)
        else:
            task = asyncio.ensure_future(self._forward(data, addr, query))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    def _send(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None:
            self.transport.sendto(data, addr)

    def answer(self, query: dns.message.Message,
               client: str = "") -> dns.message.Message | None:
        """The reply for names shoal owns, or None to forward upstream. ``client``: the
        asking task's address (for names that depend on who asks: a stack's ``web``, the
        networks it shares with a service)."""
        q = query.question[0]
        name = q.name.to_text().rstrip(".").lower()
        short = name[: -len(DOMAIN) - 1] if name.endswith("." + DOMAIN) else name
        ours = "." not in short or short.startswith("tasks.")
        ips = self.scoped(short, client) if ours and client and self.scoped else None
        if ips is None and ours:
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
        loop = asyncio.get_running_loop()
        for upstream in self.upstreams:
            host, _, port = upstream.rpartition(":") if upstream.count(":") == 1 else \
                (upstream, "", "53")
            fut: asyncio.Future[bytes] = loop.create_future()
            transport = None
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    functools.partial(_Reply, fut), remote_addr=(host, int(port)))
                transport.sendto(data)
                reply = await asyncio.wait_for(fut, self.config.upstream_timeout)
                self._count("forwarded")
                self._send(reply, addr)
                return
            except (OSError, TimeoutError):
                continue
            finally:
                if transport is not None:
                    transport.close()
        fail = dns.message.make_response(query)
        fail.set_rcode(dns.rcode.SERVFAIL)
        self._count("servfail")
        self._send(fail.to_wire(), addr)


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, fut: asyncio.Future[bytes]) -> None:
        self.fut = fut

    def datagram_received(self, data: bytes, _addr: tuple[str, int]) -> None:
        if not self.fut.done():
            self.fut.set_result(data)


async def serve(lookup: Lookup, host: str, port: int = 53,
                config: DnsConfig | None = None, scoped: ScopedLookup | None = None,
                lookup_from: LookupFrom | None = None
                ) -> tuple[asyncio.DatagramTransport, DnsServer]:
    loop = asyncio.get_running_loop()
    server = DnsServer(lookup, config, scoped, lookup_from)
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=(host, port))
    return transport, server
