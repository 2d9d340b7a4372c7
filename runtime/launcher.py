"""The compiled task launcher: building it, and the agent's side of its two pipes (the launch
spec it reads, the ready pipe it answers on).

Owns: ``launcher.c``, ``execdrop.c`` and ``sendfd.h`` (package data) and the binaries built
from them in a cache directory (``shoal-launcher-<source digest>``,
``shoal-execdrop-<digest>``); the encoding of the spec pipe (:class:`Spec`, :func:`send_spec`)
and the decoding of the ready pipe (:func:`read_pid`, :func:`read_ready`).
Must not touch: anything else in that directory; processes and task state (runtime/process.py
spawns the launcher and decides what a ready byte means for the task).

Why a compiled launcher: every step between "start" and the command (cgroup join, namespaces,
~30 mount operations, pivot_root, capabilities, user, no_new_privs, the log pump) is a syscall or
two; doing them with util-linux tools costs one exec (1-2 ms) each, a Python launcher ~10 ms of
interpreter start. One small C program (like runc's nsexec / crun) does it all in ~1 ms and also
serves as the per-task shim (a ~1 MB process) that outlives the agent. It is built once per
source version with the host's C compiler (Debian: gcc + libc6-dev) and cached; statically
linked where the host has a static libc (Debian's libc6-dev does): its exec then skips the
dynamic loader, ~0.13 ms of every start.

The spec is a list of records ``TAG LEN(u32 LE) DATA`` written by the agent on the launcher's
stdin, ending with an ``E`` record (see the header of launcher.c for the tags and ops).

The ready pipe (launcher → agent): the shim writes ``P<init host pid>\\n`` right after the clone,
then the init writes one byte — ``R`` (tini is about to be exec'ed; the pipe is close-on-exec,
so EOF follows), ``N`` (command not found) — or nothing (the launcher failed; EOF).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

from shoal.runtime.errors import ConfigError, LaunchFailed

SOURCE = Path(__file__).with_name("launcher.c")
EXECDROP = Path(__file__).with_name("execdrop.c")
# the headers both include ("sendfd.h"): a binary's name is the digest of its source, these
# and the flags, so a change to one rebuilds both
HEADERS = (Path(__file__).with_name("sendfd.h"), Path(__file__).with_name("filter.h"))

# mount(2) flags used by the plan.
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000


def ensure_launcher(cache_dir: Path, cc: str = "cc") -> Path:
    """The launcher binary for the current source, compiled into ``cache_dir`` if missing.
    Raise ConfigError if it cannot be built (no compiler, no libc headers)."""
    return build(SOURCE, "shoal-launcher", "task launcher", cache_dir, cc)


def ensure_execdrop(cache_dir: Path, cc: str = "cc") -> Path:
    """``shoal-execdrop`` (execdrop.c: run a command with a task's credentials and
    capabilities; the exec health checks use it), compiled into ``cache_dir`` if missing.
    Static only: nsenter runs it inside the task's root, where a dynamic one's loader and
    libc would be the task's own files, run as root with every capability."""
    return build(EXECDROP, "shoal-execdrop", "exec helper", cache_dir, cc, static_only=True)


# (hardening: the exec helper parses files of the task's while it is root)
CFLAGS = ("-O2", "-Wall", "-fstack-protector-strong", "-D_FORTIFY_SOURCE=2")


def build(source: Path, name: str, what: str, cache_dir: Path, cc: str = "cc",
          static_only: bool = False) -> Path:
    """``cache_dir/NAME-<digest of the source, HEADERS and CFLAGS>``, compiled from
    ``source`` (statically where the host has a static libc; ``static_only``: or not at all)
    if missing. ConfigError if it cannot be built."""
    try:
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in (source, *HEADERS))
                                + " ".join(CFLAGS).encode()).hexdigest()[:16]
    except OSError as exc:
        raise ConfigError(f"{what} source missing: {source}: {exc}") from exc
    target = cache_dir / f"{name}-{digest}"
    if os.access(target, os.X_OK):
        return target
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".build-", dir=cache_dir)
        os.close(fd)
    except OSError as exc:
        raise ConfigError(f"cannot create {cache_dir}: {exc}") from exc
    try:
        # dynamic if the host has no static libc (not for static_only)
        for link in (["-static"],) if static_only else (["-static"], []):
            res = subprocess.run(
                [cc, *CFLAGS, *link, "-o", tmp, str(source)],
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if res.returncode == 0:
                break
    except (OSError, subprocess.TimeoutExpired) as exc:
        os.unlink(tmp)
        raise ConfigError(
            f"cannot build the {what} with {cc!r} ({exc}); install a C compiler "
            "(Debian: gcc libc6-dev) or set RuntimeConfig.launcher_path"
        ) from exc
    if res.returncode != 0:
        os.unlink(tmp)
        must = " (it must be static: install the static libc, Debian libc6-dev)" \
            if static_only else ""
        raise ConfigError(f"building the {what} failed{must}: {res.stderr.strip()[-2000:]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, target)
    return target


MAX_RECORDS = 4096  # launcher.c's MAX_ITEMS: the records of one spec, the end record included


class Spec:
    """Builds the launcher's stdin. Text fields must not contain NUL (validated upstream)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def add(self, tag: str, data: str | bytes) -> None:
        raw = data.encode() if isinstance(data, str) else data
        self._parts.append(tag.encode() + struct.pack("<I", len(raw)) + raw)

    def fields(self, tag: str, *items: str | int) -> None:
        self.add(tag, b"\0".join(str(i).encode() for i in items) + b"\0")

    # -- mount-plan ops (see launcher.c)

    def mount(
        self,
        where: str,
        target: str,
        fstype: str = "",
        source: str = "",
        flags: int = 0,
        data: str = "",
        kind: str = "dir",
        remount: int = 0,
        optional: bool = False,
    ) -> None:
        self.fields(
            "O", "mount", where, target, fstype, source, flags, data, kind, remount,
            int(optional),
        )

    def bind(
        self, source: str, target: str, *, kind: str, flags: int, optional: bool = False
    ) -> None:
        """A recursive bind mount remounted with ``flags`` (MS_RDONLY, MS_NOSUID...)."""
        self.mount("root", target, "", source, MS_BIND | MS_REC, "", kind, flags, optional)

    def remount(self, where: str, target: str, flags: int, data: str = "") -> None:
        self.fields("O", "remount", where, target, flags, data)

    def mkdir(self, where: str, target: str, mode: int,
              owner: tuple[int, int] | None = None) -> None:
        """Create ``target`` and its missing parents with ``mode`` (``target`` owned by
        ``owner``, uid and gid, when given); one that exists is left as it is."""
        self.fields("O", "mkdir", where, target, mode, *(owner or ()))

    def symlink(self, target: str, value: str) -> None:
        self.fields("O", "symlink", target, value)

    def mknod(self, target: str, mode: int, major: int, minor: int) -> None:
        self.fields("O", "mknod", target, mode, major, minor)

    def write(self, where: str, target: str, mode: int, uid: int, gid: int, data: bytes) -> None:
        head = b"\0".join(str(i).encode() for i in ("write", where, target, mode, uid, gid))
        self.add("O", head + b"\0" + data)

    def sysctl(self, key: str, value: str) -> None:
        """Write ``value`` to /proc/sys/KEY (dotted key, dots become slashes) through the
        task's own /proc, in the launcher's namespaces (the task's network and IPC ones)."""
        self.fields("O", "sysctl", key, value)

    def pivot(self) -> None:
        self.fields("O", "pivot")

    def ops(self) -> list[list[str]]:
        """The ops so far, decoded (for tests and debugging; write data elided)."""
        out = []
        for part in self._parts:
            if part[:1] == b"O":
                items = part[5:].split(b"\0")
                if items[0] == b"write":
                    items = items[:6]
                if items[-1] == b"":
                    items = items[:-1]
                out.append([i.decode(errors="replace") for i in items])
        return out

    def encode(self) -> bytes:
        """The records and the end record; LaunchFailed when there are more than the launcher
        reads (MAX_RECORDS: it would fail with no word)."""
        if len(self._parts) + 1 > MAX_RECORDS:
            raise LaunchFailed(
                f"the task needs {len(self._parts) + 1} launch records (arguments, environment "
                f"variables, mounts, files and their parent directories), more than the "
                f"launcher's {MAX_RECORDS}")
        return b"".join(self._parts) + b"E" + struct.pack("<I", 0)


# The shim's report of the init's host pid on the ready pipe (runtime/launcher.c).
PID_RECORD = re.compile(rb"P([0-9]+)\n")


async def send_spec(loop: asyncio.AbstractEventLoop, fd: int, data: bytearray) -> None:
    """Write all of ``data`` to a pipe without blocking the loop (a spec with large files
    can exceed the pipe's buffer)."""
    os.set_blocking(fd, False)
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
                continue
            except BlockingIOError:
                pass
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, _resolve_future, fut)
            try:
                await fut
            finally:
                loop.remove_writer(fd)
    finally:
        view.release()

async def read_pid(loop: asyncio.AbstractEventLoop, fd: int) -> tuple[bytes, int | None]:
    """What the ready pipe holds up to the shim's "P<pid>\n" (sent right after the clone,
    before the init can write anything) and that pid; (data, None) at EOF without one."""
    fut: asyncio.Future[tuple[bytes, int | None]] = loop.create_future()
    got = bytearray()

    def readable() -> None:
        if fut.done():
            return
        try:
            chunk = os.read(fd, 64)
        except OSError as exc:
            fut.set_exception(exc)
            return
        got.extend(chunk)
        m = PID_RECORD.search(got)
        if m is not None or not chunk:
            fut.set_result((bytes(got), int(m.group(1)) if m else None))

    loop.add_reader(fd, readable)
    try:
        return await fut
    finally:
        loop.remove_reader(fd)

async def read_ready(loop: asyncio.AbstractEventLoop, fd: int, prefix: bytes = b""
                      ) -> tuple[bytes, int | None]:
    """The init's ready byte (b"" if none) and its host pid as the shim reported it (None if
    not), returned once the pipe is at EOF (for "R": once tini was exec'ed, the pipe being
    close-on-exec), without blocking the loop. ``prefix``: what was read from the pipe
    already. Closes fd."""
    fut: asyncio.Future[tuple[bytes, int | None]] = loop.create_future()
    got: list[bytes] = [prefix] if prefix else []

    def readable() -> None:
        if not fut.done():
            try:
                chunk = os.read(fd, 64)
            except OSError as exc:
                fut.set_exception(exc)
                return
            if chunk:
                got.append(chunk)
            else:
                data = b"".join(got)
                m = PID_RECORD.search(data)
                if m is not None:
                    data = data[: m.start()] + data[m.end() :]
                fut.set_result((data[:1], int(m.group(1)) if m else None))

    loop.add_reader(fd, readable)
    try:
        return await fut
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _resolve_future(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
