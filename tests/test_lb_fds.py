"""The balancer's descriptors (shoal.lb): nothing closed while its loop still watches it,
nothing left open by a connection cut short, no send left waiting on a closed channel. Under
uvloop a watched number closed behind the loop's back kills the worker (libuv aborts on the
EBADF of its pending epoll change) or lands on the next socket given that number."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import subprocess
import sys
from typing import Any

import pytest
import uvloop

from shoal.lb.channel import Channel, socketpair
from shoal.lb.config import Config
from shoal.lb.errors import BalancerUnavailable
from shoal.lb.proxy import SpliceConn
from shoal.lb.table import EndpointState, ServiceTable


class _Worker:  # (what a SpliceConn uses of lb.proxy's worker context)
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.cfg, self.conns, self.udp_flows = loop, Config(), set(), 0


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd") if os.path.lexists(f"/proc/self/fd/{n}")}


async def _cut_by_emfile() -> tuple[int, set[int], tuple[Any, ...]]:
    """A spliced connection whose second pipe hits RLIMIT_NOFILE (a worker out of
    descriptors) as its backend is attached: (the client's old fd number, the descriptors it
    left open, the peers to keep alive)."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client_peer = socket.create_connection(listener.getsockname())
    client, _ = listener.accept()
    client.setblocking(False)
    backend, backend_peer = socket.socketpair()
    backend.setblocking(False)
    conn = SpliceConn(_Worker(loop), ServiceTable("svc"), client)  # type: ignore[arg-type]
    assert conn.task is not None
    conn.task.cancel()  # (its backend is handed over below, as _connect would)
    await asyncio.sleep(0)
    conn.task = None
    client_fd = client.fileno()
    fillers, top = [], max(_open_fds())  # every number below the top in use...
    while (fd := os.open("/dev/null", os.O_RDONLY)) < top:
        fillers.append(fd)
    os.close(fd)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (top + 3, hard))  # ...and room for one pipe
    before = _open_fds()
    try:
        conn._attach(EndpointState("127.0.0.1", 1, "task"), backend)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    leaked = _open_fds() - before
    for fd in fillers:
        os.close(fd)
    assert conn.closed and client.fileno() == -1  # (cut: both sockets closed)
    return client_fd, leaked, (listener, client_peer, backend_peer)


def test_a_connection_cut_for_want_of_a_pipe_leaves_no_pipe_and_no_watch() -> None:
    async def main() -> tuple[int, set[int], bool]:
        client_fd, leaked, peers = await _cut_by_emfile()
        watched = asyncio.get_running_loop().remove_reader(client_fd)  # (True: one was left)
        for peer in peers:
            peer.close()
        return client_fd, leaked, watched

    client_fd, leaked, watched = uvloop.run(main())
    assert not leaked, f"descriptors left open by the cut connection: {sorted(leaked)}"
    assert not watched, f"the loop still watched the closed client's fd {client_fd}"


def test_the_workers_loop_runs_on_after_such_a_cut() -> None:
    """Before: libuv flushed the first direction's pending watch of the client's number,
    closed meanwhile: EBADF, abort() — the worker and every connection it carried gone."""
    code = ("import asyncio, sys, uvloop\n"
            f"sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "import test_lb_fds as t\n"
            "async def main():\n"
            "    kept = await t._cut_by_emfile()\n"
            "    await asyncio.sleep(0.05)  # (the worker's loop goes on)\n"
            "uvloop.run(main())\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"the loop died: exit {res.returncode} {res.stderr[-300:]}"


@pytest.mark.parametrize("new_loop", [uvloop.new_event_loop, asyncio.new_event_loop])
def test_a_send_waiting_for_room_ends_when_its_channel_closes(new_loop: Any) -> None:
    """The agent sends to a wedged worker (its buffer full), then the worker dies: the send
    fails with BalancerUnavailable. Before, it waited for ever — under the balancer slot's
    lock, so the worker was never restarted and its published ports stayed dead."""
    async def main() -> str:
        ours, theirs = socketpair()
        gone = asyncio.Event()
        chan = Channel(ours, lambda *_: None, gone.set)
        sending = None
        for _ in range(10_000):  # (the worker reads nothing: its buffer fills)
            sending = asyncio.create_task(chan.send(b"x" * 60_000))
            await asyncio.sleep(0)
            if not sending.done():
                break
        assert sending is not None and not sending.done(), "the buffer never filled"
        theirs.close()  # (the worker dies)
        await asyncio.wait_for(gone.wait(), 5)
        try:
            await asyncio.wait_for(sending, 5)
        except BalancerUnavailable:
            return "refused"
        except TimeoutError:
            return "still waiting"
        return "sent"

    loop = new_loop()
    try:
        assert loop.run_until_complete(main()) == "refused"
    finally:
        loop.close()
