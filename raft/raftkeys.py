"""The replicated part of a Raft secret rotation (`swarm rotate-key`, shoal.node.keys).

Owns: the commands that move a rotation of the managers' Raft transport secret through its
phases, and their checks. The secret itself never enters the log — only its id (a SHA-256
prefix); managers fetch it over mTLS from a manager that has it (current managers only).

Phases, each entered by the leader once every manager that is not down acknowledged the
previous one (``raft_acks``: node id -> stage):

* ``accept`` (``raft_rotate_start``): every manager fetches the new secret and accepts it
  for incoming messages while still sending with the old one; acknowledges stage 1;
* ``switch`` (``raft_rotate_phase``): every manager sends with the new secret, still
  accepting the old; acknowledges stage 2;
* done (``raft_rotate_finish``): the new id is the cluster's; every manager drops the old
  secret. A manager that was down throughout meets messages it cannot open and fetches the
  current secret over mTLS (its certificate and record must still say manager).

Must not touch: keys or transports (shoal.node.keys, shoal.raft.transport).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import replace
from typing import Any, Protocol

from shoal.raft.errors import Rejected

KEY_ID_RE = re.compile(r"[0-9a-f]{16}")


def secret_id(secret: str) -> str:
    """The id a Raft secret is known by in the state: 16 hex digits of a SHA-256."""
    return hashlib.sha256(b"shoal raft secret id\0" + secret.encode()).hexdigest()[:16]


class ClusterState(Protocol):
    """What the handlers touch of shoal.raft.state.ClusterState (not imported: it imports
    this module)."""

    cluster: Any
    nodes: dict[str, Any]


def _key_id(cmd: dict[str, Any], name: str = "key_id") -> str:
    value = cmd.get(name)
    if not isinstance(value, str) or not KEY_ID_RE.fullmatch(value):
        raise Rejected("invalid", f"{name} must be 16 hex digits", name)
    return value


def raft_rotate_start(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    c = state.cluster
    new = _key_id(cmd)
    if c.schema < 2:
        raise Rejected("invalid", "rotating the Raft secret needs every node on shoal >= 0.2 "
                       "(cluster schema 2)", "key_id")
    if c.raft_phase == "switch":  # (in "accept" nobody sends with the next one yet: the
        # rotation may start over, e.g. when the manager holding its secret is gone)
        raise Rejected("conflict", "a Raft secret rotation is switching managers over: wait "
                       "for it to finish", "raft_phase")
    if new == c.raft_key_id:
        raise Rejected("invalid", "the new Raft secret is the current one", "key_id")
    state.cluster = replace(c, raft_next_key_id=new, raft_phase="accept", raft_acks={})
    return {"key_id": new, "phase": "accept"}


def raft_rotate_ack(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    c, node_id, stage = state.cluster, cmd.get("node_id"), cmd.get("stage")
    if not c.raft_phase or cmd.get("key_id") != c.raft_next_key_id:
        return {"stale": True}  # an ack for a rotation that is over or replaced
    if node_id not in state.nodes:
        raise Rejected("invalid", "unknown node", "node_id")
    if stage not in (1, 2) or isinstance(stage, bool):
        raise Rejected("invalid", "stage must be 1 or 2", "stage")
    if c.raft_acks.get(node_id, 0) < stage:
        state.cluster = replace(c, raft_acks={**c.raft_acks, node_id: stage})
    return {"stale": False}


def raft_rotate_phase(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    c = state.cluster
    if _key_id(cmd) != c.raft_next_key_id or c.raft_phase != "accept" or \
            cmd.get("phase") != "switch":
        raise Rejected("stale", "not the Raft secret rotation in progress", "key_id")
    state.cluster = replace(c, raft_phase="switch")
    return {"phase": "switch"}


def raft_rotate_finish(state: ClusterState, cmd: dict[str, Any]) -> dict[str, Any]:
    c = state.cluster
    if _key_id(cmd) != c.raft_next_key_id or c.raft_phase != "switch":
        raise Rejected("stale", "not the Raft secret rotation in progress", "key_id")
    state.cluster = replace(c, raft_key_id=c.raft_next_key_id, raft_next_key_id="",
                            raft_phase="", raft_acks={})
    return {"key_id": c.raft_next_key_id}


OPS = {"raft_rotate_start": raft_rotate_start, "raft_rotate_ack": raft_rotate_ack,
       "raft_rotate_phase": raft_rotate_phase, "raft_rotate_finish": raft_rotate_finish}

__all__ = ["KEY_ID_RE", "OPS", "secret_id"]
