"""The balancer (shoal.lb) end to end on loopback: a real Balancer, real worker processes, and
backends that are small asyncio servers answering each line with their own name.

Each test names the behaviour a user of a published port would notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import msgpack
import pytest
import uvloop
from helpers import free_port

from shoal.lb import (
    Algorithm,
    Balancer,
    Config,
    Endpoint,
    Frontend,
    InvalidService,
    PortConflict,
    PortInUse,
    Proto,
    ServiceLB,
)
from shoal.lb.channel import socketpair
from shoal.lb.wire import MessageType, encode

HOST = "127.0.0.1"


# -- helpers ----------------------------------------------------------------------------------


class Backend:
    """A TCP server that answers each line with its name; ``sleep S`` answers after S s."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Backend:
        self.server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while line := await reader.readline():
                if line.startswith(b"sleep "):
                    await asyncio.sleep(float(line.split()[1]))
                writer.write(self.name.encode() + b"\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def endpoint(self) -> Endpoint:
        return Endpoint(HOST, task_id=self.name, port=self.port)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for w in list(self.writers):
            w.close()
        await self.server.wait_closed()


class UdpBackend(asyncio.DatagramProtocol):
    def __init__(self, name: str) -> None:
        self.name = name
        self.transport: asyncio.DatagramTransport | None = None
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        assert self.transport is not None
        self.transport.sendto(self.name.encode() + b":" + data, addr)


class Conn:
    """A client connection through the balancer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection(HOST, port))

    async def ask(self, line: bytes = b"hi", timeout: float = 5.0) -> str:
        self.writer.write(line + b"\n")
        data = await asyncio.wait_for(self.reader.readline(), timeout)
        return data.decode().strip()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def ask_once(port: int, line: bytes = b"hi") -> str:
    conn = await Conn.open(port)
    try:
        return await conn.ask(line)
    finally:
        await conn.close()


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 5.0,
                     what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except (TimeoutError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(params=[False, True], ids=["protocols", "splice"])
async def lb(request: pytest.FixtureRequest) -> AsyncIterator[Balancer]:
    """A started Balancer; each test runs with both TCP engines (asyncio protocols, splice)."""
    balancer = Balancer(Config.local().replace(splice=request.param))
    await balancer.start()
    try:
        yield balancer
    finally:
        await balancer.close()


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [await Backend(f"b{i}").start() for i in range(3)]
    try:
        yield started
    finally:
        for b in started:
            await b.close()


def service(port: int, eps: list[Endpoint], **kw: Any) -> ServiceLB:
    return ServiceLB("web", target_port=9, frontends=(Frontend(port),), endpoints=tuple(eps),
                     **kw)


# -- TCP balancing ----------------------------------------------------------------------------


async def test_round_robin_spreads_connections_evenly_over_all_endpoints(
        lb: Balancer, backends: list[Backend]) -> None:
    port = free_port()
    await lb.set_service(service(port, [b.endpoint() for b in backends]))
    names = [await ask_once(port) for _ in range(9)]
    assert Counter(names) == {"b0": 3, "b1": 3, "b2": 3}
    stats = await lb.stats()
    assert stats["services"]["web"]["connections"] == 9
    assert {k: v["total"] for k, v in stats["services"]["web"]["endpoints"].items()} == {
        "b0": 3, "b1": 3, "b2": 3}


async def test_least_connections_sends_new_connections_to_the_idle_backend(
        lb: Balancer, backends: list[Backend]) -> None:
    port = free_port()
    b0, b1 = backends[0], backends[1]
    await lb.set_service(service(port, [b0.endpoint()]))
    held = [await Conn.open(port) for _ in range(3)]  # b0 is busy with 3 open connections
    try:
        assert [await c.ask() for c in held] == ["b0"] * 3
        await lb.set_service(service(port, [b0.endpoint(), b1.endpoint()],
                                     algorithm=Algorithm.LEAST_CONNECTIONS))
        fresh = [await Conn.open(port) for _ in range(3)]
        held += fresh
        assert [await c.ask() for c in fresh] == ["b1"] * 3  # round robin would alternate
    finally:
        for c in held:
            await c.close()


async def test_refused_backend_is_skipped_without_a_client_visible_failure(
        lb: Balancer, backends: list[Backend]) -> None:
    port, dead = free_port(), free_port()  # nothing listens on `dead`: connect is refused
    await lb.set_service(service(port, [Endpoint(HOST, "dead", port=dead),
                                        backends[0].endpoint()]))
    names = [await ask_once(port) for _ in range(6)]
    assert names == ["b0"] * 6
    stats = (await lb.stats())["services"]["web"]
    assert stats["failed"] == 0
    assert stats["retries"] >= 1
    assert stats["endpoints"]["dead"]["failed"] >= 1


async def test_removed_endpoint_gets_no_new_connections_and_its_open_ones_drain_then_are_cut(
        lb: Balancer, backends: list[Backend]) -> None:
    port = free_port()
    b0, b1 = backends[0], backends[1]
    await lb.set_service(service(port, [b0.endpoint()]))
    finishing, lingering = await Conn.open(port), await Conn.open(port)
    try:
        assert await finishing.ask() == "b0"
        assert await lingering.ask() == "b0"
        # A long request is in flight on b0 when b0's task starts stopping (grace 1.5 s).
        finishing.writer.write(b"sleep 0.6\n")
        stop_at = time.time()
        await lb.set_service(service(port, [
            Endpoint(HOST, "b0", port=b0.port, drain_deadline=stop_at + 1.5), b1.endpoint()]))
        applied = time.time() - stop_at
        # No new connection reaches b0 from now on (well within a second of the update).
        assert [await ask_once(port) for _ in range(6)] == ["b1"] * 6
        assert applied < 1.0
        # The in-flight request completes during the drain ...
        assert (await asyncio.wait_for(finishing.reader.readline(), 3)).strip() == b"b0"
        # ... and what is still open at the deadline is cut (reset or EOF), not before.
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(lingering.reader.read(), 4) == b""
        cut_after = time.time() - stop_at
        assert 1.3 < cut_after < 3.0, cut_after
        stats = (await lb.stats())["services"]["web"]
        assert "b0" not in stats["endpoints"] or stats["endpoints"]["b0"]["active"] == 0
    finally:
        await finishing.close()
        await lingering.close()


async def test_endpoint_dropped_from_the_table_drains_for_the_default_timeout(
        backends: list[Backend]) -> None:
    balancer = Balancer(Config.local().replace(drain_timeout=0.8))
    await balancer.start()
    port = free_port()
    try:
        await balancer.set_service(service(port, [backends[0].endpoint()]))
        conn = await Conn.open(port)
        assert await conn.ask() == "b0"
        t0 = time.monotonic()
        await balancer.set_service(service(port, [backends[1].endpoint()]))
        assert await conn.ask() == "b0"  # still served while draining
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(conn.reader.read(), 3) == b""
        assert 0.6 < time.monotonic() - t0 < 2.0
        await conn.close()
    finally:
        await balancer.close()


# -- UDP --------------------------------------------------------------------------------------


async def test_udp_round_trip_and_each_flow_sticks_to_one_backend(lb: Balancer) -> None:
    loop = asyncio.get_running_loop()
    udp = [UdpBackend(f"u{i}") for i in range(2)]
    transports = [(await loop.create_datagram_endpoint(lambda u=u: u, local_addr=(HOST, 0)))[0]
                  for u in udp]
    port = free_port(socket.SOCK_DGRAM)
    try:
        await lb.set_service(ServiceLB(
            "dns", target_port=9, frontends=(Frontend(port, Proto.UDP),),
            endpoints=tuple(Endpoint(HOST, u.name, port=u.port) for u in udp)))
        seen: dict[int, set[str]] = {}
        for client in range(4):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(3)
                for i in range(3):
                    s.sendto(f"q{i}".encode(), (HOST, port))
                    name, _, echo = (await asyncio.to_thread(s.recv, 2048)).partition(b":")
                    assert echo == f"q{i}".encode()
                    seen.setdefault(client, set()).add(name.decode())
        assert all(len(names) == 1 for names in seen.values()), seen  # sticky per flow
        assert {n for names in seen.values() for n in names} == {"u0", "u1"}  # spread
        stats = await lb.stats()
        assert stats["services"]["dns"]["connections"] == 4
        assert stats["workers"][0]["udp_flows"] == 4

        async def flows() -> int:
            return (await lb.stats())["workers"][0]["udp_flows"]

        # Idle flows end after udp_idle_timeout (1 s in Config.local()).
        await eventually(lambda: _is_zero(flows()), timeout=4, what="idle flows to expire")
    finally:
        for t in transports:
            t.close()


async def _is_zero(value: Awaitable[int]) -> bool:
    return await value == 0


# -- control channel --------------------------------------------------------------------------


class RawWorker:
    """A worker process driven directly over its control socket (no Balancer)."""

    def __init__(self) -> None:
        self.sock, child = socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shoal.lb", "--control-fd", str(child.fileno()),
             "--log-level", "ERROR"], pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        child.close()
        self.sock.settimeout(10)
        self.next_id = 0

    def send(self, data: bytes, fds: list[int] | None = None) -> dict[str, Any]:
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.send(data)
        reply: dict[str, Any] = msgpack.unpackb(self.sock.recv(1 << 20))
        return reply

    def request(self, mtype: int, body: Any, fds: list[int] | None = None) -> dict[str, Any]:
        self.next_id += 1
        return self.send(msgpack.packb({"t": mtype, "id": self.next_id, "b": body}), fds)

    def close(self) -> None:
        self.sock.close()  # EOF: the worker shuts down by itself
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def test_bad_control_messages_are_rejected_counted_and_do_not_kill_the_worker() -> None:
    w = RawWorker()
    try:
        hello = {"version": 1, "index": 0, "config": Config.local().worker_fields()}
        bad: list[tuple[bytes, str]] = [
            (b"\xc1garbage", "decode"),
            (msgpack.packb([1, 2, 3]), "shape"),
            (msgpack.packb({"t": 99, "id": 5, "b": {}}), "unknown_type"),
            (encode(MessageType.STATS, 6, {}), "state"),  # before HELLO
            (encode(MessageType.HELLO, 7, {**hello, "version": 42}), "version"),
        ]
        for data, _reason in bad:
            reply = w.send(data)
            assert reply["ok"] is False and reply["e"]["message"]
        assert w.request(MessageType.HELLO, hello)["ok"] is True
        good = service(free_port(), [Endpoint(HOST, "t1", port=80)])
        bad_port = {**good.to_wire(), "target_port": 0}
        rejected = [
            (MessageType.SET_SERVICE, {"service": bad_port, "listeners": []}, "invalid"),
            (MessageType.SET_SERVICE, {"service": good.to_wire(),
                                       "listeners": [[HOST, 1, "tcp"]]}, "fds"),
            (MessageType.SET_SERVICE, {"service": "nope", "listeners": []}, "invalid"),
            (MessageType.SHUTDOWN, {"grace": -1}, "invalid"),
        ]
        for mtype, body, _reason in rejected:
            reply = w.request(mtype, body)
            assert reply["ok"] is False, reply
        # A descriptor that is not a listening socket of the claimed port is refused too.
        r, wr = os.pipe()
        try:
            reply = w.request(MessageType.SET_SERVICE, {
                "service": good.to_wire(), "listeners": [[HOST, 1, "tcp"]]}, fds=[r])
            assert reply["ok"] is False and reply["e"]["code"] == "lb_wire"
        finally:
            os.close(r)
            os.close(wr)
        stats = w.request(MessageType.STATS, {})
        assert stats["ok"] is True
        counted = stats["b"]["control_rejected"]
        assert counted == {"decode": 1, "shape": 1, "unknown_type": 1, "state": 1,
                           "version": 1, "invalid": 3, "fds": 2}, counted
        assert w.proc.poll() is None  # alive and answering
    finally:
        w.close()
    assert w.proc.returncode == 0


# -- frontends --------------------------------------------------------------------------------


async def test_port_in_use_and_port_conflicts_are_clear_errors_and_change_nothing(
        lb: Balancer, backends: list[Backend]) -> None:
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        with pytest.raises(PortInUse) as err:
            await lb.set_service(service(taken, [backends[0].endpoint()]))
        assert f"{HOST}:{taken}/tcp" in str(err.value) and "already in use" in str(err.value)
        assert err.value.field == "frontends[0].port"
    assert "web" not in lb.services
    port = free_port()
    await lb.set_service(service(port, [backends[0].endpoint()]))
    other = ServiceLB("api", target_port=9, frontends=(Frontend(port),),
                      endpoints=(backends[1].endpoint(),))
    with pytest.raises(PortConflict, match="already published by service 'web'"):
        await lb.set_service(other)
    with pytest.raises(InvalidService) as bad:
        await lb.set_service(service(70000, [backends[0].endpoint()]))
    assert bad.value.field == "frontends[0].port"
    assert await ask_once(port) == "b0"  # the first service is untouched


async def test_remove_service_closes_its_port(lb: Balancer, backends: list[Backend]) -> None:
    port = free_port()
    await lb.set_service(service(port, [backends[0].endpoint()]))
    assert await ask_once(port) == "b0"
    assert await lb.remove_service("web") is True
    assert await lb.remove_service("web") is False
    with pytest.raises(ConnectionRefusedError):
        await ask_once(port)


async def test_vip_is_just_another_frontend(lb: Balancer, backends: list[Backend]) -> None:
    """A VIP listens on VIP:target_port (127.0.0.77 is local: all of 127/8 is loopback)."""
    target = free_port()
    await lb.set_service(ServiceLB("api", target_port=target, vip="127.0.0.77",
                                   endpoints=(backends[0].endpoint(),)))
    reader, writer = await asyncio.open_connection("127.0.0.77", target)
    conn = Conn(reader, writer)
    try:
        assert await conn.ask() == "b0"
    finally:
        await conn.close()
    assert (await lb.stats())["services"]["api"]["listeners"] == [f"127.0.0.77:{target}/tcp"]


# -- supervision ------------------------------------------------------------------------------


async def test_killed_balancer_process_is_restarted_and_serves_again(
        lb: Balancer, backends: list[Backend]) -> None:
    port = free_port()
    await lb.set_service(service(port, [backends[0].endpoint(), backends[1].endpoint()]))
    assert await ask_once(port) in ("b0", "b1")
    old_pid = lb.pids[0]
    assert old_pid is not None
    os.kill(old_pid, signal.SIGKILL)
    # Connecting right away works: the listen socket lives in the agent; the connection
    # waits in its backlog until the new worker has its tables.
    assert await ask_once(port) in ("b0", "b1")
    stats = await lb.stats()
    assert stats["restarts"] == 1
    assert stats["workers"][0]["pid"] not in (None, old_pid)
    assert Counter([await ask_once(port) for _ in range(4)]) == {"b0": 2, "b1": 2}


async def test_wedged_balancer_process_is_killed_and_replaced(backends: list[Backend]) -> None:
    balancer = Balancer(Config.local().replace(control_timeout=0.5, health_interval=0.2))
    await balancer.start()
    try:
        port = free_port()
        await balancer.set_service(service(port, [backends[0].endpoint()]))
        old_pid = balancer.pids[0]
        assert old_pid is not None
        os.kill(old_pid, signal.SIGSTOP)  # alive but answers nothing
        await eventually(lambda: _restarted(balancer), timeout=5, what="worker replaced")
        assert balancer.pids[0] != old_pid
        assert await ask_once(port) == "b0"
    finally:
        await balancer.close()


async def _restarted(balancer: Balancer) -> bool:
    return balancer.restarts == 1 and balancer.pids[0] is not None


def test_worker_runs_with_several_processes_sharing_a_port() -> None:
    """workers=2: both processes accept on the one listening socket; all requests served."""

    async def scenario() -> None:
        b = await Backend("b0").start()
        balancer = Balancer(Config.local().replace(workers=2, splice=False))
        await balancer.start()
        try:
            port = free_port()
            await balancer.set_service(service(port, [b.endpoint()]))
            conns = [await Conn.open(port) for _ in range(20)]
            assert [await c.ask() for c in conns] == ["b0"] * 20
            for c in conns:
                await c.close()
            stats = await balancer.stats()
            assert len(stats["workers"]) == 2 and all(w["alive"] for w in stats["workers"])
            assert stats["services"]["web"]["connections"] == 20
        finally:
            await balancer.close()
            await b.close()

    uvloop.run(scenario())  # the agent runs on uvloop: the client must work there too


async def test_descriptors_received_on_the_control_channel_are_close_on_exec() -> None:
    """socket.recv_fds drops its flags in Python 3.11 (its descriptors are inheritable) and
    uvloop's spawn ignores close_fds: the channel receives them close-on-exec itself."""
    from shoal.lb.channel import Channel

    a, b = socketpair()
    got: list[tuple[bytes, list[int], bool]] = []
    arrived = asyncio.Event()

    def on_message(data: bytes, fds: list[int], truncated: bool) -> None:
        got.append((data, fds, truncated))
        arrived.set()

    chan = Channel(b, on_message, lambda: None)
    r, w = os.pipe2(0)  # (inheritable, as the sender's may be)
    try:
        socket.send_fds(a, [b"x"], [r, w])
        await asyncio.wait_for(arrived.wait(), 5)
        (data, fds, truncated), = got
        assert data == b"x" and len(fds) == 2 and not truncated
        assert all(not os.get_inheritable(fd) for fd in fds)
        os.write(fds[1], b"y")
        assert os.read(r, 1) == b"y"
    finally:
        chan.close()
        a.close()
        for fd in (r, w, *(fd for _, fds, _ in got for fd in fds)):
            os.close(fd)
