"""node/execs.py without a cluster: the exec request's checks (each names its field), how a
task is named (id, unique prefix, SERVICE.SLOT, Docker's SERVICE.SLOT.ID), and the role an
exec needs (operator, though its WebSocket opens with a GET)."""

from __future__ import annotations

from typing import Any

import pytest

from shoal.node.errors import ApiError, BadRequest, Conflict, NotFound
from shoal.node.execs import ExecRequest, find_task
from shoal.node.users import required_role
from shoal.raft.models import Task, TaskState, TaskStatus
from shoal.raft.spec import TaskSpec
from shoal.raft.state import ClusterState


def _task(tid: str, slot: int, state: TaskState, created: float) -> Task:
    return Task(id=tid, service_id="s1", service_name="web", slot=slot, spec=TaskSpec(),
                service_version=1, node_id="n1", created_at=created,
                status=TaskStatus(state=state, timestamp=created))


SNAP = ClusterState(tasks={t.id: t for t in (
    _task("aaaa1111", 1, TaskState.FAILED, 1.0),    # web.1's history
    _task("aaaa2222", 1, TaskState.RUNNING, 2.0),   # web.1 now
    _task("bbbb3333", 2, TaskState.RUNNING, 3.0),
)}).snapshot()


@pytest.mark.parametrize(("ref", "expected"), [
    ("bbbb3333", "bbbb3333"), ("web.1", "aaaa2222"), ("web.2", "bbbb3333"),
    ("web.1.aaaa1111", "aaaa1111"), ("bbbb", "bbbb3333"), ("aaaa2", "aaaa2222"),
])  # fmt: skip
def test_a_task_is_named_as_docker_and_service_ps_name_it(ref: str, expected: str) -> None:
    assert find_task(SNAP, ref).id == expected


@pytest.mark.parametrize(("ref", "error", "message"), [
    ("aaaa", Conflict, "ambiguous"), ("web.3", NotFound, "no task 'web.3'"),
    ("abc", NotFound, "no task"), ("web.2.aaaa1111", NotFound, "no task"),
])  # fmt: skip
def test_an_unknown_or_ambiguous_name_is_refused(ref: str, error: type[ApiError],
                                                 message: str) -> None:
    with pytest.raises(error, match=message) as exc:
        find_task(SNAP, ref)
    assert exc.value.field == "task"


@pytest.mark.parametrize(("raw", "field"), [
    ({}, "cmd"), ({"cmd": []}, "cmd"), ({"cmd": ["sh", 1]}, "cmd"), ({"cmd": [""]}, "cmd"),
    ({"cmd": ["a\0b"]}, "cmd"), ({"cmd": ["sh"], "tty": "yes"}, "tty"),
    ({"cmd": ["sh"], "stdin": 1}, "stdin"), ({"cmd": ["sh"], "user": 0}, "user"),
    ({"cmd": ["sh"], "workdir": "tmp"}, "workdir"), ({"cmd": ["sh"], "env": {"A=B": "1"}}, "env"),
    ({"cmd": ["sh"], "env": ["A=1"]}, "env"), ({"cmd": ["sh"], "rows": 0}, "rows"),
    ({"cmd": ["sh"], "cols": True}, "cols"), ([], ""), ({"cmd": ["\ud800"]}, "cmd"),
    ({"cmd": ["sh"], "env": {"A": "\udcff"}}, "env"), ({"cmd": ["sh"], "detach": 1}, "detach"),
    ({"cmd": ["sh"], "privileged": "true"}, "privileged"),
])  # fmt: skip
def test_a_bad_exec_request_is_refused_naming_its_field(raw: Any, field: str) -> None:
    with pytest.raises(BadRequest) as exc:
        ExecRequest.parse(raw)
    assert exc.value.field == field


def test_a_request_round_trips_for_the_relay() -> None:
    req = ExecRequest.parse({"cmd": ["sh", "-c", "x"], "tty": True, "stdin": True,
                             "user": "app", "workdir": "/w", "env": {"A": "1"}, "rows": 50,
                             "cols": 132, "detach": True, "privileged": True})
    assert ExecRequest.parse(req.to_json()) == req


def test_an_exec_needs_the_operator_role_though_it_opens_with_a_get() -> None:
    assert required_role("task_exec") == "operator"
    assert required_role("service_ps") == "viewer"


async def test_detached_commands_are_bounded_per_node(tmp_path: Any) -> None:
    """`exec -d` commands run on without a client: past MAX_DETACHED of them on one node a
    new one is refused (Unavailable) before anything runs; an attached exec still runs."""
    import asyncio

    from shoal.node.errors import Unavailable
    from shoal.node.execs import MAX_DETACHED, Executor
    from shoal.node.health import ExecHelper

    ex = Executor(ExecHelper(tmp_path))
    never = asyncio.Event()
    ex.detached = {asyncio.create_task(never.wait()) for _ in range(MAX_DETACHED)}
    try:
        with pytest.raises(Unavailable, match=f"{MAX_DETACHED} detached"):
            await ex.run_local(None, 1, ExecRequest(cmd=["true"], detach=True))  # type: ignore[arg-type]
        assert ex.sessions == 0 and list(tmp_path.iterdir()) == []  # (no helper built)
    finally:
        for t in ex.detached:
            t.cancel()


class ClientTransport:
    """A client's connection as a session sees it: open until the test closes it."""

    closing = False

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, _name: str) -> None:
        return None


async def test_a_client_that_leaves_before_a_detached_command_started_takes_it_along(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`exec -d` waits for execdrop to say the command started; a command that never gets
    there (a stopped or stuck process) is killed when its client leaves, as an attached
    one, instead of holding its session for ever. Here the "execdrop" is a plain sleep."""
    import asyncio
    import os

    from shoal.node.execs import Executor, _Session
    from shoal.node.health import ExecHelper

    class Ws:
        async def send_bytes(self, _data: bytes) -> None:
            return None

        async def close(self) -> None:
            return None

    ex = Executor(ExecHelper(None))
    monkeypatch.setattr(ex, "argv", lambda *_a: ["/bin/sh", "-c", "exec sleep 4141"])
    client = ClientTransport()
    dummy = os.open("/dev/null", os.O_RDONLY)
    try:
        session = _Session(ex, Ws(), os.getpid(),  # type: ignore[arg-type]
                           ExecRequest(cmd=["x"], detach=True), dummy, client)
        run = asyncio.create_task(session.run())
        await asyncio.sleep(0.5)
        assert not run.done() and session.proc is not None
        client.closing = True
        assert await asyncio.wait_for(run, 10) == 128 + 9  # (killed)
        assert session.proc.returncode is not None and not ex.detached
    finally:
        os.close(dummy)


async def test_a_leaving_clients_terminal_is_closed_only_once_nothing_watches_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An attached `exec -t` whose client leaves: its terminal's master is closed (the
    command's hang-up) only after the readers and writers on it stopped watching it. Closed
    while still watched, its number could be reused at once by the next exec's pipes, which
    the loop then refuses (uvloop: FileExistsError in the spawn, leaving that exec's socket
    to later children), and the late removal would drop the new owner's watch. Here the
    "execdrop" is a Python child that opens a terminal and sends its master back."""
    import asyncio
    import os
    import sys

    from shoal.node.execs import Executor, _Session
    from shoal.node.health import ExecHelper

    class Ws:  # (a client that sends nothing)
        async def send_bytes(self, _data: bytes) -> None:
            return None

        def __aiter__(self) -> Ws:
            return self

        async def __anext__(self) -> None:
            await asyncio.Event().wait()

    loop = asyncio.get_running_loop()
    watched: set[int] = set()

    def tracking(real: Any, note: Any) -> Any:
        def call(fd: int, *args: Any) -> Any:
            note(fd)
            return real(fd, *args)
        return call
    for add, remove in (("add_reader", "remove_reader"), ("add_writer", "remove_writer")):
        monkeypatch.setattr(loop, add, tracking(getattr(loop, add), watched.add))
        monkeypatch.setattr(loop, remove, tracking(getattr(loop, remove), watched.discard))
    sends_a_terminal = ("import os, socket, sys, time\n"
                        "master, slave = os.openpty()\n"
                        "console = socket.socket(fileno=int(sys.argv[1]))\n"
                        "socket.send_fds(console, [b'm'], [master])\n"
                        "time.sleep(4141)\n")
    ex = Executor(ExecHelper(None))
    monkeypatch.setattr(ex, "argv", lambda _pid, _req, _helper, _env, console, _detach=None,
                        _seccomp=None: [sys.executable, "-c", sends_a_terminal, str(console)])
    client = ClientTransport()
    dummy = os.open("/dev/null", os.O_RDONLY)
    try:
        session = _Session(ex, Ws(), os.getpid(),  # type: ignore[arg-type]
                           ExecRequest(cmd=["x"], tty=True, stdin=True), dummy, client)
        closed_while_watched: list[bool] = []
        kill = session._kill

        def checked_kill() -> None:
            if session.master is not None:
                closed_while_watched.append(session.master in watched)
            kill()
        monkeypatch.setattr(session, "_kill", checked_kill)
        run = asyncio.create_task(session.run())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if session.master is not None and session.master in watched:
                break
        assert session.master in watched  # (its output is being read)
        client.closing = True
        assert await asyncio.wait_for(run, 10) == 128 + 9  # (killed)
        assert closed_while_watched == [False] and session.master is None
    finally:
        os.close(dummy)


def test_a_relays_link_is_shut_down_through_its_descriptor_under_uvloop() -> None:
    """A relay whose node does not answer its close within 2 s shuts the link down: under
    uvloop (the agent's loop) the transport's socket is a PseudoSocket without shutdown()
    (before: TypeError, the session's end an "internal" error and a traceback)."""
    import asyncio
    import contextlib

    import uvloop

    from shoal.node.execs import shut_down

    async def main() -> bytes:
        accepted: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = \
            asyncio.Queue()
        server = await asyncio.start_server(lambda r, w: accepted.put_nowait((r, w)),
                                            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        theirs, their_writer = await accepted.get()
        sock = writer.get_extra_info("socket")
        assert type(sock).__name__ == "PseudoSocket"  # (uvloop's)
        shut_down(sock)
        got = await asyncio.wait_for(theirs.read(), 5)  # (the end: b"" at once)
        assert sock.fileno() >= 0  # (not closed: still the transport's)
        for w in (writer, their_writer):
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()
        server.close()
        await server.wait_closed()
        return got

    assert uvloop.run(main()) == b""
