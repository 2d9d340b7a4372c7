"""User-defined networks: the user API (``shoal network create/ls/inspect/rm``).

Owns (one ``NetworksApi`` per agent, managers answer): checking a ``network create``
request's shape before it is proposed (the state machine allocates the subnet, gateway and
VNI and refuses overlaps, shoal.raft.networks), the views of networks (with the services
and tasks attached to each), and ``network rm`` (refused by the state machine while a
service or a live task uses the network). Must not touch: the data path (node/overlay.py
builds it from the replicated state on every node), Raft internals.

Errors: ``BadRequest``/``NotFound``/``Conflict`` (node/errors.py), naming the field; the
state machine's refusals arrive translated by ``NodeContext.propose``.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from shoal.node.crud import ObjectsApi
from shoal.node.errors import BadRequest, NotFound
from shoal.raft.models import Network
from shoal.raft.state import Snapshot


def network_view(net: Network, snap: Snapshot | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": net.id, "name": net.name, "driver": net.driver, "scope": "swarm",
        "subnet": net.subnet, "gateway": net.gateway, "vni": net.vni,
        "internal": net.internal, "attachable": net.attachable, "labels": dict(net.labels),
        "created_at": net.created_at}
    if snap is not None:
        out["services"] = sorted(s.spec.name for s in snap.services.values()
                                 if net.name in s.spec.task.networks)
        out["tasks"] = {t.id: t.net_addrs[net.name] for t in snap.tasks.values()
                        if net.name in t.net_addrs and not t.status.state.terminal}
    return out


def find_network(snap: Snapshot, ref: str) -> Network:
    if ref in snap.networks:
        return snap.networks[ref]
    found = [n for n in snap.networks.values() if n.name == ref]
    if not found and len(ref) >= 4:
        found = [n for n in snap.networks.values() if n.id.startswith(ref)]
    if len(found) == 1:
        return found[0]
    if not found:
        raise NotFound(f"no such network: {ref}", "network")
    raise BadRequest(f"network {ref!r} is ambiguous", "network")


_FIELDS = {"name": str, "driver": str, "subnet": str, "gateway": str, "internal": bool,
           "attachable": bool, "labels": dict}


class NetworksApi(ObjectsApi):
    def ls(self) -> list[dict[str, Any]]:
        snap = self._snap()
        return [network_view(n, snap) for n in sorted(snap.networks.values(),
                                                      key=lambda n: n.name)]

    def inspect(self, ref: str) -> dict[str, Any]:
        snap = self._snap()
        return network_view(find_network(snap, ref), snap)

    async def create(self, body: dict[str, Any]) -> dict[str, Any]:
        cmd = self._create_command("network_create", body, _FIELDS)
        self._check_node_addresses(str(cmd.get("subnet") or ""))
        res = await self.ctx.propose(cmd)
        return {"id": cmd["id"], "name": cmd["name"], "subnet": res.get("subnet", ""),
                "vni": res.get("vni", 0)}

    def _check_node_addresses(self, subnet: str) -> None:
        """A subnet that holds a node's own address would route that node's traffic (and
        every node's to it) into the overlay: refused, naming the node (Docker leaves this
        to the user; the state machine checks shoal's own ranges)."""
        try:
            net = ipaddress.ip_network(subnet, strict=False) if subnet else None
        except ValueError:
            return  # (the state machine names the malformed subnet)
        for node in sorted(self._snap().nodes.values(), key=lambda n: n.hostname):
            try:
                inside = net is not None and ipaddress.ip_address(node.addr) in net
            except ValueError:
                continue
            if inside:
                raise BadRequest(f"subnet {subnet} holds node {node.hostname}'s address "
                                 f"{node.addr}: choose one the nodes' network does not use",
                                 "subnet")

    async def remove(self, ref: str) -> dict[str, Any]:
        net = find_network(self._snap(), ref)
        await self.ctx.propose({"op": "network_remove", "id": net.id})
        return {"id": net.id, "name": net.name, "removed": True}
