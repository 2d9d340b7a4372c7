"""Typed errors of shoal.gossip.

Owns the error tree of the gossip package; nothing else. Lower-layer errors (OSError from sockets,
cryptography's InvalidTag, msgpack's decoding errors) are translated at the boundary with
``raise ... from exc`` so callers only ever catch the classes below::

    GossipError                       base of everything this package raises
    ├── ConfigError                   a Config field is invalid (.field names it)
    ├── KeyringError                  bad key size, unknown key, removing the primary key
    ├── WireError                     a packet or frame failed validation (.reason: DropReason)
    ├── TransportError                the network layer failed (bind, connect, closed stream)
    │   └── FrameTooLarge             a stream frame exceeded the configured limit
    ├── JoinError                     no seed could be reached (.causes: per-seed errors)
    ├── StateError                    call not allowed in the member's lifecycle state
    │                                 (not started, already started, shut down)
    └── SimulationStalled             test tool (gossip/simloop.py): nothing is scheduled any
                                      more, yet the awaited coroutine has not finished

WireError never escapes the receive loop: the member catches it, counts ``drop.<reason>`` in
``Memberlist.stats`` and goes on. It is public so that tools (fuzzers, a packet inspector) can call
``shoal.gossip.wire`` directly.
"""

from __future__ import annotations

from enum import StrEnum


class GossipError(Exception):
    """Base class of every error raised by shoal.gossip."""


class ConfigError(GossipError, ValueError):
    """A configuration value is invalid; ``field`` names the offending Config field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class KeyringError(GossipError, ValueError):
    """A keyring operation was refused (wrong key size, unknown key, removing the primary)."""


class DropReason(StrEnum):
    """Why an inbound packet or stream frame was dropped (the suffix of ``drop.*`` stats keys)."""

    SHORT = "short"  # too short to hold the header / nonce / tag
    OVERSIZE = "oversize"  # larger than the configured limit
    UNENCRYPTED = "unencrypted"  # plaintext packet while this member requires encryption
    ENCRYPTED = "encrypted"  # encrypted packet while this member runs without keys
    DECRYPT = "decrypt"  # no installed key authenticates it (wrong key, tampered, wrong label)
    MALFORMED = "malformed"  # not valid msgpack within the decoder's limits
    VERSION = "version"  # protocol version outside PROTOCOL_VERSION_MIN..MAX
    UNKNOWN_TYPE = "unknown_type"  # message type this version does not know
    BAD_SHAPE = "bad_shape"  # known type, wrong field count / types / ranges
    UNEXPECTED = "unexpected"  # valid but not acceptable here (ping for another node, stream msg)


class WireError(GossipError):
    """A packet or frame failed validation; ``reason`` says why (see DropReason)."""

    def __init__(self, reason: DropReason, message: str = "") -> None:
        super().__init__(f"{reason.value}: {message}" if message else reason.value)
        self.reason = reason


class TransportError(GossipError, ConnectionError):
    """The network layer failed: bind, connect, read/write on a stream, closed transport."""


class FrameTooLarge(TransportError):
    """A stream frame announced a length above the configured maximum."""


class JoinError(GossipError):
    """``join()`` reached none of the seeds; ``causes`` maps each seed to its error."""

    def __init__(self, causes: dict[tuple[str, int], BaseException]) -> None:
        detail = "; ".join(f"{h}:{p}: {e}" for (h, p), e in causes.items()) or "no seeds given"
        super().__init__(f"could not join any seed ({detail})")
        self.causes = causes


class StateError(GossipError, RuntimeError):
    """The call is not allowed in the member's current lifecycle state."""


class SimulationStalled(GossipError, RuntimeError):
    """Nothing is scheduled any more, yet the awaited coroutine has not finished."""
