"""Raft transport: pysyncobj's TCP transport with AES-256-GCM and member-only admission.

Owns: how Raft messages are encrypted, and which incoming Raft connections a manager keeps.

Encryption: pysyncobj's ``password=`` encrypts every message with Fernet (AES-128-CBC +
HMAC-SHA256 + base64, ~45 MB/s here), which cost up to a third of shoal's write throughput
on a busy machine. ``AeadEncryptor`` keeps pysyncobj's encryptor interface and framing
(per-connection random keys inside the ciphertext, monotonic timestamps) but seals with
AES-256-GCM (~2 GB/s), keyed by HKDF-SHA256 from the cluster's 256-bit Raft secret. The
transport installs it on its SyncObj before the first connection exists.

Admission: the Raft secret authenticates messages, but it is cluster-wide and outlives a
node's membership, so it cannot tell a current manager from a node that was demoted or
removed (``shoal node rm``) and kept a copy. This transport asks ``admit(ip)`` when a
connection introduces itself (a voter's address or ``readonly``) and again every
``recheck`` seconds for every open connection that is not a voter's: a host that is no
longer a manager's address is disconnected and refused, so it never receives the log.
pysyncobj's remote-admin "utility" messages (add/remove nodes, status) are refused
outright: shoal never uses them.

Strangers: a connection that introduces itself as a voter this replica does not know of
yet — a manager promoted while this one was down, or whose "add" entry it has not applied —
is kept if ``admit_member(ip)`` (any node of the cluster state, workers too: that state may
predate the promotion) as one of pysyncobj's read-only links. pysyncobj alone dropped it,
and since only the higher address dials, a replica that did not know the current leader
never heard from it: with pre-vote on (its pre-votes refused by managers that do hear the
leader), never again. The stranger's append-entries reach pysyncobj as any leader's; the
log then names the stranger a voter, and its link is closed so that it dials back as one.
A stranger is never sent append-entries (were this replica to lead).

Closed connections: every closed voter connection is also passed to ``lost_peer`` (the
store's shoal.raft.leaderloss hook: a follower that lost its leader stands soon).
Pre-votes: every message from a voter is shown to ``pre_vote`` first, which takes its own
two message types (shoal.raft.prevote: ask before standing for election).

Limits: the check is by source IP (a node connects from its advertise address on a flat
network); it complements, not replaces, the password. Must not touch: the Raft protocol,
membership decisions (the state machine's).
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pysyncobj.transport import TCPTransport

from shoal.raft.prevote import PreVote

log = logging.getLogger("shoal.raft")


class AeadEncryptor:
    """pysyncobj's encryptor interface (``encrypt_at_time``, ``extract_timestamp``,
    ``decrypt``, as Fernet's) with AES-256-GCM. Token: ``01 | timestamp (8) | nonce (12) |
    ciphertext+tag``, the first 9 bytes authenticated as associated data. Nonces are a random
    8-byte prefix per instance and a 4-byte counter (a new prefix when it wraps): unique
    without relying on 96-bit random collisions over billions of messages.

    A keyring, for rotating the Raft secret without downtime (shoal.node.keys): messages are
    sealed with the primary secret and opened with the primary or any ``extra`` one;
    ``set_secrets`` swaps the ring at once. Tokens no key opens are counted
    (``unknown_tokens``, ``last_unknown``): a manager that missed a rotation sees them and
    fetches the current secret over mTLS."""

    VERSION = 1

    def __init__(self, secret: str, extra: list[str] | tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._prefix = os.urandom(8)
        self._counter = itertools.count()
        self.unknown_tokens = 0
        self.last_unknown = 0.0  # time.monotonic() of the last token no key opened
        self.set_secrets(secret, extra)

    @staticmethod
    def _aead(secret: str) -> AESGCM:
        return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=b"shoal-raft-transport",
                           info=b"pysyncobj messages v1").derive(secret.encode()))

    def set_secrets(self, secret: str, extra: list[str] | tuple[str, ...] = ()) -> None:
        primary = self._aead(secret)
        self._ring = (primary, *(self._aead(s) for s in dict.fromkeys(extra) if s != secret))

    def _nonce(self) -> bytes:
        with self._lock:
            n = next(self._counter)
            if n >= 1 << 32:
                self._prefix, self._counter = os.urandom(8), itertools.count(1)
                n = 0
            return self._prefix + n.to_bytes(4, "big")

    def encrypt_at_time(self, data: bytes, current_time: int) -> bytes:
        header = struct.pack(">BQ", self.VERSION, max(0, int(current_time)))
        nonce = self._nonce()
        return header + nonce + self._ring[0].encrypt(nonce, data, header)

    def extract_timestamp(self, token: bytes) -> int:
        if len(token) < 9 + 12 + 16 or token[0] != self.VERSION:
            raise ValueError("not a shoal Raft token")
        return int(struct.unpack(">Q", token[1:9])[0])

    def decrypt(self, token: bytes) -> bytes:
        ring = self._ring
        for aead in ring:
            try:
                return aead.decrypt(token[9:21], token[21:], token[:9])
            except InvalidTag:
                continue
        self.unknown_tokens += 1
        self.last_unknown = time.monotonic()
        raise InvalidTag  # forged, or sealed with a secret this node does not hold


def _peer_ip(conn: Any) -> str | None:
    sock = getattr(conn, "_TcpConnection__socket", None)  # pysyncobj keeps it private
    try:
        return str(sock.getpeername()[0]) if sock is not None else None
    except OSError:
        return None


class AdmissionTransport(TCPTransport):
    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any, *,
                 admit: Callable[[str], bool],
                 admit_member: Callable[[str], bool] | None = None, encryptor: Any = None,
                 recheck: float = 0.5, link_up: Callable[[str], bool] | None = None,
                 lost_peer: Callable[[Any], None] | None = None,
                 pre_vote: PreVote | None = None) -> None:
        if encryptor is not None:
            # SyncObj builds its transport after its own encryptor and before any
            # connection or tick: the one moment it can be replaced for every connection
            syncObj._SyncObj__encryptor = encryptor
        self._admit = admit
        self._admit_member = admit_member or admit
        # read-only links of voters this replica does not know of yet: node -> the address
        # it introduced itself with (see "Strangers" above)
        self._strangers: dict[Any, str] = {}
        # fault injection (tests): link_up(peer "addr:port") False drops every Raft message
        # to and from that peer, like a network partition; None = every link is up
        self._link_up = link_up
        self._recheck = recheck
        # told of every closed voter connection, after pysyncobj (shoal.raft.leaderloss)
        self._lost_peer = lost_peer
        # sees every message first and takes the pre-vote ones (shoal.raft.prevote)
        self._pre_vote = pre_vote
        self._last_check = 0.0
        self._logged: dict[str | None, float] = {}  # ip -> last warning (one a minute)
        super().__init__(syncObj, selfNode, otherNodes)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        handshake = self._syncObj.encryptor and not conn.sendRandKey
        if handshake:
            return super()._onIncomingMessageReceived(conn, message)
        ip = _peer_ip(conn)
        stranger = isinstance(message, str) and message != "readonly" and \
            message not in self._nodeAddrToNode
        admit = self._admit_member if stranger else self._admit
        if isinstance(message, list) or ip is None or not admit(ip):
            self._warn(ip, "refused a Raft connection from %s (%s)", ip,
                       "admin command" if isinstance(message, list) else
                       "not a member's address")
            self._unknownConnections.discard(conn)
            conn.disconnect()
            return
        if not stranger:
            return super()._onIncomingMessageReceived(conn, message)
        super()._onIncomingMessageReceived(conn, "readonly")
        node = next((n for n, c in self._connections.items() if c is conn), None)
        if node is not None:
            self._strangers[node] = message
            self._warn(message, "Raft: %s introduced itself as a voter this replica does "
                       "not know of yet: following it until the log says so", message)

    def addNode(self, node: Any) -> None:
        super().addNode(node)
        for stranger, addr in list(self._strangers.items()):
            if addr == node.address:  # a voter now: let it dial back as one
                self._strangers.pop(stranger, None)
                conn = self._connections.get(stranger)
                if conn is not None:
                    conn.disconnect()

    def _onReadonlyNodeDisconnected(self, node: Any) -> None:
        self._strangers.pop(node, None)
        super()._onReadonlyNodeDisconnected(node)

    def send(self, node: Any, message: Any) -> bool:
        if self._link_up is not None and not self._link_up(
                self._strangers.get(node, str(node.id))):
            return False  # the partition swallows it (pysyncobj retries as on a lost link)
        if node in self._strangers and isinstance(message, dict) and \
                message.get("type") == "append_entries":
            return False  # a leader's log goes to voters it knows and to managers only
        return bool(super().send(node, message))

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self._link_up is not None and not self._link_up(
                self._strangers.get(node, str(node.id))):
            return
        if isinstance(message, dict) and message.get("type") == "next_node_idx" and \
                "term" in message and message["term"] != self._syncObj._getTerm():
            return  # an answer to another term's append-entries (shoal.raft.store._SafeSyncObj)
        if self._pre_vote is not None and isinstance(message, dict) and \
                self._pre_vote.on_message(node, message):
            return
        super()._onMessageReceived(node, message)

    def _onNodeDisconnected(self, node: Any) -> None:
        super()._onNodeDisconnected(node)
        if self._lost_peer is not None:
            self._lost_peer(node)

    def _warn(self, ip: str | None, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged.get(ip, -1e9) >= 60.0:
            self._logged[ip] = now
            log.warning(msg, *args)

    def _onTick(self) -> None:
        super()._onTick()
        now = time.monotonic()
        if now - self._last_check < self._recheck:
            return
        self._last_check = now
        for node, conn in list(self._connections.items()):
            if node not in self._readonlyNodes and node in self._nodes:
                continue  # voters: pysyncobj's membership decides (a removed voter is dropped)
            ip = _peer_ip(conn)
            admit = self._admit_member if node in self._strangers else self._admit
            if ip is not None and not admit(ip):
                self._warn(ip, "disconnected the Raft replica at %s: no longer a member", ip)
                conn.disconnect()
                self._connections.pop(node, None)
                self._strangers.pop(node, None)


__all__ = ["AdmissionTransport"]
