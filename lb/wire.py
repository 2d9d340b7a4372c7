"""Wire format of the control channel between the agent (``Balancer``) and a worker.

Owns the bytes on the control socket and nothing else: no state, no I/O, no clock.
``decode`` either returns a well-typed ``Message`` or raises ``WireError(reason)``; no other
exception comes out of it for any input.

The channel is an AF_UNIX SOCK_SEQPACKET socketpair (message boundaries kept, file descriptors
travel with a message as SCM_RIGHTS). One message = one msgpack map::

    {"t": MessageType, "id": u32, "b": body}          request (agent -> worker)
    {"t": REPLY, "id": id, "ok": true,  "b": result}  answer
    {"t": REPLY, "id": id, "ok": false, "e": {"code", "message", "field"}}

Bodies (requests):

    HELLO           {"version": int, "index": int, "config": Config.worker_fields()}
    SET_SERVICE     {"service": ServiceLB.to_wire(), "listeners": [[addr, port, proto], ...]}
                    + one listening socket fd per listener, in that order
    REMOVE_SERVICE  {"name": str}
    STATS           {}
    SHUTDOWN        {"grace": seconds}

A message that fails validation is answered with ``ok: false`` (``id`` 0 when the id itself
could not be read) and counted under its DropReason; it never stops the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from .errors import DropReason, WireError

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1
PROTOCOL_VERSION = 1

MAX_MESSAGE = 4 * 1024 * 1024  # bytes; a 10,000-endpoint table is ~0.6 MiB
MAX_FDS = 253  # the kernel's SCM_MAX_FD per message
_MAX_ID = 2**32 - 1


class MessageType(IntEnum):
    """Control message types. Only append: the numbers are the protocol."""

    HELLO = 1
    SET_SERVICE = 2
    REMOVE_SERVICE = 3
    STATS = 4
    SHUTDOWN = 5
    REPLY = 6


@dataclass(frozen=True)
class Message:
    type: MessageType
    id: int
    body: dict[str, Any]
    ok: bool = True  # replies only
    error: dict[str, Any] | None = None  # replies with ok=False


def encode(mtype: MessageType, msg_id: int, body: dict[str, Any]) -> bytes:
    return msgpack.packb({"t": int(mtype), "id": msg_id, "b": body}, use_bin_type=True)


def encode_reply(msg_id: int, result: dict[str, Any] | None = None,
                 error: dict[str, Any] | None = None) -> bytes:
    if error is not None:
        return msgpack.packb({"t": int(MessageType.REPLY), "id": msg_id, "ok": False,
                              "e": error}, use_bin_type=True)
    return msgpack.packb({"t": int(MessageType.REPLY), "id": msg_id, "ok": True,
                          "b": result or {}}, use_bin_type=True)


def peek_id(data: bytes) -> int:
    """Best effort: the id of a message that failed validation (0 if unreadable)."""
    try:
        obj = msgpack.unpackb(data, raw=False, max_bin_len=0, max_ext_len=0)
        msg_id = obj.get("id") if isinstance(obj, dict) else None
    except Exception:  # any garbage: no id
        return 0
    return msg_id if isinstance(msg_id, int) and 0 <= msg_id <= _MAX_ID else 0


def decode(data: bytes) -> Message:
    """Parse one control message; raise WireError for anything malformed."""
    if len(data) > MAX_MESSAGE:
        raise WireError(DropReason.DECODE, f"message of {len(data)} bytes is over the limit")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0,
                              max_ext_len=0)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise WireError(DropReason.DECODE, f"not a msgpack message: {exc}") from exc
    if not isinstance(obj, dict):
        raise WireError(DropReason.SHAPE, "message is not a map")
    mtype, msg_id = obj.get("t"), obj.get("id")
    if isinstance(mtype, bool) or not isinstance(mtype, int):
        raise WireError(DropReason.SHAPE, "message type (t) missing or not an integer", "t")
    if isinstance(msg_id, bool) or not isinstance(msg_id, int) or not 0 <= msg_id <= _MAX_ID:
        raise WireError(DropReason.SHAPE, "message id missing or not a u32", "id")
    try:
        kind = MessageType(mtype)
    except ValueError as exc:
        raise WireError(DropReason.UNKNOWN_TYPE, f"unknown message type {mtype}", "t") from exc
    if kind is MessageType.REPLY:
        ok = obj.get("ok")
        if not isinstance(ok, bool):
            raise WireError(DropReason.SHAPE, "reply without ok flag", "ok")
        if ok:
            body = obj.get("b", {})
            if not isinstance(body, dict):
                raise WireError(DropReason.SHAPE, "reply body is not a map", "b")
            return Message(kind, msg_id, body)
        err = obj.get("e")
        if not isinstance(err, dict):
            raise WireError(DropReason.SHAPE, "error reply without error map", "e")
        return Message(kind, msg_id, {}, ok=False, error=err)
    body = obj.get("b")
    if not isinstance(body, dict):
        raise WireError(DropReason.SHAPE, "message body (b) missing or not a map", "b")
    return Message(kind, msg_id, body)
