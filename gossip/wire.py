"""Wire format of shoal.gossip: message types, encoding, sealing and boundary validation.

Owns the bytes on the network and nothing else: no state, no I/O, no clock. Everything that
arrives goes through ``open_packet`` / ``open_frame`` which either return well-typed messages or
raise ``WireError(reason)``; no other exception can come out of them for any input.

Layout of a datagram (and of one stream frame)::

    byte 0      seal: 0 = plaintext (tests only), 1 = AES-GCM v1
    then        plaintext payload                                    (seal 0)
                nonce(12) ‖ AES-GCM(payload, aad) ‖ tag(16)          (seal 1)
    aad         b"shoal-gossip\\0" + b"p" (packet) or b"s" (stream) + b"\\0" + label

    payload     msgpack array [protocol_version, message, message, ...]
    message     msgpack array [MessageType, field, field, ...]

Every packet is a compound: the first message is the protocol message (ping, ack, ...) and the
rest are piggybacked membership broadcasts. Fields are positional; a newer protocol version may
append fields to a message and older members ignore the extra ones ("append-only", like the
type numbers). Metadata travels as msgpack-encoded bytes (an opaque blob to the protocol, decoded
and checked to be a map with string keys when it arrives).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgpack

from .errors import DropReason, WireError
from .keyring import NONCE_SIZE, TAG_SIZE, Keyring

PROTOCOL_VERSION_MIN = 1
PROTOCOL_VERSION_MAX = 1
PROTOCOL_VERSION = 1

SEAL_PLAIN = 0
SEAL_AESGCM_V1 = 1
SEAL_OVERHEAD = 1 + NONCE_SIZE + TAG_SIZE

MAX_NAME = 128  # member names
MAX_ADDR = 255  # host strings
MAX_META = 16 * 1024  # protocol hard cap on a metadata blob (Config.meta_max_bytes is lower)
_U32 = 2**32
_U64 = 2**64


class MessageType(IntEnum):
    """Gossip message types. Only append: the numbers are the protocol."""

    PING = 1
    INDIRECT_PING = 2
    ACK = 3
    NACK = 4
    SUSPECT = 5
    ALIVE = 6
    DEAD = 7
    PUSH_PULL = 8


class MemberState(IntEnum):
    """A member's state as seen by one observer. Only append: the numbers are on the wire."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


Version = tuple[int, int, int]  # (min, max, current) protocol versions a member speaks
LOCAL_VERSION: Version = (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX, PROTOCOL_VERSION)


@dataclass(frozen=True, slots=True)
class Ping:
    """Direct probe; ``target`` must be the receiver's name (else dropped as unexpected)."""

    seq: int
    target: str


@dataclass(frozen=True, slots=True)
class IndirectPing:
    """Ask the receiver to probe ``target`` at (addr, port) for us and relay the ack (or nack)."""

    seq: int
    target: str
    addr: str
    port: int
    nack: bool


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int


@dataclass(frozen=True, slots=True)
class Nack:
    """An indirect-probe relay could not reach the target in time (Lifeguard)."""

    seq: int


@dataclass(frozen=True, slots=True)
class Suspect:
    incarnation: int
    node: str
    sender: str


@dataclass(frozen=True, slots=True)
class Alive:
    incarnation: int
    node: str
    addr: str
    port: int
    meta: bytes
    vsn: Version


@dataclass(frozen=True, slots=True)
class Dead:
    """``sender == node`` means the member left gracefully (state LEFT)."""

    incarnation: int
    node: str
    sender: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """One member in a push-pull state exchange."""

    name: str
    addr: str
    port: int
    meta: bytes
    incarnation: int
    state: MemberState
    vsn: Version


@dataclass(frozen=True, slots=True)
class PushPull:
    join: bool
    nodes: tuple[NodeRecord, ...]


Message = Ping | IndirectPing | Ack | Nack | Suspect | Alive | Dead | PushPull
PACKET_TYPES = frozenset(
    {
        MessageType.PING,
        MessageType.INDIRECT_PING,
        MessageType.ACK,
        MessageType.NACK,
        MessageType.SUSPECT,
        MessageType.ALIVE,
        MessageType.DEAD,
    }
)
BROADCAST_TYPES = (Suspect, Alive, Dead)


# ----------------------------------------------------------------------------------- encoding


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def encode_meta(meta: dict[str, Any]) -> bytes:
    """Encode a metadata dict (string keys, msgpack-able values)."""
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise TypeError("meta must be a dict with str keys")
    try:
        return _pack(meta)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"meta is not msgpack-serialisable: {exc}") from exc


def decode_meta(blob: bytes) -> dict[str, Any]:
    """Decode a metadata blob; raise WireError(BAD_SHAPE) unless it is a str-keyed map."""
    if blob == b"":
        return {}
    try:
        value = msgpack.unpackb(
            blob,
            raw=False,
            strict_map_key=True,
            max_ext_len=0,
            max_str_len=len(blob),
            max_bin_len=len(blob),
            max_array_len=len(blob),
            max_map_len=len(blob),
        )
    except Exception as exc:  # msgpack raises many unrelated types; all mean "bad meta"
        raise WireError(DropReason.BAD_SHAPE, f"meta not decodable: {type(exc).__name__}") from exc
    if not isinstance(value, dict):
        raise WireError(DropReason.BAD_SHAPE, "meta is not a map")
    return value


def encode_message(msg: Message) -> bytes:
    """msgpack array ``[type, fields...]`` for one message."""
    match msg:
        case Ping():
            return _pack([MessageType.PING, msg.seq, msg.target])
        case IndirectPing():
            return _pack(
                [MessageType.INDIRECT_PING, msg.seq, msg.target, msg.addr, msg.port, msg.nack]
            )
        case Ack():
            return _pack([MessageType.ACK, msg.seq])
        case Nack():
            return _pack([MessageType.NACK, msg.seq])
        case Suspect():
            return _pack([MessageType.SUSPECT, msg.incarnation, msg.node, msg.sender])
        case Alive():
            return _pack(
                [
                    MessageType.ALIVE,
                    msg.incarnation,
                    msg.node,
                    msg.addr,
                    msg.port,
                    msg.meta,
                    list(msg.vsn),
                ]
            )
        case Dead():
            return _pack([MessageType.DEAD, msg.incarnation, msg.node, msg.sender])
        case PushPull():
            return _pack(
                [
                    MessageType.PUSH_PULL,
                    msg.join,
                    [
                        [r.name, r.addr, r.port, r.meta, r.incarnation, int(r.state), list(r.vsn)]
                        for r in msg.nodes
                    ],
                ]
            )
    raise TypeError(f"not a gossip message: {msg!r}")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + struct.pack(">H", n)
    return b"\xdd" + struct.pack(">I", n)


def build_payload(encoded: list[bytes], version: int = PROTOCOL_VERSION) -> bytes:
    """Compound payload from already-encoded messages (see encode_message)."""
    return _array_header(len(encoded) + 1) + _pack(version) + b"".join(encoded)


def payload_overhead(n_messages: int) -> int:
    """Bytes a payload adds around ``n_messages`` encoded messages (header + version)."""
    return len(_array_header(n_messages + 1)) + 1


def aad_for(kind: bytes, label: str) -> bytes:
    """Associated data binding a sealed blob to its channel (packet/stream) and cluster label."""
    return b"shoal-gossip\x00" + kind + b"\x00" + label.encode()


PACKET_AAD_KIND = b"p"
STREAM_AAD_KIND = b"s"


def seal(payload: bytes, keyring: Keyring | None, aad: bytes) -> bytes:
    """Prefix the seal byte and encrypt under the primary key (or leave plain without keyring)."""
    if keyring is None:
        return bytes((SEAL_PLAIN,)) + payload
    return bytes((SEAL_AESGCM_V1,)) + keyring.encrypt(payload, aad)


def unseal(data: bytes, keyring: Keyring | None, aad: bytes) -> bytes:
    """Inverse of seal; raise WireError for anything that is not ours."""
    if len(data) < 2:
        raise WireError(DropReason.SHORT, "no seal byte / empty payload")
    kind = data[0]
    if kind == SEAL_PLAIN:
        if keyring is not None:
            raise WireError(DropReason.UNENCRYPTED, "plaintext while encryption is required")
        return data[1:]
    if kind == SEAL_AESGCM_V1:
        if keyring is None:
            raise WireError(DropReason.ENCRYPTED, "encrypted while running without keys")
        return keyring.decrypt(memoryview(data)[1:], aad)
    raise WireError(DropReason.VERSION, f"unknown seal byte {kind}")


# ----------------------------------------------------------------------------------- decoding


def _bad(what: str) -> WireError:
    return WireError(DropReason.BAD_SHAPE, what)


def _uint(value: Any, limit: int, what: str) -> int:
    if type(value) is not int or not 0 <= value < limit:
        raise _bad(f"{what}: expected integer in 0..{limit - 1}")
    return value


def _name(value: Any, what: str) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_NAME:
        raise _bad(f"{what}: expected name of 1-{MAX_NAME} characters")
    return value


def _host(value: Any) -> str:
    if type(value) is not str or not 1 <= len(value) <= MAX_ADDR:
        raise _bad(f"addr: expected host of 1-{MAX_ADDR} characters")
    return value


def _bool(value: Any, what: str) -> bool:
    if type(value) is not bool:
        raise _bad(f"{what}: expected bool")
    return value


def _meta(value: Any) -> bytes:
    if type(value) is not bytes or len(value) > MAX_META:
        raise _bad(f"meta: expected bytes ≤ {MAX_META}")
    decode_meta(value)
    return value


def _vsn(value: Any) -> Version:
    if type(value) is not list or len(value) < 3:
        raise _bad("vsn: expected [min, max, cur]")
    lo, hi, cur = (_uint(v, 256, "vsn") for v in value[:3])
    if not lo <= cur <= hi:
        raise _bad("vsn: expected min ≤ cur ≤ max")
    return (lo, hi, cur)


def _fields(msg: list[Any], count: int, what: str) -> list[Any]:
    if len(msg) < count + 1:
        raise _bad(f"{what}: expected {count} fields, got {len(msg) - 1}")
    return msg[1 : count + 1]


def _record(value: Any) -> NodeRecord:
    if type(value) is not list or len(value) < 7:
        raise _bad("push-pull record: expected 7 fields")
    name, addr, port, meta, inc, state, vsn = value[:7]
    st = _uint(state, 256, "state")
    if st not in MemberState._value2member_map_:
        raise _bad("state: unknown member state")
    return NodeRecord(
        _name(name, "name"),
        _host(addr),
        _uint(port, 65536, "port"),
        _meta(meta),
        _uint(inc, _U64, "incarnation"),
        MemberState(st),
        _vsn(vsn),
    )


def parse_message(msg: Any) -> Message:
    """Validate one decoded ``[type, fields...]`` array into a typed message."""
    if type(msg) is not list or not msg:
        raise _bad("message: expected non-empty array")
    t = msg[0]
    if type(t) is not int:
        raise _bad("message type: expected integer")
    if t not in MessageType._value2member_map_:
        raise WireError(DropReason.UNKNOWN_TYPE, f"message type {t}")
    mtype = MessageType(t)
    if mtype is MessageType.PING:
        seq, target = _fields(msg, 2, "ping")
        return Ping(_uint(seq, _U32, "seq"), _name(target, "target"))
    if mtype is MessageType.INDIRECT_PING:
        seq, target, addr, port, nack = _fields(msg, 5, "indirect ping")
        return IndirectPing(
            _uint(seq, _U32, "seq"),
            _name(target, "target"),
            _host(addr),
            _uint(port, 65536, "port"),
            _bool(nack, "nack"),
        )
    if mtype is MessageType.ACK:
        (seq,) = _fields(msg, 1, "ack")
        return Ack(_uint(seq, _U32, "seq"))
    if mtype is MessageType.NACK:
        (seq,) = _fields(msg, 1, "nack")
        return Nack(_uint(seq, _U32, "seq"))
    if mtype is MessageType.SUSPECT:
        inc, node, sender = _fields(msg, 3, "suspect")
        return Suspect(_uint(inc, _U64, "incarnation"), _name(node, "node"), _name(sender, "from"))
    if mtype is MessageType.ALIVE:
        inc, node, addr, port, meta, vsn = _fields(msg, 6, "alive")
        return Alive(
            _uint(inc, _U64, "incarnation"),
            _name(node, "node"),
            _host(addr),
            _uint(port, 65536, "port"),
            _meta(meta),
            _vsn(vsn),
        )
    if mtype is MessageType.DEAD:
        inc, node, sender = _fields(msg, 3, "dead")
        return Dead(_uint(inc, _U64, "incarnation"), _name(node, "node"), _name(sender, "from"))
    # PUSH_PULL
    join, nodes = _fields(msg, 2, "push-pull")
    if type(nodes) is not list:
        raise _bad("push-pull nodes: expected array")
    return PushPull(_bool(join, "join"), tuple(_record(r) for r in nodes))


def decode_payload(payload: bytes) -> tuple[int, list[Message]]:
    """Decode and validate a compound payload into (sender's protocol version, messages)."""
    n = len(payload)
    try:
        value = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_ext_len=0,
            max_str_len=n,
            max_bin_len=n,
            max_array_len=n,
            max_map_len=n,
        )
    except Exception as exc:  # ExtraData, FormatError, StackError, ValueError, UnicodeError…
        raise WireError(DropReason.MALFORMED, type(exc).__name__) from exc
    if type(value) is not list or len(value) < 2:
        raise _bad("payload: expected [version, message, ...]")
    version = value[0]
    if type(version) is not int:
        raise _bad("payload version: expected integer")
    if not PROTOCOL_VERSION_MIN <= version <= PROTOCOL_VERSION_MAX:
        raise WireError(DropReason.VERSION, f"protocol version {version}")
    return version, [parse_message(m) for m in value[1:]]


def open_packet(
    data: bytes, keyring: Keyring | None, aad: bytes, max_size: int
) -> list[Message]:
    """Unseal and validate one datagram: messages of packet types only."""
    if len(data) > max_size:
        raise WireError(DropReason.OVERSIZE, f"{len(data)} > {max_size} bytes")
    _, msgs = decode_payload(unseal(data, keyring, aad))
    for m in msgs:
        if isinstance(m, PushPull):
            raise WireError(DropReason.UNEXPECTED, "push-pull in a datagram")
    return msgs


def open_frame(data: bytes, keyring: Keyring | None, aad: bytes) -> PushPull:
    """Unseal and validate one stream frame: exactly one push-pull message."""
    _, msgs = decode_payload(unseal(data, keyring, aad))
    if len(msgs) != 1 or not isinstance(msgs[0], PushPull):
        raise WireError(DropReason.UNEXPECTED, "stream frame must hold one push-pull")
    return msgs[0]
