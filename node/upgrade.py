"""The schema gate of a rolling upgrade: when the leader may raise the cluster's data schema.

Owns: what a node announces about the schema it can run (the ``schema`` key of its gossip
metadata, ``shoal.raft.schema.SCHEMA`` of the code it runs) and the pure decision
``schema_to_raise(snapshot, gossip_meta_by_node)``: the schema the leader proposes with
``{"op": "cluster_schema", "schema": N}``, or None. Must not touch: the store, the network,
gossip itself (callers pass the metadata in), clocks.

Joins follow the same rule the other way: a node whose join request announces a schema below
the cluster's (``join_refusal``) is refused, so no 0.1 agent enters after the raise.

The rule: the cluster may write schema N only once EVERY node of the cluster (in the
snapshot: managers and workers, down ones included) has announced that it runs code that
reads schema >= N. A node that announced nothing (shoal 0.1 announces no ``schema``), that
this node's gossip never heard of, or whose mark is malformed counts as schema 1
(``LEGACY``): the gate errs towards not raising. The schema only rises (the state machine
refuses a lower one), so a node rolled back to old code after the raise is not supported.

Until ``ClusterInfo.schema`` exists in shoal.raft.state (the model change), the cluster's
current schema is read with ``getattr(snapshot.cluster, "schema", LEGACY)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shoal.raft.schema import LEGACY, SCHEMA
from shoal.raft.state import Snapshot

META_KEY = "schema"  # gossip metadata key: the schema this node's code can run


def gossip_meta(role: str, hostname: str, api: str) -> dict[str, Any]:
    """The gossip metadata this node announces (role, hostname, API address, schema)."""
    return {"role": role, "hostname": hostname, "api": api, META_KEY: SCHEMA}


def announced_schema(meta: Mapping[str, Any] | None) -> int:
    """The schema a node announced in its gossip metadata; LEGACY when it announced none (or
    something that is not a positive integer)."""
    if meta is None:
        return LEGACY
    value = meta.get(META_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or value < LEGACY:
        return LEGACY
    return value


def cluster_schema(snapshot: Snapshot) -> int:
    """The schema the cluster writes now (``ClusterInfo.schema``; 1 before it existed)."""
    value = getattr(snapshot.cluster, "schema", LEGACY)
    return value if isinstance(value, int) and not isinstance(value, bool) else LEGACY


def join_refusal(snapshot: Snapshot, schema: Any) -> str | None:
    """Why a node whose join request says it runs ``schema`` (None: it said nothing, as
    shoal 0.1 does) may not join a cluster that writes ``cluster_schema(snapshot)``, or None.
    After the raise an older agent could not read the state it would replicate."""
    runs = announced_schema({META_KEY: schema})
    writes = cluster_schema(snapshot)
    if runs >= writes:
        return None
    return (f"this node's shoal runs data schema {runs} but the cluster writes schema "
            f"{writes}: upgrade shoal on this node, then join")


def schema_to_raise(snapshot: Snapshot, gossip_meta_by_node: Mapping[str, Mapping[str, Any]],
                    own: int = SCHEMA) -> int | None:
    """The schema to propose now, or None.

    That is the lowest schema announced over every node of ``snapshot`` (missing metadata =
    LEGACY), capped at ``own`` (the proposing leader's code: it never asks for a schema it
    cannot run itself), if it is above the cluster's current schema. A cluster without nodes
    raises nothing.
    """
    if not snapshot.nodes:
        return None
    lowest = min(announced_schema(gossip_meta_by_node.get(nid)) for nid in snapshot.nodes)
    target = min(lowest, own)
    return target if target > cluster_schema(snapshot) else None


__all__ = ["LEGACY", "META_KEY", "SCHEMA", "announced_schema", "cluster_schema", "gossip_meta",
           "join_refusal", "schema_to_raise"]
