"""`shoal exec`: a command in a running task, as `docker exec` — from any manager.

Owns: the exec protocol over a WebSocket (the task is named by shoal.node.views.find_task:
id, unique id prefix of 4+ characters, ``SERVICE.SLOT``, Docker's ``SERVICE.SLOT.ID``)
(``serve``: what the API's ``task_exec`` route runs), running the command on the node whose
task it is (``run_local``) and relaying a session to that node when it is another
(``relay``: a manager only, over the nodes' mutual TLS, ``cluster_exec``). Must not touch:
the store (it reads a snapshot), the runtime's records (it reads a task's status).

The command runs as the exec health checks do (node/health.py): a small host shell joins
the task's cgroups, nsenter enters the init's mount, uts, ipc, net and pid namespaces, its
root and working directory (or ``workdir``), and shoal-execdrop (runtime/execdrop.c) takes
the task's credentials — or those of ``user``, looked up in the task's own /etc/passwd —
and capability set before it execs the command, with the task's environment plus ``env``.
With ``tty`` its stdio is a pseudo-terminal of the task's own devpts (execdrop --console
hands the master over a socket pair), else pipes; without ``stdin`` its stdin is /dev/null.

Protocol (Kubernetes' channel.k8s.io, over aiohttp's WebSocket): the client's first message
is a text frame, the request as JSON (``ExecRequest``); then binary frames whose first byte
is the channel — 0 stdin (client → node; an empty payload is the end of stdin), 1 stdout,
2 stderr (with a tty everything is 1), 3 status (the last frame: JSON ``{"exit_code": N}``,
or ``{"error": {...}}`` when the command could not run), 4 resize (JSON ``{"rows", "cols"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import select
import shutil
import signal
import socket
import struct
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from shoal.lb.channel import recv_fds
from shoal.node import pki
from shoal.node.errors import ApiError, BadRequest, Conflict, NotFound, Unavailable
from shoal.node.health import (
    HOST_ENV,
    ExecHelper,
    _credentials,
    _environ,
    enter_argv,
    env_fd,
    filter_fd,
)
from shoal.node.users import REQUEST_USER, require_admin
from shoal.node.views import find_task
from shoal.raft.models import Task, TaskState
from shoal.runtime.cgroups import CgroupLayout, detect
from shoal.runtime.records import RunState

log = logging.getLogger("shoal.exec")

STDIN, STDOUT, STDERR, STATUS, RESIZE, DETACH = 0, 1, 2, 3, 4, 5
MAX_SESSIONS = 32  # exec sessions at once on one node (each holds a process and a socket)
MAX_DETACHED = 64  # `exec -d` commands running at once on one node (each holds a process)
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds for the client to send its request
DRAIN_IDLE = 1.0  # after the command exited, its output is read until this many seconds pass
#                   without any (a background process may hold its pipes or terminal open)
HEARTBEAT = 30.0  # seconds between a manager's pings to the node it relays to (a half-open
#                   link frees the session); the CLI, which may block on a slow stdout, is
#                   not pinged: a client that goes away is seen by its transport closing
CLOSE_POLL = 0.5  # seconds between looks at whether the client's connection closed
_MAX_ARGS = 4096


@dataclass
class ExecRequest:
    cmd: list[str]
    tty: bool = False
    stdin: bool = False
    user: str = ""
    workdir: str = ""
    env: dict[str, str] = field(default_factory=dict)
    rows: int = 24
    cols: int = 80
    detach: bool = False  # -d: answered once the command started, which then runs on
    privileged: bool = False  # every capability of the node's, not the task's set

    @classmethod
    def parse(cls, raw: Any) -> ExecRequest:
        """The client's first message; BadRequest naming the field."""
        if not isinstance(raw, dict):
            raise BadRequest("the first message must be a JSON object", "")
        cmd = raw.get("cmd")
        if not isinstance(cmd, list) or not cmd or len(cmd) > _MAX_ARGS or not all(
                isinstance(a, str) and "\0" not in a and _utf8(a) for a in cmd) or not cmd[0]:
            raise BadRequest("cmd must be the command and its arguments: a non-empty list of "
                             "strings", "cmd")
        out = cls(cmd=list(cmd))
        for name in ("tty", "stdin", "detach", "privileged"):
            value = raw.get(name, False)
            if not isinstance(value, bool):
                raise BadRequest(f"{name} must be true or false", name)
            setattr(out, name, value)
        for name in ("user", "workdir"):
            value = raw.get(name, "")
            if not isinstance(value, str) or "\0" in value or not _utf8(value):
                raise BadRequest(f"{name} must be a string", name)
            setattr(out, name, value)
        if out.workdir and not out.workdir.startswith("/"):
            raise BadRequest("workdir must be an absolute path", "workdir")
        env = raw.get("env", {})
        if not isinstance(env, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k
                and "\0" not in k + v and _utf8(k + v) for k, v in env.items()):
            raise BadRequest("env must map variable names to strings", "env")
        out.env = dict(env)
        for name in ("rows", "cols"):
            value = raw.get(name, getattr(out, name))
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 9999:
                raise BadRequest(f"{name} must be a number from 1 to 9999", name)
            setattr(out, name, value)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"cmd": self.cmd, "tty": self.tty, "stdin": self.stdin, "user": self.user,
                "workdir": self.workdir, "env": self.env, "rows": self.rows, "cols": self.cols,
                "detach": self.detach, "privileged": self.privileged}


def _utf8(text: str) -> bool:
    """Text that can be encoded (JSON lets lone surrogates through)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# ------------------------------------------------------------------------ the WebSocket side

async def _send_status(ws: web.WebSocketResponse, body: dict[str, Any]) -> None:
    with contextlib.suppress(ConnectionError, RuntimeError):
        await ws.send_bytes(bytes([STATUS]) + json.dumps(body).encode())
        await ws.close()


async def first_message(ws: web.WebSocketResponse) -> dict[str, Any]:
    """The client's request: a JSON object in a text frame."""
    try:
        msg = await ws.receive(timeout=FIRST_MESSAGE_TIMEOUT)
    except TimeoutError:
        raise BadRequest("no exec request within "
                         f"{FIRST_MESSAGE_TIMEOUT:g} s", "") from None
    if msg.type is not aiohttp.WSMsgType.TEXT:
        raise BadRequest("the first message must be the exec request as JSON text", "")
    try:
        raw = json.loads(msg.data)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the exec request is not JSON: {exc}", "") from None
    if not isinstance(raw, dict):
        raise BadRequest("the exec request must be a JSON object", "")
    return raw


async def serve(req: web.Request, start: Callable[[web.WebSocketResponse],
                                                  Awaitable[int | None]]) -> web.StreamResponse:
    """Accept the WebSocket and run ``start(ws)`` (which reads the request and runs or relays
    the session); an error before the command runs is the status frame's ``error``."""
    ws = web.WebSocketResponse(max_msg_size=1 << 20)
    await ws.prepare(req)
    try:
        code = await start(ws)
    except ApiError as exc:
        await _send_status(ws, exc.to_json())
        return ws
    except Exception as exc:  # (the stream is a WebSocket now: an HTTP 500 would corrupt it)
        log.exception("exec session failed")
        await _send_status(ws, {"error": {"code": "internal", "field": "",
                                          "message": f"the exec failed: {exc!r}"}})
        return ws
    if code is not None:
        await _send_status(ws, {"exit_code": code})
    return ws


# ------------------------------------------------------------------------- the local session

class Executor:
    """Runs exec sessions of this node's tasks."""

    def __init__(self, helper: ExecHelper, nsenter: str = "nsenter") -> None:
        self.helper = helper  # the node's sealed shoal-execdrop (shared with exec checks)
        self.nsenter = shutil.which(nsenter) or nsenter
        self._layout: CgroupLayout | None = None
        self.sessions = 0
        self.detached: set[asyncio.Task[None]] = set()  # `exec -d` commands running on
        self.reserved = 0  # places among MAX_DETACHED of sessions that may detach soon

    def reserve(self) -> bool:
        """A place for one more detached command (False: MAX_DETACHED are running or
        about to); the session gives it back once it handed its command over or ended."""
        if len(self.detached) + self.reserved >= MAX_DETACHED:
            return False
        self.reserved += 1
        return True

    async def run_local(self, ws: web.WebSocketResponse, pid: int, request: ExecRequest,
                        transport: Any = None, label: str = "") -> int | None:
        """The command in the task whose init is host ``pid``; its exit code (128+N when
        killed by signal N), once its output went out on ``ws``. With ``request.detach``:
        None once it started (it runs on; ``detached``), or its exit code if it could not.
        ``label`` names the task and who asked, for the log."""
        if self.sessions >= MAX_SESSIONS:
            raise Unavailable(f"this node runs {MAX_SESSIONS} exec sessions already")
        if request.detach and not self.reserve():
            raise Unavailable(f"this node runs {MAX_DETACHED} detached exec commands already")
        self.sessions += 1
        session = _Session(self, ws, pid, request, -1, transport, label)
        session.reserved = request.detach
        try:
            session.helper_fd = await self.helper.fd()
            return await session.run()
        finally:
            self.sessions -= 1
            if session.reserved:
                self.reserved -= 1

    def argv(self, pid: int, request: ExecRequest, helper_fd: int, envfd: int,
             console_fd: int | None, detach_fd: int | None = None,
             seccomp_fd: int | None = None) -> list[str]:
        """The host command line (health.enter_argv): the user and the working directory are
        looked up by shoal-execdrop inside the task's root (its /etc/passwd: never read from
        the host, where its symlinks would resolve against the host's files)."""
        if self._layout is None:
            self._layout = detect()
        options = [*(["--user", request.user] if request.user else []),
                   *(["--workdir", request.workdir] if request.workdir else []),
                   *(["--console", str(console_fd)] if console_fd is not None else []),
                   *(["--detach", str(detach_fd)] if detach_fd is not None else [])]
        # (--privileged: every capability, still the task's seccomp filter, as Docker's)
        return enter_argv(self.nsenter, self._layout, pid, helper_fd, envfd, request.cmd,
                          options, caps=_credentials(os.getpid())[3] if request.privileged
                          else None, seccomp_fd=seccomp_fd)

    @staticmethod
    def environment(pid: int, request: ExecRequest) -> dict[str, str]:
        """The command's: the task's (its init's), ``env`` over it; TERM with a tty."""
        env = {**_environ(pid), **request.env}
        if request.tty:
            env.setdefault("TERM", "xterm")  # (Docker's exec -t sets it too)
        return env


class _Session:
    """One command: its process, its terminal or pipes, and the frames both ways."""

    def __init__(self, executor: Executor, ws: web.WebSocketResponse, pid: int,
                 request: ExecRequest, helper_fd: int, transport: Any = None,
                 label: str = "") -> None:
        self.ex, self.ws, self.pid, self.req = executor, ws, pid, request
        self.helper_fd = helper_fd
        self.label = label or f"the task of pid {pid}"  # (for the log)
        self.reserved = False  # holds one of the executor's places for a detached command
        self.transport = transport  # the client's connection (its closing ends the command)
        self.master: int | None = None  # the terminal's master (tty)
        self.proc: asyncio.subprocess.Process | None = None
        self.active = 0.0  # (monotonic) the last output read or sent
        self.sending = 0  # sends in flight (a slow client: not idle)
        self.dropping = False  # detached: output is read and dropped
        self.detaching = False  # the client typed its detach keys (a DETACH frame)

    async def run(self) -> int | None:
        ours = theirs = None  # the terminal's socket pair (-t): its master comes back on it
        started = handed = None  # -d: the pair execdrop hands its start pipe back on
        envfd = env_fd(self.ex.environment(self.pid, self.req))
        program = self.ex.helper.seccomp_of(self.pid)
        sfd = filter_fd(program) if program is not None else None
        try:
            if self.req.tty:
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            if self.req.detach:
                started, handed = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            argv = self.ex.argv(self.pid, self.req, self.helper_fd, envfd,
                                theirs.fileno() if theirs is not None else None,
                                handed.fileno() if handed is not None else None, sfd)
            pipe, null = asyncio.subprocess.PIPE, asyncio.subprocess.DEVNULL
            self.proc = await asyncio.create_subprocess_exec(
                *argv, env=HOST_ENV, start_new_session=True,
                stdin=pipe if self.req.stdin and not self.req.tty else null,
                stdout=null if self.req.tty or self.req.detach else pipe, stderr=pipe,
                pass_fds=tuple(fd for fd in (self.helper_fd, envfd, sfd, *(
                    s.fileno() for s in (theirs, handed) if s is not None)) if fd is not None))
        finally:
            os.close(envfd)
            if sfd is not None:
                os.close(sfd)
            for end in (theirs, handed):
                if end is not None:
                    end.close()
        handed_off = False
        try:
            if ours is not None:
                self.master = await self._receive_fd(ours, timeout=10)
                if self.master is not None:
                    os.set_blocking(self.master, False)
                    fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                                struct.pack("HHHH", self.req.rows, self.req.cols, 0, 0))
            code: int | None
            if started is not None:
                began = await self._unless_client_leaves(self._started(started))
                if began is None:  # the client left first: as an attached session's
                    self._kill()
                    return _code(await self.proc.wait())
                code = None if began else await self._pump()
            else:
                code = await self._pump()  # (None: the client detached)
            if code is None:
                runner = asyncio.create_task(self._linger(), name=f"exec-detached-{self.pid}")
                self.ex.detached.add(runner)
                runner.add_done_callback(self.ex.detached.discard)
                handed_off = True
                await _send_status(self.ws, {"detached": True})
            return code
        finally:
            if started is not None:
                started.close()
            if not handed_off:
                await self._end()

    async def _receive_fd(self, sock: socket.socket, timeout: float | None = None
                          ) -> int | None:
        """A descriptor execdrop sends on ``sock`` (close-on-exec here: the agent's later
        children must not inherit it, and uvloop ignores close_fds); None when it closed its
        end first (it failed: its stderr says why) or ``timeout`` passed."""
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        fds = recv_fds(sock, 1, 4)[1]
                        break
                    except BlockingIOError:
                        await _ready(loop.add_reader, loop.remove_reader, sock.fileno())
        except TimeoutError:
            return None
        finally:
            sock.close()
        for extra in fds[1:]:
            os.close(extra)
        return fds[0] if fds else None

    async def _started(self, sock: socket.socket) -> bool:
        """-d: whether the command started. execdrop hands over the read end of a pipe whose
        write end only it holds, close-on-exec: the end of the pipe without a word is a
        successful exec; its words are why the exec failed (sent on as stderr; the exit
        status follows). No pipe at all: it failed before (its stderr says why)."""
        fd = await self._receive_fd(sock)
        if fd is None:
            return False
        said = b""
        try:
            os.set_blocking(fd, False)
            async for chunk in _chunks(fd):
                said += chunk[:4096 - len(said)]
        finally:
            os.close(fd)
        if said:
            await self._send(STDERR, said)
        return not said

    async def _unless_client_leaves(self, work: Awaitable[bool]) -> bool | None:
        """``work``'s result, or None when the client's connection closes first."""
        task = asyncio.ensure_future(work)
        gone = asyncio.create_task(_until_closed(self.transport))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _stopped(task, gone)  # (a task that finished is only waited for)
        return task.result() if not task.cancelled() else None

    async def _linger(self) -> None:
        """-d: the command runs on without its client until it ends. Its terminal's output
        and anything on stderr (nsenter's) are read and dropped; its stdin (-i) is held open,
        never written, as docker's. An agent that stops leaves it running."""
        proc = self.proc
        assert proc is not None and proc.stderr is not None
        self.dropping = True
        drains = [asyncio.create_task(self._read_pipe(proc.stderr, STDERR))]
        if proc.stdout is not None:  # (detached by its keys: stdout was a pipe)
            drains.append(asyncio.create_task(self._read_pipe(proc.stdout, STDOUT)))
        if self.master is not None:
            drains.append(asyncio.create_task(self._read_master()))
        try:
            code = await proc.wait()
            log.info("detached exec in %s: %r (host pid %d) ended: %d", self.label,
                     self.req.cmd[0], proc.pid, _code(code))
        finally:
            await _stopped(*drains)
            if self.master is not None:  # (closed, not killed: a stopping agent's too)
                os.close(self.master)
                self.master = None
            if proc.stdin is not None:
                proc.stdin.close()

    async def _pump(self) -> int | None:
        """The session: output out, input in, until the command ends (its exit code), the
        client goes away (the command is killed) or detaches (None: it runs on)."""
        proc = self.proc
        assert proc is not None
        outputs = []
        if self.master is not None:
            outputs.append(asyncio.create_task(self._read_master()))
        if proc.stdout is not None:
            outputs.append(asyncio.create_task(self._read_pipe(proc.stdout, STDOUT)))
        assert proc.stderr is not None
        outputs.append(asyncio.create_task(self._read_pipe(proc.stderr, STDERR)))
        # (the client's frames: stdin writes may wait on a full pipe or terminal, so its going
        # away is watched apart, on its connection)
        inputs = asyncio.create_task(self._read_client())
        gone = asyncio.create_task(_until_closed(self.transport))
        waiter = asyncio.create_task(proc.wait())
        try:
            done, _ = await asyncio.wait({waiter, inputs, gone},
                                         return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done and self.detaching:
                return None
            if waiter not in done:  # the client went away: end the command, once nothing
                await _stopped(*outputs, inputs)  # watches its terminal (_kill closes it)
                self._kill()
                await waiter
                return _code(proc.returncode)
            # the command ended: the rest of its output, until its end or DRAIN_IDLE
            # seconds without any (a background process of its may hold the pipes)
            self.active = time.monotonic()
            pending = set(outputs)
            while pending:
                _, pending = await asyncio.wait(pending, timeout=DRAIN_IDLE / 4)
                if pending and not self.sending and \
                        time.monotonic() - self.active > DRAIN_IDLE:
                    break
            return _code(proc.returncode)
        finally:
            await _stopped(*outputs, inputs, gone, waiter)

    async def _read_pipe(self, stream: asyncio.StreamReader, channel: int) -> None:
        while chunk := await stream.read(65536):
            await self._send(channel, chunk)

    async def _read_master(self) -> None:
        assert self.master is not None
        async for chunk in _chunks(self.master):
            await self._send(STDOUT, chunk)

    async def _send(self, channel: int, data: bytes) -> None:
        if self.dropping:
            return
        self.active = time.monotonic()
        self.sending += 1
        try:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(bytes([channel]) + data)  # (waits for a slow client)
        finally:
            self.sending -= 1
            self.active = time.monotonic()

    async def _read_client(self) -> None:
        """Frames from the client until it closes or detaches: stdin, its end, resizes."""
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.BINARY or not msg.data:
                continue
            channel, payload = msg.data[0], msg.data[1:]
            if channel == DETACH:  # (its detach keys: the command runs on, as with -d)
                if self.reserved or self.ex.reserve():
                    self.reserved = self.detaching = True
                    return
                await self._send(STDERR, f"shoal: cannot detach: this node runs "
                                 f"{MAX_DETACHED} detached exec commands already\r\n".encode())
            if channel == STDIN and self.req.stdin:
                await self._write_stdin(payload)
            elif channel == RESIZE and self.master is not None:
                with contextlib.suppress(ValueError, TypeError, KeyError, OverflowError,
                                         RecursionError, OSError, struct.error):
                    size = json.loads(payload)
                    rows, cols = int(size["rows"]), int(size["cols"])
                    if 1 <= rows <= 9999 and 1 <= cols <= 9999:
                        fcntl.ioctl(self.master, termios.TIOCSWINSZ,
                                    struct.pack("HHHH", rows, cols, 0, 0))

    async def _write_stdin(self, payload: bytes) -> None:
        proc = self.proc
        assert proc is not None
        if self.master is not None:  # (a terminal's end of input: its EOF character, ^D)
            await self._write_master(payload or b"\x04")
            return
        if proc.stdin is None or proc.stdin.is_closing():
            return
        try:
            if payload:
                proc.stdin.write(payload)
                await proc.stdin.drain()
            else:
                proc.stdin.close()
        except (ConnectionError, RuntimeError):
            return

    async def _write_master(self, data: bytes) -> None:
        """All of ``data`` to the terminal, waiting while it is full (the client's next
        frame waits meanwhile: back-pressure, as for a pipe)."""
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view and self.master is not None:
            try:
                view = view[os.write(self.master, view):]
            except BlockingIOError:
                await _ready(loop.add_writer, loop.remove_writer, self.master)
            except OSError:  # (the command is gone)
                return

    def _kill(self) -> None:
        """The client left: hang up the terminal, kill the command's session (with a tty
        execdrop made one of its own) and nsenter's."""
        if self.master is not None:
            os.close(self.master)
            self.master = None
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        for child in _children(proc.pid):  # (nsenter's: the command, in the task)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    async def _end(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self._kill()
            with contextlib.suppress(BaseException):
                await asyncio.shield(proc.wait())


def shut_down(sock: Any) -> None:
    """shutdown(2) both ways on a transport's socket: the peer sees the end at once, whoever
    else holds it. Through its descriptor: uvloop's transports give a PseudoSocket, whose
    shutdown() raises TypeError."""
    fd = sock.fileno()
    if fd < 0:
        return
    borrowed = socket.socket(fileno=fd)
    try:
        borrowed.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        borrowed.detach()  # (still the transport's to close)


async def _stopped(*tasks: asyncio.Task[Any]) -> None:
    """Cancels ``tasks`` and waits until they ended: a descriptor they watched (a terminal's
    master) may then be closed. Closed while the loop still watches it, its number can come
    back at once as another exec's pipe, which the loop then refuses (uvloop: FileExistsError
    in the spawn), and the watcher's late removal would take the new owner's watch."""
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _until_closed(transport: Any) -> None:
    """Returns once the client's connection closed (never without one). Its transport alone
    does not say so while aiohttp has paused reading it (a client flooding stdin the command
    does not read): its socket is polled for the peer's hang-up too."""
    if transport is None:
        await asyncio.Event().wait()
    sock = transport.get_extra_info("socket")
    poll = select.poll()
    if sock is not None:
        poll.register(sock.fileno(), select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    while not transport.is_closing() and not poll.poll(0):
        await asyncio.sleep(CLOSE_POLL)


async def _chunks(fd: int) -> AsyncIterator[bytes]:
    """What a non-blocking ``fd`` (a terminal's master, a pipe) gives, as it comes, until its
    end (EOF, or EIO: no process holds the terminal any more)."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await _ready(loop.add_reader, loop.remove_reader, fd)
            continue
        except OSError:
            return
        if not chunk:
            return
        yield chunk


async def _ready(add: Callable[..., Any], remove: Callable[[int], Any], fd: int) -> None:
    """Until ``fd`` is readable (``add`` = loop.add_reader) or writable (add_writer)."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)
    add(fd, wake)
    try:
        await fut
    finally:
        remove(fd)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _code(returncode: int | None) -> int:
    if returncode is None:
        return -1
    return 128 - returncode if returncode < 0 else returncode


# ------------------------------------------------------------------------------ the relay

async def relay(ws: web.WebSocketResponse, http: aiohttp.ClientSession, ctx: Any,
                api_addr: str, node_id: str, task_id: str, request: ExecRequest,
                transport: Any = None) -> None:
    """A manager's part for a task on another node: the same session with that node's agent
    (its peer route ``/v1/cluster/exec``, this node's certificate), frames copied both ways
    until either side ends; the node's status frame reaches the client as it is."""
    url = f"https://{api_addr}/v1/cluster/exec"
    try:
        peer = await http.ws_connect(url, ssl=ctx, server_hostname=pki.node_hostname(node_id),
                                     max_msg_size=1 << 20, heartbeat=HEARTBEAT,
                                     timeout=aiohttp.ClientWSTimeout(ws_close=5))
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Unavailable(f"cannot reach the task's node ({api_addr}): {exc}") from None
    psock = peer.get_extra_info("socket")  # (kept: aiohttp forgets it once closing)
    client_left = False
    try:
        await peer.send_str(json.dumps({"task": task_id, **request.to_json()}))

        async def down() -> None:  # node → client
            async for msg in peer:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)

        async def up() -> None:  # client → node
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.BINARY:
                    await peer.send_bytes(msg.data)

        # (up may wait on the node while the client is gone: its connection is watched apart)
        tasks = [asyncio.create_task(down()), asyncio.create_task(up()),
                 asyncio.create_task(_until_closed(transport))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            client_left = tasks[0] not in done
        finally:
            await _stopped(*tasks)
    finally:
        # The client left: the node's connection is reset, not closed. A node that does not
        # read (its command's stdin full) would get our FIN only after the stdin still in
        # flight, that is never, and its session would wait for ever.
        if client_left and psock is not None:
            with contextlib.suppress(OSError):
                psock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn = getattr(peer, "_conn", None)  # (aiohttp's ws has no public abort)
            link = conn.transport if conn is not None else None
            if link is not None:
                link.abort()  # (now, its unsent stdin dropped: a reset, given the linger)
        try:
            async with asyncio.timeout(2):
                await peer.close()
        except TimeoutError:
            if psock is not None:
                shut_down(psock)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close()


# ------------------------------------------------------------------------------ the routes

def handlers(ctx: Any, runtime: Any, security: Any, executor: Executor,
             peer_of: Callable[[web.Request], Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The API's handlers: ``task_exec`` (the CLI's, local and remote listeners) and
    ``cluster_exec`` (the peer listener's: a manager relaying a session to this node)."""

    async def local(ws: web.WebSocketResponse, task: Task, request: ExecRequest,
                    by: str, transport: Any) -> int | None:
        pid = running_pid(runtime.status(task.id), task)
        label = f"task {task.name} ({task.id}) by {by}"
        _audit(label, request)
        code = await executor.run_local(ws, pid, request, transport, label)
        log.info("exec in %s %s", label, "runs on detached" if code is None else
                 f"ended: {code}")
        return code

    async def task_exec(req: web.Request) -> web.StreamResponse:
        async def start(ws: web.WebSocketResponse) -> int | None:
            request = ExecRequest.parse(await first_message(ws))
            if request.privileged:  # (the node's every capability: an admin's)
                require_admin("exec --privileged (every capability of the node)",
                              "privileged")
            if ctx.identity is None or ctx.store is None:
                raise Conflict("this node is not part of a cluster", "task")
            snap = ctx.store.snapshot()
            task = find_task(snap, req.match_info["ref"])
            if task.status.state is not TaskState.RUNNING:
                raise Conflict(f"task {task.name} ({task.id}) is not running (it is "
                               f"{task.status.state.lower()})", "task")
            if task.node_id == ctx.identity.node_id:
                return await local(ws, task, request, _who(req), req.transport)
            node = snap.nodes.get(task.node_id)
            name = node.hostname if node is not None else task.node_id
            if ctx.raft is None or node is None or ctx.http is None:
                raise Conflict(f"task {task.name} runs on node {name}: run exec against a "
                               "manager (or on that node)", "task")
            _audit(f"task {task.name} ({task.id}) on node {name} by {_who(req)}", request,
                   ", relayed")
            await relay(ws, ctx.http, security.require_client(), node.api_addr, node.id,
                        task.id, request, req.transport)
            return None
        return await serve(req, start)

    async def cluster_exec(req: web.Request) -> web.StreamResponse:
        peer = security.authorize(peer_of(req), manager=True)  # (before the upgrade: 401/403)

        async def start(ws: web.WebSocketResponse) -> int | None:
            raw = await first_message(ws)
            request = ExecRequest.parse(raw)
            snap = ctx.store.snapshot() if ctx.store is not None else None
            task = snap.tasks.get(raw.get("task")) if snap is not None else None
            if task is None:
                # (this node's state may lag the manager's by a moment: the runtime knows)
                tid = raw.get("task")
                status = runtime.status(tid) if isinstance(tid, str) else None
                if status is None:
                    raise NotFound(f"no task {tid!r} on this node", "task")
                label = f"task {tid} by manager {peer.hostname}"
                _audit(label, request)
                return await executor.run_local(ws, running_pid(status, None), request,
                                                req.transport, label)
            return await local(ws, task, request, f"manager {peer.hostname}", req.transport)
        return await serve(req, start)

    return {"task_exec": task_exec}, {"cluster_exec": cluster_exec}


def _audit(label: str, request: ExecRequest, how: str = "") -> None:
    """The log line of a session's start: where, who, the program (quoted: a newline in it
    cannot forge a line) and how it runs."""
    log.info("exec in %s: %r (%d arguments)%s%s%s%s", label, request.cmd[0],
             len(request.cmd) - 1, f" as {request.user!r}" if request.user else "",
             " with a tty" if request.tty else "", " privileged" if request.privileged else "",
             how)


def _who(req: web.Request) -> str:
    """Who asks, for the log: the user the API's guard let by (remote API, dashboard) and
    the client certificate, else the local socket."""
    user = REQUEST_USER.get() or None  # ("": the unix socket's, or an admin certificate's)
    peer = req.transport.get_extra_info("peercert") if req.transport is not None else None
    subject = dict(x[0] for x in peer.get("subject", ())) if peer else {}
    where = f"client {subject.get('commonName', '?')}" if peer else \
        "the dashboard" if user is not None else "the local socket"
    return f"user {user!r} ({where})" if user is not None else where


def running_pid(status: Any, task: Task | None) -> int:
    """The host pid of ``task``'s init from the runtime's ``status``; Conflict if none."""
    if status is None or status.state is not RunState.RUNNING or not status.pid:
        what = f"task {task.name} ({task.id})" if task is not None else "the task"
        raise Conflict(f"{what} is not running on this node", "task")
    return int(status.pid)


__all__ = ["MAX_DETACHED", "MAX_SESSIONS", "ExecRequest", "Executor", "find_task",
           "first_message", "handlers", "relay", "running_pid", "serve"]  # (find_task: views')
