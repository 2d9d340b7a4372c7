"""An asyncio driver for one end of the control socketpair (AF_UNIX SOCK_SEQPACKET).

Owns: reading/writing whole messages with attached file descriptors on one socket, on any
asyncio loop (uvloop or stock; it only uses add_reader/add_writer). Must not touch: message
content (that is shoal.lb.wire) or anything else of the process.

asyncio's stream and protocol APIs cannot carry SCM_RIGHTS, hence this small driver.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Sequence

from .errors import BalancerUnavailable, ProtocolError
from .wire import MAX_FDS, MAX_MESSAGE

log = logging.getLogger("shoal.lb")

#: on_message(data, fds, truncated): fds are owned by the callee (it must close them).
OnMessage = Callable[[bytes, list[int], bool], None]


def recv_fds(sock: socket.socket, size: int, max_fds: int) -> tuple[bytes, list[int], int]:
    """One message on ``sock``: (data, descriptors, flags), the descriptors close-on-exec —
    socket.recv_fds drops its flags argument in Python 3.11, so its descriptors would be
    inheritable, and uvloop's spawn ignores ``close_fds``: every child the process starts
    would get them. b"" and no descriptors at EOF."""
    item = array.array("i").itemsize
    data, ancillary, flags, _ = sock.recvmsg(size, socket.CMSG_LEN(max_fds * item),
                                             socket.MSG_CMSG_CLOEXEC)
    fds = array.array("i")
    for level, kind, cdata in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[:len(cdata) - len(cdata) % item])
    return data, list(fds), flags


def socketpair() -> tuple[socket.socket, socket.socket]:
    """A control socketpair with send buffers large enough for MAX_MESSAGE."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    for s in (a, b):
        tune(s)
    return a, b


def tune(sock: socket.socket) -> None:
    # A SEQPACKET message must fit the sender's buffer whole. SO_SNDBUFFORCE (root) ignores
    # net.core.wmem_max; otherwise the kernel clamps and huge tables fail with EMSGSIZE.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, 32, MAX_MESSAGE + 64 * 1024)  # SO_SNDBUFFORCE
    with contextlib.suppress(OSError):
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < MAX_MESSAGE:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE + 64 * 1024)


class Channel:
    """One end of the control socketpair, driven by the running loop."""

    def __init__(self, sock: socket.socket, on_message: OnMessage,
                 on_close: Callable[[], None]) -> None:
        self._sock = sock
        self._on_message = on_message
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self._writers: set[asyncio.Future[None]] = set()  # sends waiting for room
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        while not self.closed:
            try:
                data, fds, flags = recv_fds(self._sock, MAX_MESSAGE + 1, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # ECONNRESET and friends: the peer is gone
                log.debug("control socket error: %s", exc)
                self.close()
                return
            if not data and not fds:  # EOF (we never send empty messages)
                self.close()
                return
            truncated = bool(flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC))
            try:
                self._on_message(data, list(fds), truncated)
            except Exception:  # the callee must not raise; never let it kill the reader
                log.exception("control message handler failed")

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one message (with fds, which stay open here: SCM_RIGHTS duplicates them)."""
        if len(data) > MAX_MESSAGE:
            raise ProtocolError(f"control message of {len(data)} bytes exceeds "
                                f"{MAX_MESSAGE} (too many endpoints?)")
        while True:
            if self.closed:
                raise BalancerUnavailable("control channel closed")
            try:
                if fds:
                    socket.send_fds(self._sock, [data], list(fds))
                else:
                    self._sock.send(data)
                return
            except (BlockingIOError, InterruptedError):
                await self._writable()
            except OSError as exc:
                self.close()
                raise BalancerUnavailable(f"control channel: {os.strerror(exc.errno or 0)}"
                                          ) from exc

    async def _writable(self) -> None:
        fut: asyncio.Future[None] = self._loop.create_future()
        fd = self._sock.fileno()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self._loop.add_writer(fd, ready)
        self._writers.add(fut)
        try:
            await fut
        finally:
            self._writers.discard(fut)
            if not self.closed:
                self._loop.remove_writer(fd)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        fd = self._sock.fileno()
        if fd >= 0:
            self._loop.remove_reader(fd)
            self._loop.remove_writer(fd)
        self._sock.close()
        for fut in self._writers:  # (woken, a send sees the channel closed and says so)
            if not fut.done():
                fut.set_result(None)
        self._on_close()
