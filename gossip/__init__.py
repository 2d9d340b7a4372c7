"""shoal.gossip — SWIM membership with Lifeguard, in the manner of HashiCorp memberlist.

Owns cluster membership and failure detection between shoal agents: who is alive, suspect,
dead or left, with their small metadata (role, API address, labels, version). It must not touch
the raft store, the runtime or the agent's wiring: the agent reads ``members()`` and the event
stream and decides what they mean.

Quick tour::

    from shoal.gossip import Config, Memberlist

    cfg = Config.lan(name="node-1", bind_addr="10.1.0.5", secret_key=key)
    m = Memberlist(cfg, meta={"role": "manager", "api": "10.1.0.5:4242"})
    await m.start()
    await m.join(["10.1.0.4:7946"])
    async for ev in m.events():          # join, update, suspect, alive, dead, left, reaped
        print(ev.kind, ev.member.name, ev.member.state)

``Config.lan()`` (the defaults) probes every 0.2 s and declares a crashed member dead everywhere
in a median 1.3 s at 10 members, 2.2 s at 100 (docs/benchmarks.md); ``Config.local()`` keeps those
timings and shortens the background timers for tests. Keys rotate without downtime through
``Memberlist.keyring`` (install → use → remove on every member; ``Keyring.set_keys``).

Modules: config (Config, presets, validate) · memberlist (Memberlist, the protocol) · events
(Member, MemberEvent, EventStream) · wire (message types, encoding, validation) · keyring (AES-GCM
keys) · broadcast (transmit-limited queue) · lifeguard (suspicion timer, local health) · timing
(pure timeout arithmetic) · transport (interface) · udp (real UDP+TCP) · memnet (in-memory
network) · simloop (virtual-time event loop) · testing (simulated clusters) · proctest
(multi-process clusters on loopback) · runner (``python -m shoal.gossip``) · errors.
"""

from .config import Config
from .errors import (
    ConfigError,
    DropReason,
    FrameTooLarge,
    GossipError,
    JoinError,
    KeyringError,
    StateError,
    TransportError,
    WireError,
)
from .events import EventKind, EventStream, Member, MemberEvent
from .keyring import Keyring
from .memberlist import Memberlist
from .memnet import MemoryNetwork, MemoryTransport
from .nodes import parse_address
from .transport import Address, Packet, Stream, Transport
from .udp import UDPTransport
from .wire import PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN, MemberState, MessageType

__all__ = [
    "PROTOCOL_VERSION_MAX",
    "PROTOCOL_VERSION_MIN",
    "Address",
    "Config",
    "ConfigError",
    "DropReason",
    "EventKind",
    "EventStream",
    "FrameTooLarge",
    "GossipError",
    "JoinError",
    "Keyring",
    "KeyringError",
    "Member",
    "MemberEvent",
    "MemberState",
    "Memberlist",
    "MemoryNetwork",
    "MemoryTransport",
    "MessageType",
    "Packet",
    "StateError",
    "Stream",
    "Transport",
    "TransportError",
    "UDPTransport",
    "WireError",
    "parse_address",
]
