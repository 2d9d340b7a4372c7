"""Bytes through the balancer (shoal.lb): counted per service and per backend, both ways, for
both TCP engines (asyncio protocols, splice) and UDP, on a real Balancer with real worker
processes (the fixtures of tests/test_lb.py), and exported on /metrics.

Each test names the behaviour a user of a published port would notice.
"""

from __future__ import annotations

import asyncio
import socket

from helpers import free_port
from prometheus_client.parser import text_string_to_metric_families
from test_lb import (  # noqa: F401  (lb, backends: fixtures)
    HOST,
    Backend,
    Conn,
    UdpBackend,
    backends,
    eventually,
    lb,
    service,
)

from shoal.lb import Balancer, Endpoint, Frontend, Proto, ServiceLB
from shoal.node.events import EventLog
from shoal.node.metrics import Metrics, Sources
from shoal.runtime.testing import FakeController


async def test_tcp_bytes_are_counted_both_ways_per_service_and_backend(
        lb: Balancer, backends: list[Backend]) -> None:  # noqa: F811
    """10 requests of 100 bytes + newline and 10 answers "b0\\n": the balancer reports 1,010
    bytes in and 30 out for the service and for that backend."""
    port = free_port()
    await lb.set_service(service(port, [backends[0].endpoint()]))
    conn = await Conn.open(port)
    try:
        for _ in range(10):
            assert await conn.ask(b"x" * 100) == "b0"
    finally:
        await conn.close()

    async def counted() -> dict[str, int] | None:
        web = (await lb.stats())["services"]["web"]
        ep = web["endpoints"]["b0"]
        got = {"in": web["bytes_in"], "out": web["bytes_out"], "ep_in": ep["bytes_in"],
               "ep_out": ep["bytes_out"]}
        return got if got["in"] == 1010 and got["out"] == 30 else None
    got = await eventually(counted, what="1010 bytes in, 30 out")
    assert got == {"in": 1010, "out": 30, "ep_in": 1010, "ep_out": 30}


async def test_udp_bytes_are_counted_and_exported_on_metrics(lb: Balancer) -> None:  # noqa: F811
    """Three datagrams "q0".."q2" (2 bytes) answered "u0:qN" (5 bytes): 6 in, 15 out, and
    /metrics says so in shoal_lb_bytes_total and shoal_lb_backend_bytes_total."""
    loop = asyncio.get_running_loop()
    udp = UdpBackend("u0")
    transport, _ = await loop.create_datagram_endpoint(lambda: udp, local_addr=(HOST, 0))
    port = free_port(socket.SOCK_DGRAM)
    try:
        await lb.set_service(ServiceLB("dns", target_port=9, frontends=(
            Frontend(port, Proto.UDP),), endpoints=(Endpoint(HOST, "u0", port=udp.port),)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(3)
            for i in range(3):
                s.sendto(f"q{i}".encode(), (HOST, port))
                assert await asyncio.to_thread(s.recv, 2048) == f"u0:q{i}".encode()

        async def counted() -> bool:
            dns = (await lb.stats())["services"]["dns"]
            return dns["bytes_in"] == 6 and dns["bytes_out"] == 15
        await eventually(counted, what="6 bytes in, 15 out")

        metrics = Metrics(Sources(store=lambda: None, runtime=FakeController(),
                                  gossip=lambda: None, balancer=lambda: lb,
                                  events=EventLog()))
        fams = {f.name: f for f in text_string_to_metric_families(
            (await metrics.render()).decode())}
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in fams.values() for s in f.samples}
        assert samples[("shoal_lb_bytes_total", (("direction", "in"), ("service", "dns")))] == 6
        assert samples[("shoal_lb_bytes_total", (("direction", "out"), ("service", "dns")))] \
            == 15
        assert samples[("shoal_lb_backend_bytes_total", (
            ("direction", "out"), ("service", "dns"), ("task", "u0")))] == 15
    finally:
        transport.close()

