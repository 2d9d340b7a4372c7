"""Ports published in host mode (``endpoint.host_ports``, ``--publish mode=host``) on this node.

Owns, on this node, the iptables chains ``SHOAL-HOSTPORT`` of the nat table (jumped to from
PREROUTING for packets to a local address) and of the filter table (jumped to from FORWARD):
for each task of this node that is RUNNING with an address, of a service with host ports, one
``DNAT`` rule per port, ``PUBLISHED`` (at its ``host_ip`` only, when it has one) → the
task's address (``TaskStatus.addr``: on the default bridge or its first user-defined
network) and ``TARGET``, and an ACCEPT of the
translated connection in FORWARD (ahead of any isolation rule or DROP policy). No balancer, no
proxy: the task sees the client's own address. Packets to the VIP range are left alone (every
VIP is a local address here and belongs to the routing mesh). Connections from the node
itself (127.0.0.1:PUBLISHED) are not translated (no OUTPUT rule).

``hostport_rules`` is pure (snapshot in, iptables-restore lines out); ``HostPorts.sync``
rewrites both chains atomically (``iptables-restore --noflush``) when the rules change, so a
task that stops or moves takes its rules with it on the next pass. Must not touch: the store
(read-only snapshots), the other shoal chains (node/overlay.py, node/network.py), the runtime.

Errors: ``NetworkError`` (node/errors.py) from ``iptables-restore``, logged by the caller.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess

from shoal.node.errors import NetworkError
from shoal.raft.models import TaskState
from shoal.raft.state import Snapshot

log = logging.getLogger("shoal.hostports")

CHAIN = "SHOAL-HOSTPORT"
# (table, built-in chain, the match of the jump into CHAIN)
JUMPS: tuple[tuple[str, str, list[str]], ...] = (
    ("nat", "PREROUTING", ["-m", "addrtype", "--dst-type", "LOCAL"]),
    ("filter", "FORWARD", []))


def hostport_rules(snap: Snapshot, node_id: str) -> tuple[list[str], list[str]]:
    """(nat rules, filter rules) of ``CHAIN`` for the host-mode ports of the tasks running on
    ``node_id``, as iptables-restore lines, in a stable order (pure)."""
    nat: list[str] = []
    fwd: list[str] = []
    for svc in sorted(snap.services.values(), key=lambda s: s.spec.name):
        ports = svc.spec.endpoint.host_ports
        if not ports:
            continue
        running = sorted((t for t in snap.tasks_of(svc.id) if t.node_id == node_id
                          and t.status.state == TaskState.RUNNING and t.status.addr),
                         key=lambda t: t.id)
        for task in running[:1]:  # (one per node: max_replicas 1; a second would never match)
            addr = task.status.addr
            for p in ports:  # (a host_ip: packets to that address only; a node without
                # it has a rule that never matches)
                dst = f"-d {p.host_ip}/32 " if p.host_ip else ""
                nat.append(f"-A {CHAIN} {dst}-p {p.protocol} --dport {p.published} -j DNAT "
                           f"--to-destination {addr}:{p.target}")
                fwd.append(f"-A {CHAIN} -d {addr}/32 -p {p.protocol} --dport {p.target} "
                           "-m conntrack --ctstate DNAT -j ACCEPT")
                fwd.append(f"-A {CHAIN} -s {addr}/32 -p {p.protocol} --sport {p.target} "
                           "-m conntrack --ctstate DNAT -j ACCEPT")
    if nat and snap.cluster.vip_cidr:
        nat.insert(0, f"-A {CHAIN} -d {snap.cluster.vip_cidr} -j RETURN")
    return nat, fwd


def _run(argv: list[str], stdin: str = "") -> None:
    res = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])}: {res.stderr.strip() or res.stdout.strip()}")


def _chain_exists() -> bool:
    return shutil.which("iptables") is not None and subprocess.run(
        ["iptables", "-t", "nat", "-S", CHAIN], capture_output=True).returncode == 0


class HostPorts:
    """The host-mode port rules of one node; ``sync`` runs on the agent's event loop."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._rules: tuple[list[str], list[str]] | None = None  # as applied last
        self.error = ""

    async def sync(self, snap: Snapshot) -> None:
        rules = hostport_rules(snap, self.node_id)
        # (no chains on a node until a task of it publishes in host mode; those left by an
        # agent that stopped are emptied)
        if self._rules is None and rules == ([], []) and \
                not await asyncio.to_thread(_chain_exists):
            self._rules = rules
            return
        if rules == self._rules:
            return
        if shutil.which("iptables-restore") is None:
            self.error = "iptables-restore not found: ports published in host mode are closed"
            log.warning("%s (install the iptables package)", self.error)
            return
        await asyncio.to_thread(self._apply, rules)
        self._rules = rules
        self.error = ""

    def _apply(self, rules: tuple[list[str], list[str]]) -> None:
        nat, fwd = rules
        text = ["*nat", f":{CHAIN} - [0:0]", *nat, "COMMIT",
                "*filter", f":{CHAIN} - [0:0]", *fwd, "COMMIT"]
        _run(["iptables-restore", "--noflush"], "\n".join(text) + "\n")
        for table, chain, match in JUMPS:
            jump = [chain, *match, "-j", CHAIN]
            if subprocess.run(["iptables", "-t", table, "-C", *jump],
                              capture_output=True).returncode != 0:
                _run(["iptables", "-t", table, "-I", chain, "1", *match, "-j", CHAIN])

    async def teardown(self) -> None:
        """Remove both chains and their jumps (leaving the cluster)."""
        def down() -> None:
            for table, chain, match in JUMPS:
                for argv in (["-D", chain, *match, "-j", CHAIN], ["-F", CHAIN], ["-X", CHAIN]):
                    subprocess.run(["iptables", "-t", table, *argv], capture_output=True)
        if shutil.which("iptables"):
            await asyncio.to_thread(down)
        self._rules = None
