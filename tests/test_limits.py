"""Per-client request limits (node/limits.py) and the body limit of the API listeners.

The limiter alone on a fake clock, then the agent's real user API (tests/test_openapi.py's
server on the in-memory store) on a unix socket in the test's directory: a flood from one
client is answered 429 with Retry-After while another client is still served, and a 1 GiB
request body is refused after the first MiB without the agent reading or keeping the rest.
Each test names the property it checks.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from test_openapi import make_server

from shoal.node.errors import TooManyRequests
from shoal.node.limits import ClientLimits, LimitsConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_in_flight_requests_of_one_client_are_capped_and_others_are_not() -> None:
    """The (max_inflight+1)-th concurrent request of a client is refused with a retry hint;
    another client is admitted meanwhile; a finished request frees its place."""
    lim = ClientLimits(LimitsConfig(max_inflight=3, rate=0), clock=Clock())
    for _ in range(3):
        lim.admit("a")
    with pytest.raises(TooManyRequests, match="at most 3") as info:
        lim.admit("a")
    assert info.value.status == 429 and info.value.retry_after == 1
    lim.admit("b")
    lim.done("a")
    lim.admit("a")
    assert lim.refused == 1


def test_the_rate_is_a_token_bucket_per_client() -> None:
    """A burst is admitted at once, then only ``rate`` per second; the retry hint says when."""
    clock = Clock()
    lim = ClientLimits(LimitsConfig(max_inflight=0, rate=2.0, burst=4), clock=clock)
    for _ in range(4):
        lim.admit("a")
        lim.done("a")
    with pytest.raises(TooManyRequests, match="rate over 2/s") as info:
        lim.admit("a")
    assert info.value.retry_after == 1
    clock.now += 1.0  # two tokens back
    lim.admit("a")
    lim.admit("a")
    with pytest.raises(TooManyRequests):
        lim.admit("a")
    lim.admit("b")  # another client has its own bucket


def test_idle_clients_are_forgotten() -> None:
    clock = Clock()
    lim = ClientLimits(LimitsConfig(forget_after=10.0), clock=clock)
    lim.admit("a")
    lim.done("a")
    lim.admit("busy")
    clock.now += 11.0
    lim.admit("b")
    assert set(lim.clients) == {"busy", "b"}


async def _serve(tmp_path: Path, limits: LimitsConfig) -> tuple[web.AppRunner, Path]:
    server, _, _ = make_server(tmp_path)
    server.config.api_limits = limits
    server.limits = {k: ClientLimits(limits) for k in server.limits}
    runner = web.AppRunner(server.local_app())
    await runner.setup()
    sock = tmp_path / "api.sock"
    await web.UnixSite(runner, str(sock)).start()
    return runner, sock


async def test_a_flood_from_one_client_gets_429_and_another_client_is_served(
        tmp_path: Path) -> None:
    """2,000 requests from one client (one process: the limits key on the unix peer's pid)
    over 100 connections at once, on a listener allowing 20 in flight and 200/s: most are
    refused with 429,
    Retry-After and the documented error shape, none fails otherwise; a request of a second
    process during the flood gets its answer."""
    runner, sock = await _serve(tmp_path, LimitsConfig(max_inflight=20, rate=200, burst=200))
    try:
        conn = aiohttp.UnixConnector(path=str(sock), limit=100)
        statuses: list[int] = []
        async with aiohttp.ClientSession(connector=conn) as s:
            async def one() -> None:
                async with s.get("http://agent/v1/services") as r:
                    body = await r.json()
                    statuses.append(r.status)
                    if r.status == 429:
                        assert r.headers["Retry-After"].isdigit()
                        assert body["error"]["code"] == "too_many_requests"

            flood = asyncio.gather(*(one() for _ in range(2000)))
            other = await asyncio.create_subprocess_exec(
                "curl", "-s", "--unix-socket", str(sock), "http://agent/v1/services",
                stdout=asyncio.subprocess.PIPE)
            out, _ = await other.communicate()
            await flood
        assert json.loads(out) == []
        assert set(statuses) == {200, 429}, set(statuses)
        assert statuses.count(429) >= 1000, statuses.count(200)
    finally:
        await runner.cleanup()


async def test_a_1_gib_body_is_refused_after_the_first_mib(tmp_path: Path) -> None:
    """A client announcing and sending a 1 GiB body gets 413 once 1 MiB has arrived; the
    agent stops reading it (the client could not send more than a few MiB) and still
    answers afterwards."""
    runner, sock = await _serve(tmp_path, LimitsConfig())
    try:
        size = 1 << 30
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(sock))
        s.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(s, b"POST /v1/secrets HTTP/1.1\r\nHost: agent\r\n"
                                b"Content-Type: application/json\r\nContent-Length: " +
                                str(size).encode() + b"\r\n\r\n")
        chunk, sent = b"x" * (1 << 16), 0
        try:
            while sent < size:  # until the agent stops reading (a stall of 2 s) or hangs up
                await asyncio.wait_for(loop.sock_sendall(s, chunk), 2.0)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass
        try:
            reply = await asyncio.wait_for(loop.sock_recv(s, 4096), 10.0)
        finally:
            s.close()
        assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
        assert sent < 64 << 20, sent
        conn = aiohttp.UnixConnector(path=str(sock))
        async with aiohttp.ClientSession(connector=conn) as c, \
                c.get("http://agent/v1/services") as r:
            assert r.status == 200
    finally:
        await runner.cleanup()
