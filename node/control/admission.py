"""Admission: the manager side of joins, join tokens, the keys members fetch, renewal.

Owns: admitting a new node with a join token (nothing is written unless the token is valid;
the node id follows from the node's key, so a retried join finds the node it already added
(shoal.node.joining); the manager signs the node's key, records the node, and for a manager
begins the Raft voter change), showing and rotating join tokens, handing members
what they need over mTLS (voters, manager addresses, gossip keyring; the Raft secret and the
managers' sealing key to managers only), the cluster CA certificate, and renewing a member's
certificate with its *current* role. The joining node's side is the agent's (lifecycle).
Must not touch: this node's own lifecycle, HTTP, the runtime.
"""

from __future__ import annotations

import time
from typing import Any

from shoal.node import pki
from shoal.node.context import NodeContext, VoterChanges
from shoal.node.errors import BadRequest, Conflict, Forbidden, PkiError
from shoal.node.joining import join_node_id
from shoal.node.membership import GossipControl
from shoal.node.security import Security
from shoal.node.tokens import make_token, new_secret, role_for
from shoal.node.upgrade import join_refusal
from shoal.raft.models import NodeRole, node_from_dict

# the node record's fields a joining node gives: what it is and where it listens
JOIN_FIELDS = ("hostname", "addr", "api_port", "raft_port", "gossip_port", "memory_bytes",
               "cpus", "generic_resources", "arch")


class Admission:
    def __init__(self, ctx: NodeContext, security: Security, gossip: GossipControl,
                 voters: VoterChanges) -> None:
        self.ctx = ctx
        self.security = security  # the CA, token secrets, peer authorisation
        self.gossip = gossip  # the keyring members fetch
        self.voters = voters

    def ca_cert(self) -> dict[str, Any]:
        """The cluster CA certificate (public; joining nodes pin it by the token's digest)."""
        self.ctx.require_member()
        return {"ca_cert": self.security.files.ca_pem().decode()}

    async def accept_join(self, token: Any, node: Any, csr: Any = None,
                          schema: Any = None) -> dict[str, Any]:
        """A manager admits a new node (called over TLS by the joining node's agent, which has
        no certificate yet: the token authenticates it). Nothing is written unless the token
        is valid and the node runs the cluster's data schema (``schema``: what its request
        announces; None from shoal 0.1). The manager picks the node id and signs the node's
        key for it."""
        store = self.ctx.require_manager()
        if not isinstance(token, str) or not isinstance(node, dict) or \
                not isinstance(csr, str):
            raise BadRequest("join request needs a token, a certificate request and a node",
                             "token")
        snap = store.snapshot()
        c = snap.cluster
        worker_secret, manager_secret = self.security.token_secrets(snap)
        role = role_for(token, c.digest, worker_secret, manager_secret)
        if role is None:
            raise Forbidden("invalid join token: it does not belong to this cluster or was "
                            "rotated", "token")
        problem = join_refusal(snap, schema)
        if problem is not None:
            raise Conflict(problem, "schema")
        # the id follows from the node's key: a retried join (its reply was lost) names
        # the node it already added, never a second one (shoal.node.joining)
        try:
            node_id = join_node_id(c.cluster_id, csr)
        except PkiError as exc:
            raise BadRequest(str(exc), "csr") from None
        existing = snap.nodes.get(node_id)
        if existing is not None:  # a retry: the record is committed, its role is the truth
            role = existing.role.value
        # what a node says of itself (Swarm's node description); its labels, availability
        # and state are the managers' (before: a worker-token holder set its own labels and
        # drew the tasks, and secrets, of services constrained to them)
        node = {k: node[k] for k in JOIN_FIELDS if k in node}
        node.update(id=node_id, role=role)
        if existing is not None:  # (a join again, new addresses: the managers' settings stay)
            node.update(labels=dict(existing.labels),
                        availability=existing.availability.value)
        try:
            node_from_dict(node)
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"malformed node record: {exc!r}", "node") from None
        cert = self.security.issue(snap, csr, node_id, role, str(node.get("addr", "")))
        raft_addr = f"{node.get('addr')}:{node.get('raft_port')}"
        # a retry writes nothing, unless the node now announces other addresses or ports
        write = existing is None or any(node.get(k) != getattr(existing, k) for k in (
            "hostname", "addr", "api_port", "raft_port", "gossip_port"))
        if role != "manager":
            # a worker changes no Raft membership: no lock, no wait for a manager join
            if write:
                await self.ctx.propose({"op": "node_add", "now": time.time(), "node": node})
            return {"cluster_id": c.cluster_id, "node_id": node_id, "role": role,
                    "cert": cert.decode(), "retry": existing is not None}
        async with self.voters.lock:
            if existing is None or self.voters.pending_addr != raft_addr:
                # Raft membership changes go one at a time: wait for the previous one
                # (unless it is this very join's, retried: it waits for this node to run)
                await self.voters.wait_previous("manager join")
            # record first (commits with the current quorum), then add the voter: that
            # change commits only once the new manager runs, after it fetched its keys
            if write:
                await self.ctx.propose({"op": "node_add", "now": time.time(), "node": node})
            pending = self.voters.pending
            if raft_addr not in store.voters() and not (
                    self.voters.pending_addr == raft_addr and pending is not None
                    and not pending.done()):
                self.voters.pending = store.start_add_voter(raft_addr)
                self.voters.pending_addr = raft_addr
        return {"cluster_id": c.cluster_id, "node_id": node_id, "role": role,
                "cert": cert.decode(), "retry": existing is not None}

    def member_keys(self, peer: pki.CertInfo | None) -> dict[str, Any]:
        """What a member needs (voters, manager addresses, gossip key; the Raft secret if it
        is a manager); mTLS members only."""
        store = self.ctx.require_manager()
        node = self.security.authorize(peer)
        ident = self.ctx.identity
        assert ident is not None
        voters = store.voters()
        if node.role is NodeRole.MANAGER and node.raft_addr not in voters:
            voters.append(node.raft_addr)  # its voter change is pending until it runs
        # the Raft secret goes to managers only: workers are fed over mTLS (node/feed.py)
        secret = ident.raft_password if node.role is NodeRole.MANAGER else ""
        # voter: whether the answering manager's Raft configuration already has it (a
        # promoted node starts its voter only once the leader has added it, see promote)
        # (with every Raft secret it accepts, during a rotation: shoal.node.keys)
        ring = [secret, *ident.raft_extra_passwords] if secret else []
        return {"raft_password": secret, "raft_passwords": ring, "voters": voters,
                "voter": node.raft_addr in store.voters(),
                "managers": [n.api_addr for n in store.snapshot().nodes.values()
                             if n.role is NodeRole.MANAGER],
                "gossip_key": ident.gossip_key.hex(),
                "gossip_keys": self.gossip.member_keys()}  # whole keyring, primary first

    def manager_keys(self, peer: pki.CertInfo | None) -> dict[str, Any]:
        """The managers' sealing key: manager certificates of current managers only."""
        self.ctx.require_manager()
        self.security.authorize(peer, manager=True)
        return {"manager_key": self.security.manager_key().hex()}

    def renew_certificate(self, peer: pki.CertInfo | None, csr: Any) -> dict[str, Any]:
        """Sign a new certificate for a current member, with its *current* role."""
        store = self.ctx.require_manager()
        node = self.security.authorize(peer)
        cert = self.security.issue(store.snapshot(), csr, node.id, node.role.value, node.addr)
        return {"cert": cert.decode()}

    def join_token(self, role: str) -> str:
        store = self.ctx.require_manager()
        if role not in ("worker", "manager"):
            raise BadRequest("role must be 'worker' or 'manager'", "role")
        snap = store.snapshot()
        worker_secret, manager_secret = self.security.token_secrets(snap)
        return make_token(snap.cluster.digest,
                          worker_secret if role == "worker" else manager_secret)

    async def rotate_token(self, role: str) -> str:
        """New secret for ``role`` (sealed in the state): the old token stops working; joined
        nodes are unaffected (they authenticate with their certificates)."""
        self.ctx.require_manager()
        if role not in ("worker", "manager"):
            raise BadRequest("role must be 'worker' or 'manager'", "role")
        await self.ctx.propose({"op": "rotate_secret", "role": role,
                                "secret": self.security.seal_token_secret(role, new_secret())})
        return self.join_token(role)


__all__ = ["Admission"]
