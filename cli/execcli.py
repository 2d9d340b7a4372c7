"""`shoal exec`: a command in a running task, on whichever node runs it (`docker exec`).

Owns: the `exec` command's arguments (``add_parser``), the request it sends
(``exec_request``), and the client side of an exec session (``run``, which also puts the
terminal in raw mode and always restores it; ``session``, the WebSocket conversation):
relaying this process's stdin to the command and its output to this process's stdout and
stderr, terminal resizes (SIGWINCH), and the command's exit status as the CLI's. Must not
touch: the agent's side (shoal.node.execs names the task and runs the command; a manager
relays to the task's node), the host and TLS settings (shoal.cli.client's ``Client``), other
commands. aiohttp is imported only when a session starts: a `shoal service ls` never imports
this module, and `shoal --help` imports it without aiohttp.

Protocol (Kubernetes' channel.k8s.io): ``GET /v1/tasks/{TASK}/exec`` upgraded to a WebSocket.
The client's first message is a text frame, the request as JSON (``exec_request``); then
binary frames whose first byte is the ``Channel``: stdin (client → agent; an empty payload is
the end of stdin), stdout, stderr (with a tty all output is stdout), status (agent → client,
the last frame: ``{"exit_code": N}``, or ``{"error": {"code", "message", "field"}}`` when the
command could not run, or ``{"detached": true}`` once a ``detach`` command started or the
client detached), resize (client → agent, ``{"rows", "cols"}``) and detach (client → agent:
the detach keys were typed; the command runs on).

Errors: ``CliError`` (printed as one line, the CLI's exit status 1) for a refusal — before
the upgrade, an HTTP error reply with the API's JSON error body; after it, a status frame
with an error — for an agent that cannot be reached, and for a session that ends without an
exit status. The command's own failure is its exit status, not an error.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import sys

from shoal.cli.errors import CliError

# typing.TYPE_CHECKING without importing typing (see shoal.cli.main)
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    import asyncio
    from collections.abc import Iterator
    from typing import Any, BinaryIO

    import aiohttp

    from shoal.cli.client import Client

CHUNK = 65536  # bytes of stdin read (and sent in one frame) at a time
DEFAULT_SIZE = (24, 80)  # rows, cols sent without a terminal on stdout (docker's default)
LOST = "the exec session ended without an exit status (the node or its agent went away)"


class Channel(enum.IntEnum):
    """The first byte of a binary frame (only append: the numbers are the protocol)."""

    STDIN = 0  # client → agent; an empty payload: the end of stdin
    STDOUT = 1  # agent → client (with a tty: all of the command's output)
    STDERR = 2  # agent → client
    STATUS = 3  # agent → client, JSON, the last frame: {"exit_code": N} or {"error": {...}}
    RESIZE = 4  # client → agent, JSON {"rows": R, "cols": C}
    DETACH = 5  # client → agent, empty: leave the command running (its detach keys typed)


DETACH_KEYS = "ctrl-p,ctrl-q"  # docker's default
# docker's names of the control characters: ctrl-@ is 0, ctrl-a 1 ... ctrl-_ 31
_CTRL = ["ctrl-@", *(f"ctrl-{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "ctrl-[", "ctrl-\\",
         "ctrl-]", "ctrl-^", "ctrl-_"]


def detach_keys(spec: str) -> bytes:
    """docker's ``--detach-keys``: comma-separated keys, each one character or ``ctrl-X``
    (X a letter or one of ``@[\\]^_``); "" = none. CliError naming the key otherwise."""
    out = bytearray()
    for key in spec.split(",") if spec else []:
        if len(key) == 1:
            out += key.encode()
        elif key in _CTRL:
            out.append(_CTRL.index(key))
        else:
            raise CliError(f"--detach-keys: unknown {'control ' if key.startswith('ctrl-') else ''}"
                           f"character {key!r} (e.g. ctrl-p,ctrl-q or ctrl-a,x)", "--detach-keys")
    return bytes(out)


class EscapeFilter:
    """Watches stdin for the detach keys (docker's escape proxy): the bytes of a possible
    start of the sequence are held back until it is complete (detach) or broken (sent)."""

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self.held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool, bytes]:
        """(what to send now, whether the whole sequence was typed, the bytes after it —
        not looked at yet: feed them again)."""
        out = bytearray()
        for i in range(len(data)):
            self.held += data[i:i + 1]
            if self.held == self.keys:
                self.held = b""
                return bytes(out), True, data[i + 1:]
            while self.held and not self.keys.startswith(self.held):
                out += self.held[:1]
                self.held = self.held[1:]
        return bytes(out), False, b""


# ----------------------------------------------------------------------------- arguments
def add_parser(sub: Any) -> None:
    """The `exec` command under the top-level sub-parsers (shoal.cli.main's _GROUPS)."""
    import argparse

    e = sub.add_parser("exec", help="run a command in a running task, on whichever node runs "
                       "it (docker exec)",
                       usage="%(prog)s [OPTIONS] TASK COMMAND [ARG...]",
                       description="Run COMMAND in a running task's namespaces, as its user "
                       "(or --user), in its working directory (or --workdir), with its "
                       "environment plus -e/--env-file. The CLI exits with the command's "
                       "exit status.")
    e.add_argument("-i", "--interactive", action="store_true",
                   help="send this shell's stdin to the command (default: it reads nothing)")
    e.add_argument("-t", "--tty", action="store_true",
                   help="give the command a pseudo-terminal (its stdout and stderr merged); "
                   "with -i on a terminal, this one is put in raw mode meanwhile")
    e.add_argument("-d", "--detach", action="store_true",
                   help="start the command and return: it runs on in the task, its output "
                   "dropped (with -i its stdin stays open, with -t it keeps its terminal)")
    e.add_argument("--detach-keys", default=DETACH_KEYS, metavar="KEYS",
                   help="with -i -t, the keys that leave the command running and return "
                   f"(default {DETACH_KEYS}; \"\" for none)")
    e.add_argument("--privileged", action="store_true",
                   help="give the command every capability of the node's, not only the "
                   "task's")
    e.add_argument("-u", "--user", default="", metavar="USER",
                   help="<name|uid>[:<group|gid>] to run as, looked up in the task's own "
                   "/etc/passwd and /etc/group (default: the task's user)")
    e.add_argument("-w", "--workdir", default="", metavar="DIR",
                   help="working directory inside the task (default: the task's)")
    e.add_argument("-e", "--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the command (repeatable; a bare KEY "
                   "takes this shell's value)")
    e.add_argument("--env-file", action="append", default=[], dest="env_file",
                   metavar="FILE", help="environment variables from FILE: KEY=VALUE lines "
                   "as docker's (# comments; a bare KEY takes this shell's value); later "
                   "files, then -e, win")
    e.add_argument("task", metavar="TASK",
                   help="a task id, a unique prefix of one, SERVICE.SLOT or SERVICE.SLOT.ID")
    e.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]",
                   help="the command; every word after TASK is its own, dashes included")


def terminal_size(tty: bool) -> tuple[int, int]:
    """(rows, cols) of the terminal on stdout when ``tty``; else, or without one, 24 x 80."""
    if tty:
        try:
            size = os.get_terminal_size(sys.stdout.fileno())
        except (AttributeError, ValueError, OSError):
            return DEFAULT_SIZE
        if size.lines > 0 and size.columns > 0:
            return size.lines, size.columns
    return DEFAULT_SIZE


def exec_request(args: argparse.Namespace) -> dict[str, Any]:
    """The session's first message, from `shoal exec`'s arguments: the command, its
    environment (--env-file files, then -e, the later winning), user, workdir, tty size."""
    from shoal.cli.flagvalues import parse_kv, read_env_files

    command = list(args.command)
    if command[:1] == ["--"]:  # (`shoal exec TASK -- CMD`, as `service create -- CMD`)
        command = command[1:]
    if not command:
        raise CliError("exec needs a command after the task: shoal exec [OPTIONS] TASK "
                       "COMMAND [ARG...]")
    env = {**read_env_files(args.env_file), **parse_kv(args.env, "--env")}
    rows, cols = terminal_size(args.tty)
    request = {"cmd": command, "tty": bool(args.tty), "stdin": bool(args.interactive),
               "user": args.user, "workdir": args.workdir, "env": env, "rows": rows,
               "cols": cols}
    # (only when asked: an agent older than these refuses nothing it does not know, and
    # would run the command attached or unprivileged)
    request.update({k: True for k in ("detach", "privileged") if getattr(args, k)})
    return request


# ----------------------------------------------------------------------------- the session
def run(c: Client, args: argparse.Namespace) -> int:
    """`shoal exec`: the command's exit status (the CLI exits with it)."""
    import asyncio

    request = exec_request(args)
    attached = not args.detach  # (-d: nothing of this terminal's goes to the command)
    keys = detach_keys(args.detach_keys) if attached and args.interactive and args.tty else b""
    raw = attached and args.tty and args.interactive and os.isatty(0)
    with raw_terminal(0 if raw else None):
        return asyncio.run(session(
            c, args.task, request, stdin_fd=0 if args.interactive and attached else None,
            resize=attached and bool(args.tty) and _isatty(sys.stdout),
            stdout=sys.stdout.buffer, stderr=sys.stderr.buffer, detach=keys))


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # (closed, or replaced by something without it)
        return False


@contextlib.contextmanager
def raw_terminal(fd: int | None) -> Iterator[None]:
    """The terminal on ``fd`` in raw mode (keys, Ctrl-C included, go to the command) until
    the block ends, however it ends; ``None``: nothing to do."""
    if fd is None:
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd, termios.TCSANOW)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


async def session(c: Client, task: str, request: dict[str, Any], *, stdin_fd: int | None,
                  resize: bool, stdout: BinaryIO, stderr: BinaryIO, detach: bytes = b"") -> int:
    """One exec session with the agent ``c`` names: ``request`` (exec_request's) runs in
    ``task``; ``stdin_fd`` (None: no stdin) is sent to it — until the ``detach`` keys come
    there, which leave the command running (exit 0) —, its output written to ``stdout``
    and ``stderr``; with ``resize``, SIGWINCH sends this terminal's new size. Returns the
    command's exit status; SIGTERM or SIGHUP end the session (128 + the signal) so that the
    terminal is restored and the socket closed, not left as a killed process leaves them."""
    import asyncio
    import signal

    me = asyncio.current_task()
    stopped: list[int] = []

    def stop(signum: int) -> None:
        stopped.append(signum)
        if me is not None:
            me.cancel()

    try:
        with _signals({signal.SIGTERM: lambda: stop(signal.SIGTERM),
                       signal.SIGHUP: lambda: stop(signal.SIGHUP)}):
            return await _connect(c, task, request, stdin_fd, resize, stdout, stderr, detach)
    except asyncio.CancelledError:
        if not stopped or me is None:
            raise
        me.uncancel()
        return 128 + stopped[0]


@contextlib.contextmanager
def _signals(handlers: dict[int, Any]) -> Iterator[None]:
    """``handlers`` (signal → callback) on the running loop while the block runs; then each
    signal's disposition as it was (asyncio's remove_signal_handler would leave SIG_DFL)."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    before = {sig: signal.getsignal(sig) for sig in handlers}
    try:
        for sig, callback in handlers.items():
            loop.add_signal_handler(sig, callback)
        yield
    finally:
        for sig, previous in before.items():
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


async def _connect(c: Client, task: str, request: dict[str, Any], stdin_fd: int | None,
                   resize: bool, stdout: BinaryIO, stderr: BinaryIO, detach: bytes = b""
                   ) -> int:
    """The WebSocket to the agent, its refusal or failure as a CliError, then _converse."""
    import aiohttp

    refusal: list[bytes] = []

    async def keep_refusal(_session: aiohttp.ClientSession, _ctx: Any,
                           params: aiohttp.TraceRequestEndParams) -> None:
        # (aiohttp's WSServerHandshakeError drops the reply's body: read it here, first)
        if params.response.status >= 400:
            with contextlib.suppress(TimeoutError, aiohttp.ClientError):
                refusal.append(await params.response.read())

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(keep_refusal)
    url, connector, headers = _endpoint(c, task)
    async with aiohttp.ClientSession(
            connector=connector, trace_configs=[trace],
            timeout=aiohttp.ClientTimeout(total=None, connect=c.timeout)) as http:
        try:
            ws = await http.ws_connect(url, headers=headers, heartbeat=None, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            raise refused(exc.status, b"".join(refusal)) from None
        except aiohttp.ClientConnectorCertificateError as exc:
            raise CliError(f"the server at {c.host} is not a node of the cluster in "
                           f"--tls-dir: {exc.certificate_error}") from None
        except aiohttp.ClientSSLError:
            raise CliError(f"the agent at {c.host} refused the TLS connection: is its remote "
                           "API on, and the client certificate this cluster's and not "
                           "expired?") from None
        except aiohttp.ClientConnectorError as exc:
            if isinstance(exc.os_error, PermissionError):
                raise CliError(f"permission denied on {c.path}: the agent's socket is for "
                               "root only") from None
            raise CliError(f"cannot connect to the shoal agent at {c.host}: is it running? "
                           "(start it with `shoal agent --advertise-addr IP`)") from None
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise CliError(f"cannot talk to the agent at {c.host}: {exc or 'timed out'}"
                           ) from None
        async with ws:
            return await _converse(ws, request, stdin_fd, resize, stdout, stderr, detach)


def _endpoint(c: Client, task: str) -> tuple[Any, aiohttp.BaseConnector, dict[str, str]]:
    """(the exec URL, a connector, headers) for the agent ``c`` talks to: its unix socket,
    or a manager's remote API over mutual TLS with ``c``'s client certificate."""
    from urllib.parse import quote

    import aiohttp
    from yarl import URL

    path = f"/v1/tasks/{quote(task, safe='')}/exec" + ("?stale=1" if c.stale else "")
    if c.path:  # (the host part of the URL is not used on a unix socket)
        return URL("http://shoal" + path, encoded=True), aiohttp.UnixConnector(path=c.path), {}
    # (Client parsed -H tcp://ADDR:PORT and loaded --tls-dir when it was made: its settings)
    name, port = c._addr
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    headers = {}
    if os.environ.get("SHOAL_TOKEN"):  # act as that user (`shoal user token`), as Client does
        headers["Authorization"] = f"Bearer {os.environ['SHOAL_TOKEN']}"
    return (URL(f"https://{name}:{port}{path}", encoded=True),
            aiohttp.TCPConnector(ssl=c._tls or True), headers)


def refused(status: int, body: bytes) -> CliError:
    """The CliError of an exec the agent refused before the upgrade (HTTP ``status``, the
    API's JSON error ``body``)."""
    try:
        reply = json.loads(body) if body else {}
    except ValueError:
        reply = {}
    err = reply.get("error") if isinstance(reply, dict) else None
    if not isinstance(err, dict):
        err = {}
    return CliError(str(err.get("message") or f"the agent refused the exec session (HTTP "
                                                f"{status})"), str(err.get("field") or ""))


def exit_status(payload: bytes) -> int:
    """The exit status a status frame carries (0 for a command that runs on detached, -d);
    its error as a CliError."""
    try:
        status = json.loads(payload)
    except ValueError:
        status = None
    if isinstance(status, dict) and isinstance(status.get("error"), dict):
        err = status["error"]
        raise CliError(str(err.get("message") or "the command could not run"),
                       str(err.get("field") or ""))
    if isinstance(status, dict) and status.get("detached") is True:
        return 0
    code = status.get("exit_code") if isinstance(status, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        raise CliError(f"the exec session sent a malformed status: {payload[:200]!r}")
    return code


async def _converse(ws: aiohttp.ClientWebSocketResponse, request: dict[str, Any],
                    stdin_fd: int | None, resize: bool, stdout: BinaryIO,
                    stderr: BinaryIO, detach: bytes = b"") -> int:
    """The session after the upgrade: the request, then frames both ways until the status."""
    import asyncio
    import signal

    await ws.send_str(json.dumps(request))
    helpers: set[asyncio.Task[None]] = set()

    def spawn(frame: Any) -> None:
        task = asyncio.create_task(frame)
        helpers.add(task)
        task.add_done_callback(helpers.discard)

    def resized() -> None:
        rows, cols = terminal_size(True)
        spawn(_send(ws, Channel.RESIZE, json.dumps({"rows": rows, "cols": cols}).encode()))

    if stdin_fd is not None:
        spawn(_send_stdin(ws, stdin_fd, EscapeFilter(detach) if detach else None))
    code: int | None = None
    try:
        with _signals({signal.SIGWINCH: resized} if resize else {}):
            code = await _receive(ws, stdout, stderr)
    finally:
        for task in list(helpers):
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    if code is None:
        raise CliError(LOST)
    return code


async def _receive(ws: aiohttp.ClientWebSocketResponse, stdout: BinaryIO,
                   stderr: BinaryIO) -> int | None:
    """The command's output written out as it comes; its exit status, from the status frame
    (None: the socket closed before one came)."""
    import aiohttp

    async for msg in ws:
        if msg.type is aiohttp.WSMsgType.ERROR:
            return None
        if msg.type is not aiohttp.WSMsgType.BINARY or not msg.data:
            continue  # (text frames: none are defined for the agent to send)
        channel, payload = msg.data[0], msg.data[1:]
        if channel == Channel.STDOUT or channel == Channel.STDERR:
            out = stdout if channel == Channel.STDOUT else stderr
            out.write(payload)
            out.flush()
        elif channel == Channel.STATUS:
            return exit_status(payload)
        # (other channels: from a newer agent, not for this client)
    return None


async def _send(ws: aiohttp.ClientWebSocketResponse, channel: Channel, payload: bytes) -> bool:
    """Send one frame; False when the session has ended meanwhile."""
    import aiohttp

    try:
        await ws.send_bytes(bytes([channel]) + payload)
    except (ConnectionError, aiohttp.ClientError):
        return False
    return True


async def _send_stdin(ws: aiohttp.ClientWebSocketResponse, fd: int,
                      escape: EscapeFilter | None = None) -> None:
    """``fd``'s bytes to the command as they come, then the end of stdin (an empty frame);
    the detach keys ``escape`` sees become a DETACH frame instead (the session then ends
    with the agent's status; an agent that refuses keeps getting stdin).
    A pipe, socket or terminal is read when the event loop sees it readable; a regular file
    or /dev/null (which epoll refuses, and which never block) in a thread."""
    import asyncio

    loop = asyncio.get_running_loop()
    try:
        loop.add_reader(fd, lambda: None)
    except (OSError, ValueError):
        pollable = False
    else:
        loop.remove_reader(fd)
        pollable = True
    while True:
        if pollable:
            data = await _read_when_ready(loop, fd)
        else:
            data = await loop.run_in_executor(None, _read, fd)
        if data is None:
            continue
        eof, rest = not data, data
        while True:
            detached = False
            if escape is None:
                now, rest = rest, b""
            elif eof:  # (at the end, what it held back goes first)
                now, rest = escape.held, b""
            else:
                now, detached, rest = escape.feed(rest)
            if now and not await _send(ws, Channel.STDIN, now):
                return
            # (stdin goes on after a DETACH: an agent that cannot detach keeps the session,
            # which must stay usable; one that detaches ends it with its status)
            if detached and not await _send(ws, Channel.DETACH, b""):
                return
            if not rest:
                break
        if eof:  # (an empty stdin frame: its end)
            await _send(ws, Channel.STDIN, b"")
            return


async def _read_when_ready(loop: asyncio.AbstractEventLoop, fd: int) -> bytes | None:
    """``fd`` read once the loop sees it readable (a blocking read then returns at once)."""
    ready: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)
    return _read(fd)


def _read(fd: int) -> bytes | None:
    """Up to CHUNK bytes of ``fd``: b"" at its end (or a hung-up terminal), None when there
    is nothing yet after all (a non-blocking descriptor someone else shares)."""
    try:
        return os.read(fd, CHUNK)
    except BlockingIOError:
        return None
    except OSError:  # (EIO: the terminal went away; EBADF: stdin was closed)
        return b""
