"""Idempotent joins: the joining node's stable identity and its retry loop.

Owns: the node id a join gets (``join_node_id``: derived from the joining node's public key
and the cluster id, so every attempt of one join — retried after a lost reply, sent to
another manager, or racing its own earlier attempt — names the same node), the joining
node's key kept in its data dir until the join succeeded (``JoinKey``), and the client's
retry loop around ``/v1/cluster/join`` (``request_join``), and the record of a join the
cluster has admitted but this node has not finished (``Admitted``). Must not touch: the
replicated state, the agent's lifecycle (shoal.node.agent calls this), HTTP.

Admitted is final (as in Swarm and Nomad, where a node the managers accepted stays theirs):
once a manager committed the node and signed its certificate, the joining agent never
abandons the membership on a timeout. It fetches its keys (retried until a manager answers
or refuses), writes node.json at once and then lets its replica or state feed catch up for as
long as that takes, logging progress; ``shoal join`` waits ``join_wait`` for the catch-up
and else answers "admitted, catching up". Only the phase before admission times out with an
error. An agent restarted meanwhile resumes: from node.json once written, before that from
``DATA_DIR/join-pending.json`` (``Admitted``) with the certificate already saved.

Why (swarmkit binds a node's identity to its key the same way): before this, the manager
picked a random id per request. A join whose reply was lost (client timeout, connection cut
after the leader committed ``node_add``) left a record that went Down for good, and the
retry — if any — created a second node. Now a retry presents the same key (the CSR proves
possession of it), the manager finds the record it already committed, writes nothing new and
signs a fresh certificate for the same id. Two attempts that race both propose ``node_add``
for the same id: the second is an update of the first, never a second record.

Errors (shoal.node.errors): ``request_join`` retries ``Unavailable`` (unreachable manager,
lost or timed-out reply, leader changed, write timed out) and ``TooManyRequests`` until its
deadline, then raises the last one; anything else (``Forbidden`` bad token, ``Conflict``
schema, ``BadRequest``, ``CaMismatch``) is the manager's answer and is raised at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from shoal.node import pki
from shoal.node.errors import PkiError, TooManyRequests, Unavailable

log = logging.getLogger("shoal.join")

JOIN_KEY_FILE = "join-key.pem"
ADMITTED_FILE = "join-pending.json"


def join_node_id(cluster_id: str, csr_pem: str | bytes) -> str:
    """The node id of the join that presents ``csr_pem`` to cluster ``cluster_id``: 20 hex
    digits (like ``new_id``) of a SHA-256 over the cluster id and the request's public key.
    PkiError if the request is malformed (the caller answers BadRequest on ``csr``)."""
    spki = pki.csr_public_key(csr_pem)
    digest = hashlib.sha256(b"shoal-node-id\0" + cluster_id.encode() + b"\0" + spki)
    return digest.hexdigest()[:20]


class JoinKey:
    """The joining node's private key, in ``DATA_DIR/join-key.pem`` (0600) from before the
    first attempt until the join succeeded: a join retried after the agent (or the user's
    ``shoal join``) gave up presents the same key, so it gets the same node id."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / JOIN_KEY_FILE

    def load_or_create(self) -> ec.EllipticCurvePrivateKey:
        with contextlib.suppress(FileNotFoundError):
            try:
                return pki.load_key(self.path.read_bytes())
            except PkiError as exc:  # a torn write: start over with a new key
                log.warning("ignoring unreadable %s: %s", self.path, exc)
        key = pki.new_key()
        pki.write_private(self.path, pki.key_pem(key))
        return key

    def forget(self) -> None:
        """The join succeeded (the key now lives in the node's TLS files)."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Admitted:
    """A join the cluster admitted (node committed, certificate saved in DATA_DIR/tls) whose
    keys this node has not fetched yet; in ``DATA_DIR/join-pending.json`` until node.json is
    written, so a restarted agent finishes the join instead of forgetting it."""

    remote: str  # the manager that admitted this node (API address)
    node_id: str
    role: str
    cluster_id: str

    @staticmethod
    def path(data_dir: Path) -> Path:
        return data_dir / ADMITTED_FILE

    def save(self, data_dir: Path) -> None:
        tmp = self.path(data_dir).with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"remote": self.remote, "node_id": self.node_id, "role": self.role,
                       "cluster_id": self.cluster_id}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(data_dir))

    @classmethod
    def load(cls, data_dir: Path) -> Admitted | None:
        """The pending join, or None (none, or an unreadable file: logged, ignored)."""
        try:
            d = json.loads(cls.path(data_dir).read_text())
            return cls(remote=str(d["remote"]), node_id=str(d["node_id"]),
                       role=str(d["role"]), cluster_id=str(d["cluster_id"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable %s: %r", cls.path(data_dir), exc)
            return None

    @classmethod
    def remove(cls, data_dir: Path) -> None:
        cls.path(data_dir).unlink(missing_ok=True)


@dataclass
class JoinRetry:
    """How the joining node retries ``/v1/cluster/join``."""

    # Give up retrying after this long, seconds (the last error is raised).
    deadline: float = 40.0
    # Deadline of one attempt, seconds. A reply later than this counts as lost.
    attempt_timeout: float = 15.0
    # First pause between attempts, seconds; doubles per attempt up to ``max_backoff``,
    # with ±50 % jitter so a storm of joiners does not retry in step.
    backoff: float = 0.5
    max_backoff: float = 4.0


# (body, timeout) → the manager's reply; raises ApiError
JoinCall = Callable[[dict[str, Any], float], Awaitable[dict[str, Any]]]


async def request_join(call: JoinCall, body: dict[str, Any], retry: JoinRetry | None = None,
                       sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                       ) -> dict[str, Any]:
    """Send the join request until a manager answers it; the same ``body`` (same key, so
    the same node id) every time. Returns the reply; raises the manager's refusal at once,
    or the last Unavailable/TooManyRequests after ``retry.deadline``."""
    r = retry or JoinRetry()
    end = time.monotonic() + r.deadline
    pause = r.backoff
    attempt = 0
    while True:
        attempt += 1
        left = end - time.monotonic()
        try:
            return await call(body, max(1.0, min(r.attempt_timeout, left)))
        except (Unavailable, TooManyRequests) as exc:
            left = end - time.monotonic()
            if left <= 0:
                raise
            wait = min(left, pause * random.uniform(0.5, 1.5))
            log.info("join attempt %d got no answer (%s); retrying in %.1f s", attempt,
                     exc.message, wait)
            await sleep(wait)
            pause = min(r.max_backoff, pause * 2)


__all__ = ["JOIN_KEY_FILE", "JoinKey", "JoinRetry", "join_node_id", "request_join"]
