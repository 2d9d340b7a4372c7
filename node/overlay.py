"""The overlay driver: user-defined networks as VXLAN segments across every node.

Owns, on this node, for every network of the replicated state (``shoal network create``):

* a bridge ``shb<VNI>`` holding this node's own address on the network (from the top of
  its subnet, shoal.raft.networks.node_address: the source of the node's connections to
  tasks — balancer, routing mesh — so replies come back to this node) and the network's
  gateway as a /32 (every node has it; ARP for it is answered by the local bridge);
* a VXLAN device ``shx<VNI>`` on that bridge (UDP ``port``, ``local`` = the node's
  advertise address, no learning, ARP proxy), with forwarding entries (FDB: task MAC →
  its node's address) and neighbour entries (task IP → MAC) programmed from the state for
  every task and node on *other* nodes — no multicast, no flooding across nodes. MACs are
  derived from addresses (02:42 + the IPv4 address, as Docker does), so nothing but the
  state is needed to program them;
* one veth per (task, network) into the task's namespace (``eth0``, ``eth1``... in the
  order of ``spec.networks``) with the task's address from the state, MTU = underlay MTU
  minus the VXLAN overhead (50 bytes), a default route via the first non-internal
  network's gateway (internal-only tasks get just a route to the VIP range and the DNS
  server);
* iptables rules (chain ``SHOAL-NET`` in FORWARD, ``SHOAL-NET-VIP`` in INPUT,
  ``SHOAL-NET-NAT`` in nat POSTROUTING): traffic stays inside its network, an internal
  network has no way out, a service's VIP answers only tasks that share a network with
  it, other networks' traffic leaving the cluster is masqueraded.

Links, neighbours and FDB entries are made with iproute2 batches (``ip -batch``,
``bridge -batch``) in a worker thread; a command that fails is logged and retried on the
next pass. Must not touch: the store (read-only snapshots), the default network's bridge
and routes (node/network.py), the runtime.

Errors: ``NetworkError`` (node/errors.py) naming the network or task.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from shoal.node.errors import NetworkError
from shoal.raft import networks as netalloc
from shoal.raft.models import Network, Service, Task
from shoal.raft.state import Snapshot

log = logging.getLogger("shoal.overlay")

VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
BRIDGE_PREFIX = "shb"
VXLAN_PREFIX = "shx"
VETH_PREFIX = "so"


@dataclass
class OverlayConfig:
    # UDP port of VXLAN on every node (IANA's 4789; every node must use the same one).
    port: int = 4789
    # MTU of overlay bridges and task interfaces; 0 = the underlay interface's MTU minus
    # the 50 bytes of VXLAN encapsulation (1450 on a 1500-byte network). A larger value
    # than the underlay allows makes big packets disappear: only lower it.
    mtu: int = 0
    # Manage the iptables isolation/NAT rules (needs the iptables command).
    firewall: bool = True


def mac_of(addr: str) -> str:
    """The MAC of an overlay address: 02:42 + its 4 bytes (locally administered)."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.ip_address(addr).packed)


def bridge_of(net: Network) -> str:
    return f"{BRIDGE_PREFIX}{net.vni}"


def vxlan_of(net: Network) -> str:
    return f"{VXLAN_PREFIX}{net.vni}"


def veth_of(task_id: str, i: int) -> str:
    return f"{VETH_PREFIX}{task_id[:11]}{i:x}"  # <= 15 characters


def node_addr(snap: Snapshot, net: Network, node_id: str) -> str:
    node = snap.nodes.get(node_id)
    if node is None or not node.subnet:
        return ""
    return netalloc.node_address(net.subnet,
                                 netalloc.node_index(node.subnet, snap.cluster.cluster_cidr))


def remote_entries(snap: Snapshot, node_id: str) -> dict[str, dict[str, str]]:
    """Per network name: overlay address → underlay address of the node that has it, for
    every task and node on another node (what FDB and neighbour entries must say)."""
    out: dict[str, dict[str, str]] = {n.name: {} for n in snap.networks.values()}
    if not out:  # (no user-defined network: nothing to look up in every task)
        return out
    for net in snap.networks.values():
        for node in snap.nodes.values():
            if node.id != node_id:
                a = node_addr(snap, net, node.id)
                if a:
                    out[net.name][a] = node.addr
    for t in snap.tasks.values():
        if not t.net_addrs or t.node_id == node_id or t.status.state.terminal:
            continue
        where = snap.nodes.get(t.node_id)
        if where is None:
            continue
        for name, a in t.net_addrs.items():
            if name in out:
                out[name][a] = where.addr
    return out


def firewall_rules(snap: Snapshot, default_bridge: str) -> tuple[list[str], list[str],
                                                                  list[str]]:
    """(FORWARD rules, INPUT rules, nat POSTROUTING rules) for the chains SHOAL-NET,
    SHOAL-NET-VIP and SHOAL-NET-NAT, as iptables-restore lines (pure)."""
    fwd: list[str] = []
    nat: list[str] = []
    cluster = snap.cluster.cluster_cidr
    for net in sorted(snap.networks.values(), key=lambda n: n.vni):
        b = bridge_of(net)
        fwd.append(f"-A SHOAL-NET -i {b} -o {b} -j ACCEPT")
        fwd.append(f"-A SHOAL-NET -i {b} -o {BRIDGE_PREFIX}+ -j DROP")
        fwd.append(f"-A SHOAL-NET -i {b} -o {default_bridge} -j DROP")
        fwd.append(f"-A SHOAL-NET -i {default_bridge} -o {b} -j DROP")
        fwd.append(f"-A SHOAL-NET -i {b} -d {cluster} -j DROP")
        if net.internal:
            fwd.append(f"-A SHOAL-NET -i {b} -j DROP")
            fwd.append(f"-A SHOAL-NET -o {b} -j DROP")
        else:
            nat.append(f"-A SHOAL-NET-NAT -s {net.subnet} ! -d {net.subnet} -j MASQUERADE")
    inp: list[str] = []
    if snap.networks:
        by_name = {n.name: n for n in snap.networks.values()}
        # tasks on several networks send from their first network's address: let each
        # through to the VIPs of its other networks too
        multi = [t for t in snap.tasks.values()
                 if len(t.net_addrs) > 1 and not t.status.state.terminal]
        for svc in sorted(snap.services.values(), key=lambda s: s.id):
            if not svc.vip:
                continue
            for src in vip_sources(svc, by_name, cluster, multi):
                inp.append(f"-A SHOAL-NET-VIP -d {svc.vip}/32 -s {src} -j ACCEPT")
            inp.append(f"-A SHOAL-NET-VIP -d {svc.vip}/32 -i {BRIDGE_PREFIX}+ -j DROP")
            inp.append(f"-A SHOAL-NET-VIP -d {svc.vip}/32 -i {default_bridge} -j DROP")
    return fwd, inp, nat


def vip_sources(svc: Service, nets: dict[str, Network], cluster_cidr: str,
                multi: Iterable[Task]) -> list[str]:
    """Sources allowed to ``svc``'s VIP: the subnets of its networks (the cluster's task
    network for a service on the default one), and every address of a multi-network task
    that shares a network with it."""
    mine = svc.spec.task.networks
    if not mine:
        return [cluster_cidr]
    out = [nets[n].subnet for n in mine if n in nets]
    for t in multi:
        if set(t.net_addrs) & set(mine):
            out += [f"{a}/32" for n, a in sorted(t.net_addrs.items()) if n not in mine]
    return list(dict.fromkeys(out))


def _run(argv: Sequence[str], stdin: str = "", check: bool = True) -> str:
    res = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=30)
    if check and res.returncode != 0:
        raise NetworkError(f"{' '.join(argv[:3])}: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def _batch(tool: str, lines: Iterable[str], netns_pid: int | None = None) -> None:
    """Run ``tool -force -batch -`` (every line attempted; errors reported at the end)."""
    text = "".join(line + "\n" for line in lines)
    if not text:
        return
    argv = [tool, "-force", "-batch", "-"]
    if netns_pid is not None:
        argv = ["nsenter", f"--net=/proc/{netns_pid}/ns/net", *argv]
    _run(argv, text)


def underlay_mtu(addr: str) -> int:
    """The MTU of the interface holding ``addr`` (1500 if it cannot be found)."""
    try:
        links = json.loads(_run(["ip", "-j", "addr", "show"]))
    except (NetworkError, ValueError, OSError):
        return 1500
    for link in links:
        if any(a.get("local") == addr for a in link.get("addr_info", ())):
            return int(link.get("mtu", 1500))
    return 1500


class Overlay:
    """One per member agent (inside the Mesh); every method runs on the agent's loop and
    does its netlink/iptables work in a thread."""

    def __init__(self, node_id: str, advertise_addr: str, default_bridge: str,
                 config: OverlayConfig | None = None) -> None:
        self.node_id = node_id
        self.advertise_addr = advertise_addr
        self.default_bridge = default_bridge
        self.config = config or OverlayConfig()
        self.mtu = self.config.mtu
        self._nets: dict[str, Network] = {}  # network id → network set up here
        self._addrs: dict[str, str] = {}  # network id → this node's address on it
        self._entries: dict[str, dict[str, str]] = {}  # vxlan dev → {overlay ip: node addr}
        self._rules: tuple[list[str], list[str], list[str]] | None = None
        self.attached: dict[str, dict[str, str]] = {}  # task id → {network: address}
        self.errors: dict[str, str] = {}  # network name → why it is not (fully) up
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ state → devices
    async def sync(self, snap: Snapshot) -> None:
        async with self._lock:
            if not self._settled(snap):  # (the mesh syncs twice a second: mostly no-ops)
                await asyncio.to_thread(self._sync, snap)

    def _settled(self, snap: Snapshot) -> bool:
        """Nothing for ``_sync`` to do: the same networks at the same addresses, forwarding
        entries and firewall rules (pure computations, on the loop: the hop to a thread and
        back costs an idle agent two wake-ups, and most passes change nothing)."""
        if not self.mtu or snap.networks.keys() != self._nets.keys():
            return False
        for nid, net in snap.networks.items():
            if self._addrs.get(nid) != node_addr(snap, net, self.node_id):
                return False
        entries = remote_entries(snap, self.node_id)
        for net in self._nets.values():
            if self._entries.get(vxlan_of(net)) != entries.get(net.name, {}):
                return False
        if self.config.firewall and (snap.networks or self._rules is not None):
            return firewall_rules(snap, self.default_bridge) == self._rules
        return True

    def _sync(self, snap: Snapshot) -> None:
        if not self.mtu:
            self.mtu = underlay_mtu(self.advertise_addr) - VXLAN_OVERHEAD
        want = dict(snap.networks)
        for nid in set(self._nets) - set(want):
            self._drop(self._nets.pop(nid))
            self._addrs.pop(nid, None)
        for nid, net in want.items():
            addr = node_addr(snap, net, self.node_id)
            if nid not in self._nets or self._addrs.get(nid) != addr:
                try:
                    self._make(net, addr)
                except NetworkError as exc:
                    self.errors[net.name] = str(exc)
                    log.warning("overlay network %s: %s", net.name, exc)
                    continue
                self._nets[nid], self._addrs[nid] = net, addr
                self.errors.pop(net.name, None)
        entries = remote_entries(snap, self.node_id)
        for net in self._nets.values():
            self._program(vxlan_of(net), entries.get(net.name, {}))
        if self.config.firewall:
            self._firewall(snap)

    def _make(self, net: Network, addr: str) -> None:
        br, vx = bridge_of(net), vxlan_of(net)
        prefix = ipaddress.ip_network(net.subnet).prefixlen
        if not addr:
            raise NetworkError(f"this node has no address slot on {net.subnet} (too many "
                               "nodes for the subnet: use a larger --subnet)")
        lines = [f"link add {br} type bridge", f"link set {br} address {mac_of(addr)}",
                 f"link set {br} mtu {self.mtu}",
                 f"addr replace {addr}/{prefix} dev {br}",
                 f"addr replace {net.gateway}/32 dev {br}",
                 f"link add {vx} type vxlan id {net.vni} local {self.advertise_addr} "
                 f"dstport {self.config.port} nolearning proxy",
                 f"link set {vx} mtu {self.mtu}", f"link set {vx} master {br}",
                 f"link set {vx} up", f"link set {br} up"]
        with contextlib.suppress(NetworkError):  # ("File exists" on a second pass)
            _batch("ip", lines)
        up = _run(["ip", "-j", "addr", "show", "dev", br], check=False)
        try:
            info = json.loads(up)[0]
        except (ValueError, IndexError, KeyError):
            raise NetworkError(f"bridge {br} for network {net.name} could not be made") \
                from None
        have = {a.get("local") for a in info.get("addr_info", ())}
        if addr not in have or net.gateway not in have:
            raise NetworkError(f"bridge {br} for network {net.name} lacks its addresses")
        if _run(["ip", "link", "show", "dev", vx], check=False) == "":
            raise NetworkError(f"VXLAN device {vx} for network {net.name} could not be made "
                               "(does this kernel have VXLAN?)")
        self._entries.pop(vx, None)
        log.info("overlay network %s up: VNI %d, subnet %s, node address %s, MTU %d",
                 net.name, net.vni, net.subnet, addr, self.mtu)

    def _drop(self, net: Network) -> None:
        for dev in (vxlan_of(net), bridge_of(net)):
            _run(["ip", "link", "del", "dev", dev], check=False)
        self._entries.pop(vxlan_of(net), None)
        log.info("overlay network %s removed", net.name)

    def _program(self, vx: str, want: dict[str, str]) -> None:
        """FDB + neighbour entries on ``vx``: exactly ``want`` (overlay ip → node addr)."""
        have = self._entries.get(vx, {})
        if have == want:
            return
        fdb: list[str] = []
        neigh: list[str] = []
        for ip, node in want.items():
            if have.get(ip) != node:
                fdb.append(f"fdb replace {mac_of(ip)} dev {vx} dst {node} self permanent")
                neigh.append(f"neigh replace {ip} lladdr {mac_of(ip)} dev {vx} nud permanent")
        for ip in set(have) - set(want):
            fdb.append(f"fdb del {mac_of(ip)} dev {vx} self")
            neigh.append(f"neigh del {ip} dev {vx}")
        try:
            _batch("bridge", fdb)
            _batch("ip", neigh)
        except NetworkError as exc:
            log.warning("forwarding entries on %s: %s", vx, exc)
            self._entries.pop(vx, None)  # (rewritten in full next pass)
            return
        self._entries[vx] = dict(want)

    def _firewall(self, snap: Snapshot) -> None:
        if not snap.networks and self._rules is None:
            return  # (no chains on a node until the cluster has a network)
        rules = firewall_rules(snap, self.default_bridge)
        if rules == self._rules:
            return
        if shutil.which("iptables-restore") is None:
            if "firewall" not in self.errors:
                log.warning("iptables-restore not found: overlay networks are NOT isolated "
                            "from each other (install the iptables package)")
            self.errors["firewall"] = "iptables-restore not found: networks not isolated"
            return
        fwd, inp, nat = rules
        text = ["*filter", ":SHOAL-NET - [0:0]", ":SHOAL-NET-VIP - [0:0]", *fwd, *inp,
                "COMMIT", "*nat", ":SHOAL-NET-NAT - [0:0]", *nat, "COMMIT"]
        try:
            _run(["iptables-restore", "--noflush"], "\n".join(text) + "\n")
            for table, chain, target in (("filter", "FORWARD", "SHOAL-NET"),
                                         ("filter", "INPUT", "SHOAL-NET-VIP"),
                                         ("nat", "POSTROUTING", "SHOAL-NET-NAT")):
                if subprocess.run(["iptables", "-t", table, "-C", chain, "-j", target],
                                  capture_output=True).returncode != 0:
                    _run(["iptables", "-t", table, "-I", chain, "1", "-j", target])
        except (NetworkError, OSError) as exc:
            log.warning("overlay isolation rules not applied: %s", exc)
            return
        self._rules = rules

    # ------------------------------------------------------------------ tasks
    async def attach(self, task: Task, pid: int, snap: Snapshot, dns_addr: str) -> str:
        """Give ``task`` one interface per network of its spec; return its first address."""
        nets = [snap.network_by_name(n) for n in task.spec.networks]
        missing = [n for n, net in zip(task.spec.networks, nets, strict=True)
                   if net is None or n not in task.net_addrs]
        if missing:
            raise NetworkError(f"task {task.id} has no address on network(s) "
                               f"{', '.join(missing)} yet")
        await self.sync(snap)
        ready = [n for n in nets if n is not None and n.id in self._nets]
        if len(ready) != len(nets):
            raise NetworkError(f"network(s) of task {task.id} are not set up on this node: "
                               f"{self.errors}")
        async with self._lock:
            await asyncio.to_thread(self._attach, task, pid, ready, dns_addr,
                                    snap.cluster.vip_cidr)
        self.attached[task.id] = {n.name: task.net_addrs[n.name] for n in ready}
        return task.net_addrs[ready[0].name]

    def _attach(self, task: Task, pid: int, nets: list[Network], dns_addr: str,
                vip_cidr: str) -> None:
        host: list[str] = []
        inside: list[str] = ["link set lo up"]
        default = next((n for n in nets if not n.internal), None)
        for i, net in enumerate(nets):
            addr, veth = task.net_addrs[net.name], veth_of(task.id, i)
            prefix = ipaddress.ip_network(net.subnet).prefixlen
            _run(["ip", "link", "del", "dev", veth], check=False)  # a half-done attempt
            host += [f"link add {veth} mtu {self.mtu} type veth peer name eth{i} "
                     f"address {mac_of(addr)} mtu {self.mtu} netns {pid}",
                     f"link set {veth} master {bridge_of(net)}", f"link set {veth} up"]
            inside += [f"addr add {addr}/{prefix} dev eth{i}", f"link set eth{i} up"]
        if default is not None:
            inside.append(f"route add default via {default.gateway}")
        else:  # internal only: the VIPs and the DNS server, through the node
            inside.append(f"route add {vip_cidr} via {nets[0].gateway}")
            if dns_addr:
                inside.append(f"route add {dns_addr}/32 via {nets[0].gateway}")
        _batch("ip", host)
        _batch("ip", inside, netns_pid=pid)

    async def detach(self, task_id: str) -> None:
        names = self.attached.pop(task_id, None)
        if names is None:
            return

        def drop() -> None:
            for i in range(len(names)):
                _run(["ip", "link", "del", "dev", veth_of(task_id, i)], check=False)
        await asyncio.to_thread(drop)

    def address_of(self, task_id: str) -> str:
        got = self.attached.get(task_id)
        return next(iter(got.values()), "") if got else ""

    def adopt(self, task: Task) -> None:
        """A task that survived an agent restart keeps its interfaces: remember them."""
        if task.net_addrs and task.id not in self.attached:
            self.attached[task.id] = {n: task.net_addrs[n] for n in task.spec.networks
                                      if n in task.net_addrs}

    async def teardown(self) -> None:
        def down() -> None:
            for net in list(self._nets.values()):
                self._drop(net)
            if self.config.firewall and shutil.which("iptables"):
                for table, chain, target in (("filter", "FORWARD", "SHOAL-NET"),
                                             ("filter", "INPUT", "SHOAL-NET-VIP"),
                                             ("nat", "POSTROUTING", "SHOAL-NET-NAT")):
                    subprocess.run(["iptables", "-t", table, "-D", chain, "-j", target],
                                   capture_output=True)
                    subprocess.run(["iptables", "-t", table, "-F", target],
                                   capture_output=True)
                    subprocess.run(["iptables", "-t", table, "-X", target],
                                   capture_output=True)
        await asyncio.to_thread(down)
        self._nets.clear()
        self._rules = None

    def describe(self) -> dict[str, Any]:
        return {"networks": {n.name: {"vni": n.vni, "subnet": n.subnet,
                                      "node_addr": self._addrs.get(nid, ""),
                                      "bridge": bridge_of(n), "mtu": self.mtu,
                                      "remote_entries": len(self._entries.get(vxlan_of(n),
                                                                              {}))}
                             for nid, n in self._nets.items()},
                "tasks": dict(self.attached), "errors": dict(self.errors)}
