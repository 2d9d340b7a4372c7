"""`shoal exec`, the CLI's side: its arguments as docker's, and the session against a stand-in
for the agent's exec route — a real aiohttp WebSocket server on a unix socket speaking the
protocol of shoal.cli.execcli (the agent's own side is tested with it, in node/'s tests).

The stand-in's "commands" (the request's ``cmd[0]``): ``emit OUT ERR CODE`` writes OUT to
stdout and ERR to stderr and exits CODE; ``cat`` copies stdin to stdout until stdin's end and
exits 0; ``hello`` writes the request it got as JSON (and, with a probe, what the probe saw
meanwhile) and exits 0; ``winch`` waits for a resize frame, writes it and exits 0. Tasks:
``nosuch`` is refused before the upgrade (HTTP 404 and the API's JSON error), ``stopped``
after it (a status frame with an error), ``vanish`` closes the socket without a status.
"""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import os
import signal
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from shoal.cli import execcli
from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.cli.main import build_parser

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- arguments
def parse(*argv: str) -> Any:
    return build_parser().parse_args(["exec", *argv])


def test_the_flags_are_dockers_and_every_word_after_the_task_is_the_commands() -> None:
    a = parse("-i", "-t", "-u", "app", "-w", "/srv", "-e", "A=1", "--env-file", "f",
              "web.1", "ls", "-l", "-e", "--tty")
    assert (a.interactive, a.tty, a.user, a.workdir, a.env, a.env_file, a.task) == \
        (True, True, "app", "/srv", ["A=1"], ["f"], "web.1")
    assert a.command == ["ls", "-l", "-e", "--tty"]  # (the command's own dashes)
    a = parse("--interactive", "--tty", "--user", "0:0", "--workdir", "/", "--env", "B=2",
              "web.1.abcdef", "sh", "-c", "echo -n hi")
    assert (a.interactive, a.tty, a.user, a.workdir, a.env, a.task, a.command) == \
        (True, True, "0:0", "/", ["B=2"], "web.1.abcdef", ["sh", "-c", "echo -n hi"])
    a = parse("-d", "--privileged", "web.1", "true")
    assert (a.detach, a.privileged) == (True, True)
    assert {k: v for k, v in execcli.exec_request(a).items()
            if k in ("detach", "privileged")} == {"detach": True, "privileged": True}
    a = parse("web.1", "-i", "cat")  # (after TASK, docker's flags too are the command's)
    assert (a.interactive, a.command) == (False, ["-i", "cat"])
    assert execcli.exec_request(parse("web.1", "--", "ls", "-a"))["cmd"] == ["ls", "-a"]
    with pytest.raises(CliError, match="needs a command"):
        execcli.exec_request(parse("web.1"))


def test_the_request_merges_env_files_then_dash_e_and_defaults_the_rest(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_SHELL", "shell value")
    monkeypatch.delenv("UNSET_HERE", raising=False)
    (tmp_path / "a.env").write_text("# a comment\nA=from a\nB=from a\n\nFROM_SHELL\n"
                                    "UNSET_HERE\nQUOTED=\"kept\"\n")
    (tmp_path / "b.env").write_text("B=from b\nC=from b\n")
    args = parse("--env-file", str(tmp_path / "a.env"), "--env-file", str(tmp_path / "b.env"),
                 "-e", "C=from -e", "-e", "D=", "web.1", "env")
    assert execcli.exec_request(args) == {
        "cmd": ["env"], "tty": False, "stdin": False, "user": "", "workdir": "",
        "env": {"A": "from a", "B": "from b", "FROM_SHELL": "shell value",
                "QUOTED": "\"kept\"", "C": "from -e", "D": ""},
        "rows": 24, "cols": 80}
    with pytest.raises(CliError, match="--env-file"):
        execcli.exec_request(parse("--env-file", str(tmp_path / "missing"), "web.1", "env"))
    with pytest.raises(CliError, match="--env expects KEY=VALUE"):
        execcli.exec_request(parse("-e", "=x", "web.1", "env"))


# ----------------------------------------------------------------------------- the stand-in
class FakeAgent:
    """The agent's exec route, as the protocol says, recording what the client sent."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.stdin: list[bytes] = []  # stdin frames' payloads, b"" = the end of stdin
        self.probe: Callable[[], Any] | None = None  # called when `hello` runs
        self.queries: list[dict[str, str]] = []  # each request's query string

    async def handle(self, request: web.Request) -> web.StreamResponse:
        task = request.match_info["task"]
        self.queries.append(dict(request.query))
        if task == "nosuch":
            return web.json_response({"error": {"code": "not_found", "field": "",
                                                "message": "no such task: nosuch"}},
                                     status=404)
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        if task == "stopped":
            await self.status(ws, {"error": {"code": "conflict", "field": "",
                                             "message": "task web.1 is not running "
                                             "(complete)"}})
            return ws
        first = await ws.receive()
        assert first.type is WSMsgType.TEXT, first
        req = json.loads(first.data)
        self.requests.append((task, req))
        if task == "vanish":
            await ws.close()
            return ws
        cmd = req["cmd"]
        if cmd[0] == "emit":
            await ws.send_bytes(b"\x01" + cmd[1].encode())
            await ws.send_bytes(b"\x02" + cmd[2].encode())
            await self.status(ws, {"exit_code": int(cmd[3])})
        elif cmd[0] == "cat":
            async for msg in ws:
                assert msg.type is WSMsgType.BINARY and msg.data[:1] == b"\x00", msg
                self.stdin.append(msg.data[1:])
                if not msg.data[1:]:
                    break
                await ws.send_bytes(b"\x01" + msg.data[1:])
            await self.status(ws, {"exit_code": 0})
        elif cmd[0] == "hello":
            seen = self.probe() if self.probe else None
            await ws.send_bytes(b"\x01" + json.dumps([req, seen]).encode())
            await self.status(ws, {"exit_code": 0})
        elif cmd[0] == "nodetach":  # (an agent that cannot detach: the session goes on)
            async for msg in ws:
                self.stdin.append(msg.data)
                if msg.data == b"\x05":
                    await ws.send_bytes(b"\x02shoal: cannot detach\r\n")
                elif msg.data == b"\x00":
                    break
            await self.status(ws, {"exit_code": 0})
        elif cmd[0] == "winch":
            msg = await ws.receive()
            assert msg.type is WSMsgType.BINARY and msg.data[:1] == b"\x04", msg
            await ws.send_bytes(b"\x01" + msg.data[1:])
            await self.status(ws, {"exit_code": 0})
        return ws

    @staticmethod
    async def status(ws: web.WebSocketResponse, body: dict[str, Any]) -> None:
        await ws.send_bytes(b"\x03" + json.dumps(body).encode())
        await ws.close()


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[tuple[FakeAgent, str]]:
    """The stand-in, listening on a unix socket: (it, the CLI's -H)."""
    fake = FakeAgent()
    app = web.Application()
    app.router.add_get("/v1/tasks/{task}/exec", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    sock = tmp_path / "agent.sock"
    await web.UnixSite(runner, str(sock)).start()
    try:
        yield fake, f"unix://{sock}"
    finally:
        await runner.cleanup()


def request(*cmd: str, stdin: bool = False, tty: bool = False) -> dict[str, Any]:
    return {"cmd": list(cmd), "tty": tty, "stdin": stdin, "user": "", "workdir": "",
            "env": {}, "rows": 24, "cols": 80}


async def session(host: str, task: str, req: dict[str, Any], stdin_fd: int | None = None,
                  resize: bool = False, detach: bytes = b"") -> tuple[int, bytes, bytes]:
    out, err = io.BytesIO(), io.BytesIO()
    code = await execcli.session(Client(host), task, req, stdin_fd=stdin_fd, resize=resize,
                                 stdout=out, stderr=err, detach=detach)
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------- the session
async def test_output_goes_to_its_stream_and_the_exit_code_is_the_commands(
        agent: tuple[FakeAgent, str]) -> None:
    fake, host = agent
    assert await session(host, "web.1", request("emit", "to out\n", "to err\n", "3")) == \
        (3, b"to out\n", b"to err\n")
    assert await session(host, "web.1", request("emit", "", "", "0")) == (0, b"", b"")
    assert fake.requests == [("web.1", request("emit", "to out\n", "to err\n", "3")),
                             ("web.1", request("emit", "", "", "0"))]
    assert fake.stdin == []  # (without -i nothing is read, nor sent)


async def test_the_task_name_is_one_url_path_segment(agent: tuple[FakeAgent, str]) -> None:
    fake, host = agent
    await session(host, "web 1/x", request("emit", "", "", "0"))
    assert fake.requests[0][0] == "web 1/x"
    assert fake.queries == [{}]
    c = Client(host)
    c.stale = True  # (`shoal --stale exec`: as every GET of the CLI, ?stale=1)
    await execcli.session(c, "web.1", request("emit", "", "", "0"), stdin_fd=None,
                          resize=False, stdout=io.BytesIO(), stderr=io.BytesIO())
    assert fake.queries[-1] == {"stale": "1"}


async def test_an_agent_that_cannot_detach_keeps_getting_stdin(
        agent: tuple[FakeAgent, str]) -> None:
    """The detach keys become a DETACH frame; the bytes typed after them, and the end of
    stdin, still go to an agent that refused to detach (the terminal stays usable)."""
    fake, host = agent
    r, w = os.pipe()
    try:
        os.write(w, b"ab\x10\x11cd")
        os.close(w)
        code, _, err = await session(host, "web.1", request("nodetach", stdin=True, tty=True),
                                     stdin_fd=r, detach=b"\x10\x11")
    finally:
        os.close(r)
    assert code == 0 and b"cannot detach" in err
    assert fake.stdin == [b"\x00ab", b"\x05", b"\x00cd", b"\x00"], fake.stdin


async def test_stdin_from_a_pipe_is_forwarded_then_its_end(
        agent: tuple[FakeAgent, str]) -> None:
    fake, host = agent
    r, w = os.pipe()
    try:
        async def feed() -> None:
            for part in (b"first\n", b"second\n"):
                await asyncio.sleep(0.05)
                os.write(w, part)
            os.close(w)
        feeder = asyncio.create_task(feed())
        code, out, _ = await session(host, "web.1", request("cat", stdin=True), stdin_fd=r)
        await feeder
    finally:
        os.close(r)
    assert (code, out) == (0, b"first\nsecond\n")
    assert b"".join(fake.stdin) == b"first\nsecond\n" and fake.stdin[-1] == b""


@pytest.mark.parametrize("source", ["file", "/dev/null"])
async def test_stdin_from_a_regular_file_or_dev_null_is_read_too(
        agent: tuple[FakeAgent, str], tmp_path: Path, source: str) -> None:
    """epoll takes neither: they are read in a thread."""
    fake, host = agent
    data = os.urandom(200_000) if source == "file" else b""
    path = tmp_path / "in"
    path.write_bytes(data)
    fd = os.open(path if source == "file" else source, os.O_RDONLY)
    try:
        code, out, _ = await session(host, "web.1", request("cat", stdin=True), stdin_fd=fd)
    finally:
        os.close(fd)
    assert (code, out) == (0, data)
    assert fake.stdin[-1] == b"" and len(fake.stdin) == (5 if data else 1)  # 64 KiB frames


async def test_a_refusal_before_the_upgrade_is_the_apis_error_message(
        agent: tuple[FakeAgent, str]) -> None:
    _, host = agent
    with pytest.raises(CliError, match=r"^no such task: nosuch$"):
        await session(host, "nosuch", request("emit", "", "", "0"))
    assert str(execcli.refused(502, b"<html>bad gateway</html>")) == \
        "the agent refused the exec session (HTTP 502)"


async def test_a_status_frame_with_an_error_is_a_cli_error(
        agent: tuple[FakeAgent, str]) -> None:
    _, host = agent
    with pytest.raises(CliError, match=r"^task web.1 is not running \(complete\)$"):
        await session(host, "stopped", request("emit", "", "", "0"))


async def test_a_socket_closed_without_a_status_is_a_cli_error(
        agent: tuple[FakeAgent, str]) -> None:
    _, host = agent
    with pytest.raises(CliError, match="ended without an exit status"):
        await session(host, "vanish", request("emit", "", "", "0"))


async def test_no_agent_is_a_cli_error(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="cannot connect to the shoal agent"):
        await session(f"unix://{tmp_path}/none.sock", "web.1", request("emit", "", "", "0"))


async def test_sigwinch_sends_the_new_size(agent: tuple[FakeAgent, str]) -> None:
    """(stdout is not a terminal here: the size sent is the default one)"""
    _, host = agent
    before = signal.getsignal(signal.SIGWINCH)

    async def resizes() -> None:  # (until one arrives after the session's handler is set)
        while True:
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGWINCH)
    resizer = asyncio.create_task(resizes())
    try:
        code, out, _ = await session(host, "web.1", request("winch", tty=True), resize=True)
    finally:
        resizer.cancel()
    assert (code, json.loads(out)) == (0, {"rows": 24, "cols": 80})
    assert signal.getsignal(signal.SIGWINCH) == before  # (left as it was)


async def test_a_malformed_status_is_a_cli_error() -> None:
    assert execcli.exit_status(b'{"exit_code": 137}') == 137
    assert execcli.exit_status(b'{"detached": true}') == 0  # (-d: the command started)
    for bad in (b"", b"[]", b'{"exit_code": "1"}', b'{"exit_code": true}'):
        with pytest.raises(CliError, match="malformed status"):
            execcli.exit_status(bad)


async def test_a_remote_api_is_reached_over_mutual_tls_with_the_client_certificate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """-H tcp://ADDR:PORT --tls-dir DIR: the cluster CA is the trust anchor, the client
    presents DIR's certificate, and SHOAL_TOKEN is sent as the API's other calls send it."""
    from shoal.node import pki

    now = time.time()
    ca_pem, ca_key = pki.create_ca("cluster-1", now)
    ca = pki.CertificateAuthority(ca_pem, ca_key)

    def issue(where: Path, subject: str, role: str) -> None:
        key = pki.new_key()
        where.mkdir()
        (where / "cert.pem").write_bytes(ca.issue(pki.make_csr(key), subject, role,
                                                  "cluster-1", now, 3600.0, "127.0.0.1"))
        (where / "key.pem").write_bytes(pki.key_pem(key))
        (where / "ca.pem").write_bytes(ca_pem)
        (where / "both.pem").write_bytes(pki.key_pem(key) + (where / "cert.pem").read_bytes())

    issue(tmp_path / "node", "node-1", pki.ROLE_MANAGER)
    issue(tmp_path / "client", "alice", pki.ROLE_CLIENT)
    seen: list[tuple[str, str]] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peer = request.transport.get_extra_info("peercert")
        seen.append((dict(x[0] for x in peer["subject"])["commonName"],
                     request.headers.get("Authorization", "")))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()
        await FakeAgent.status(ws, {"exit_code": 5})
        return ws

    app = web.Application()
    app.router.add_get("/v1/tasks/{task}/exec", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=pki.server_context(
        ca_pem, tmp_path / "node" / "both.pem", require_client_cert=True))
    await site.start()
    try:
        port = runner.addresses[0][1]
        monkeypatch.setenv("SHOAL_TOKEN", "tok-1")
        c = Client(f"tcp://127.0.0.1:{port}", tls_dir=str(tmp_path / "client"))
        out, err = io.BytesIO(), io.BytesIO()
        assert await execcli.session(c, "web.1", request("true"), stdin_fd=None,
                                     resize=False, stdout=out, stderr=err) == 5
        assert seen == [("alice", "Bearer tok-1")]
        other_ca, _ = pki.create_ca("cluster-2", now)
        (tmp_path / "client" / "ca.pem").write_bytes(other_ca)  # (another cluster's CA)
        c = Client(f"tcp://127.0.0.1:{port}", tls_dir=str(tmp_path / "client"))
        with pytest.raises(CliError, match="not a node of the cluster in --tls-dir"):
            await execcli.session(c, "web.1", request("true"), stdin_fd=None, resize=False,
                                  stdout=out, stderr=err)
    finally:
        await runner.cleanup()


# ----------------------------------------------------------------------------- the command
async def shoal(host: str, *argv: str, stdin: Any = None, stdout: Any = asyncio.subprocess.PIPE,
                input: bytes | None = None) -> tuple[int, bytes, bytes]:
    """The real CLI in a child process, against the stand-in in this one."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "from shoal.cli.main import main; main()", "-H", host, *argv,
        stdin=asyncio.subprocess.PIPE if input is not None else stdin, stdout=stdout,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(input), 60)
    assert proc.returncode is not None
    return proc.returncode, out or b"", err


async def test_the_cli_exits_with_the_commands_status_and_prints_errors_as_one_line(
        agent: tuple[FakeAgent, str]) -> None:
    fake, host = agent
    assert await shoal(host, "exec", "web.1", "emit", "out\n", "err --force=false\n", "7",
                       input=b"never read") == (7, b"out\n", b"err --force=false\n")
    assert fake.stdin == []  # (no -i: stdin is not read)
    code, out, err = await shoal(host, "exec", "-i", "-e", "A=1", "web.1", "cat", "-n",
                                 input=b"line 1\nline 2\n")
    assert (code, out, err) == (0, b"line 1\nline 2\n", b"")
    assert fake.requests[-1] == ("web.1", {**request("cat", "-n", stdin=True), "env": {"A": "1"}})
    assert fake.stdin[-1] == b""
    assert await shoal(host, "exec", "nosuch", "ls") == (1, b"", b"Error: no such task: nosuch\n")
    assert await shoal(host, "exec", "vanish", "ls") == (
        1, b"", f"Error: {execcli.LOST}\n".encode())


async def test_with_a_terminal_it_is_raw_meanwhile_and_restored_after(
        agent: tuple[FakeAgent, str]) -> None:
    """-it on a terminal: the request carries its size, the terminal is in raw mode while
    the command runs, and as it was after."""
    fake, host = agent
    main, tty = os.openpty()
    try:
        fcntl.ioctl(tty, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        before = termios.tcgetattr(tty)
        fake.probe = lambda: bool(termios.tcgetattr(tty)[3] & termios.ICANON)
        code, _, err = await shoal(host, "exec", "-it", "web.1", "hello", stdin=tty,
                                   stdout=tty)
        assert (code, err) == (0, b"")
        assert termios.tcgetattr(tty) == before
        os.set_blocking(main, False)
        req, canonical = json.loads(os.read(main, 65536))
    finally:
        os.close(main)
        os.close(tty)
    assert (req["tty"], req["stdin"], req["rows"], req["cols"]) == (True, True, 33, 101)
    assert canonical is False  # (raw while the command ran)


def test_detach_keys_are_dockers_and_a_bad_one_is_named() -> None:
    assert execcli.detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert execcli.detach_keys("ctrl-@,ctrl-\\,ctrl-_,a") == b"\x00\x1c\x1fa"
    assert execcli.detach_keys("") == b""
    for bad, what in (("ctrl-pp", "unknown control character 'ctrl-pp'"),
                      ("ab", "unknown character 'ab'"), ("ctrl-p,,x", "unknown character ''")):
        with pytest.raises(CliError, match=what) as exc:
            execcli.detach_keys(bad)
        assert exc.value.field == "--detach-keys"


def test_the_escape_filter_holds_a_partial_sequence_back_and_finds_a_split_one() -> None:
    f = execcli.EscapeFilter(b"\x10\x11")
    assert f.feed(b"ls\x10") == (b"ls", False, b"")  # (^P held: it may start the sequence)
    assert f.feed(b"x") == (b"\x10x", False, b"")  # broken: sent, late
    assert f.feed(b"a\x10") == (b"a", False, b"")
    assert f.feed(b"\x11rest") == (b"", True, b"rest")  # split across reads; then the rest
    g = execcli.EscapeFilter(b"\x10\x10\x11")
    assert g.feed(b"\x10\x10\x10\x11") == (b"\x10", True, b"")  # (an overlapping start)
