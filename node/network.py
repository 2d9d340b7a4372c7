"""Task networking on one node: a bridge, a veth per task, routes to the other nodes.

Owns: the node's task bridge (``shoal0``, gateway = first address of the node's subnet),
the local address allocation inside the node's subnet (persisted in
DATA_DIR/network.json so a restarted agent keeps its tasks' addresses), one veth pair per
task (host end on the bridge, the other end created inside the task's network namespace as
``eth0`` with the task's address and a default route via the gateway), host-gateway routes
to every other node's task subnet via that node's address, and masquerading of task
traffic leaving the cluster network when iptables is available. Netlink work is done by
pyroute2 in a worker thread (it does not work on uvloop's loop), entering the task's
network namespace with setns(2) on that thread only.

The service VIP range is made local to the node with one route (``local VIP_CIDR dev lo``
in the ``local`` table, "AnyIP"): the balancer can bind any VIP and traffic from tasks to a
VIP is delivered to it, with no per-service address to add or remove.
Being local, a VIP would answer anyone who routes VIP_CIDR to the node (a machine on its
network: ``ip route add VIP via NODE``), whatever the service publishes — a port published at
127.0.0.1 only included; so the filter table's INPUT jumps to ``SHOAL-VIP-IN`` for VIP_CIDR,
which lets in only what comes from the node itself (``lo``: host-network tasks too) and from
task bridges (this one, the overlay networks' ``shb*``) and drops the rest.

Limits (host-gateway style, like flannel's host-gw): nodes must share an L2 segment (or
have routes between them); user-defined VXLAN networks (node/overlay.py) do not. This is the
default network of tasks whose service names no ``--network``. Must not touch: the store, the
runtime's namespaces other than the task's net namespace.

Errors: ``NetworkError`` (node/errors.py: netlink, setns, or no free address in the node's
subnet; the lower-level error is chained).
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.node.errors import NetworkError
from shoal.node.netlink import import_iproute
from shoal.raft.errors import IpamError
from shoal.raft.ipam import allocate_after

log = logging.getLogger("shoal.network")
IPRoute, NetlinkError = import_iproute()  # not all of pyroute2: see node/netlink.py


def _restore_inet_ntop() -> None:
    """pysyncobj 0.3.17 (win_inet_pton.py) replaces ``socket.inet_ntop`` on every platform with
    a Windows-only version that raises, and pyroute2 binds ``inet_ntop`` at import: every
    address pyroute2 decodes would come back None. Put the C function back everywhere."""
    real = _socket.inet_ntop
    if socket.inet_ntop is not real:
        socket.inet_ntop = real
    for name, mod in list(sys.modules.items()):
        if name.startswith("pyroute2") and vars(mod).get("inet_ntop", real) is not real:
            mod.inet_ntop = real  # type: ignore[attr-defined]


_restore_inet_ntop()
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_ns_lock = threading.Lock()  # one setns dance at a time
VIP_GUARD = "SHOAL-VIP-IN"  # the filter chain that keeps the VIPs the cluster's own
OVERLAY_BRIDGES = "shb"  # (shoal.node.overlay.BRIDGE_PREFIX: the overlay networks' bridges)


@dataclass
class NetworkConfig:
    # Name of the node's task bridge.
    bridge: str = "shoal0"
    # MTU of the bridge and the task veths.
    mtu: int = 1500
    # Add an iptables MASQUERADE rule so tasks reach addresses outside the cluster network
    # through the node (needs the iptables command; skipped with a warning if absent).
    masquerade: bool = True


def veth_name(task_id: str) -> str:
    return f"sv{task_id[:12]}"  # <= 15 characters, recognisable


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetworkError(f"setns failed: {os.strerror(err)}")


class NodeNetwork:
    def __init__(self, data_dir: Path, subnet: str, cluster_cidr: str,
                 config: NetworkConfig | None = None, vip_cidr: str = "") -> None:
        _restore_inet_ntop()  # pysyncobj may have been imported after this module
        self.config = config or NetworkConfig()
        self.vip_cidr = vip_cidr  # routed locally (to lo) when set
        self.subnet = ipaddress.ip_network(subnet)
        self.cluster_cidr = cluster_cidr
        self.gateway = str(next(self.subnet.hosts()))
        self.state_file = data_dir / "network.json"
        self.addrs: dict[str, str] = {}  # task id → address
        self.last = ""  # the address given last (the next is sought after it: ipam)
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(self.state_file.read_text())
            if data.get("subnet") == subnet:
                self.addrs = dict(data.get("addrs", {}))
                self.last = str(data.get("last", ""))
        self._routes: dict[str, str] = {}

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"subnet": str(self.subnet), "addrs": self.addrs,
                                   "last": self.last}))
        os.replace(tmp, self.state_file)

    # ------------------------------------------------------------------ node
    async def setup(self) -> None:
        """Bridge + gateway address, local VIP route, forwarding, NAT (idempotent)."""
        try:
            await asyncio.to_thread(self._setup)
        except (NetlinkError, OSError, IndexError) as exc:
            raise NetworkError(f"cannot set up the task bridge {self.config.bridge} "
                               f"({self.subnet}): {exc}") from exc

    def _setup(self) -> None:
        cfg = self.config
        with IPRoute() as ip:
            if not ip.link_lookup(ifname=cfg.bridge):
                ip.link("add", ifname=cfg.bridge, kind="bridge")
            idx = ip.link_lookup(ifname=cfg.bridge)[0]
            ip.link("set", index=idx, mtu=cfg.mtu, state="up")
            have = {a.get_attr("IFA_ADDRESS") for a in ip.get_addr(index=idx)}
            if self.gateway not in have:
                ip.addr("add", index=idx, address=self.gateway,
                        prefixlen=self.subnet.prefixlen)
            if self.vip_cidr:
                lo = ip.link_lookup(ifname="lo")[0]
                ip.link("set", index=lo, state="up")
                net = ipaddress.ip_network(self.vip_cidr)
                ip.route("replace", dst=str(net.network_address), dst_len=net.prefixlen,
                         type="local", table=255, scope=254, oif=lo)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        if self.config.masquerade:
            self._masquerade(add=True)
        if self.vip_cidr:
            self._guard_vips(add=True)

    def _masquerade(self, add: bool) -> None:
        ipt = shutil.which("iptables")
        if ipt is None:
            log.warning("iptables not found: tasks cannot reach outside the cluster network "
                        "(install the iptables package)")
            return
        rule = ["-t", "nat", "POSTROUTING", "-s", str(self.subnet), "!", "-d",
                self.cluster_cidr, "-j", "MASQUERADE", "-m", "comment", "--comment", "shoal"]
        exists = subprocess.run([ipt, "-t", "nat", "-C", *rule[2:]], capture_output=True)
        if add and exists.returncode != 0:
            subprocess.run([ipt, "-t", "nat", "-A", *rule[2:]], capture_output=True)
        elif not add and exists.returncode == 0:
            subprocess.run([ipt, "-t", "nat", "-D", *rule[2:]], capture_output=True)

    def _guard_vips(self, add: bool) -> None:
        """The INPUT filter of VIP_CIDR (see the module docstring), made or removed."""
        ipt = shutil.which("iptables")
        if ipt is None:
            if add:
                log.warning("iptables not found: the service VIPs answer machines off the "
                            "cluster that route to this node (install the iptables package)")
            return
        jump = ["INPUT", "-d", self.vip_cidr, "-j", VIP_GUARD]
        if not add:
            subprocess.run([ipt, "-D", *jump], capture_output=True)
            subprocess.run([ipt, "-F", VIP_GUARD], capture_output=True)
            subprocess.run([ipt, "-X", VIP_GUARD], capture_output=True)
            return
        subprocess.run([ipt, "-N", VIP_GUARD], capture_output=True)  # (exists: fine)
        try:
            for argv in (["-F", VIP_GUARD], ["-A", VIP_GUARD, "-i", "lo", "-j", "RETURN"],
                         ["-A", VIP_GUARD, "-i", self.config.bridge, "-j", "RETURN"],
                         ["-A", VIP_GUARD, "-i", f"{OVERLAY_BRIDGES}+", "-j", "RETURN"],
                         ["-A", VIP_GUARD, "-j", "DROP"]):
                subprocess.run([ipt, *argv], capture_output=True, text=True, check=True)
            if subprocess.run([ipt, "-C", *jump], capture_output=True).returncode != 0:
                subprocess.run([ipt, "-I", jump[0], "1", *jump[1:]], capture_output=True,
                               text=True, check=True)
        except subprocess.CalledProcessError as exc:
            log.error("the service VIPs are not filtered (they answer machines off the "
                      "cluster): %s: %s", " ".join(exc.cmd[1:]), exc.stderr.strip())

    async def sync_routes(self, peers: Iterable[tuple[str, str]]) -> None:
        """Routes to other nodes' subnets: ``peers`` = (subnet, node address)."""
        own = str(self.subnet)
        want = {s: a for s, a in peers if s and s != own}
        if want != self._routes:
            await asyncio.to_thread(self._sync_routes, want)

    def _sync_routes(self, want: dict[str, str]) -> None:
        with IPRoute() as ip:
            for subnet, gw in want.items():
                try:
                    ip.route("replace", dst=subnet, gateway=gw)
                except NetlinkError as exc:
                    log.warning("route to %s via %s failed: %s", subnet, gw, exc)
                    continue
            for subnet in set(self._routes) - set(want):
                with contextlib.suppress(NetlinkError):
                    ip.route("del", dst=subnet)
        self._routes = dict(want)

    async def teardown(self) -> None:
        def down() -> None:
            with IPRoute() as ip:
                for subnet in self._routes:
                    with contextlib.suppress(NetlinkError):
                        ip.route("del", dst=subnet)
                if self.vip_cidr:
                    net = ipaddress.ip_network(self.vip_cidr)
                    with contextlib.suppress(NetlinkError):
                        ip.route("del", dst=str(net.network_address), dst_len=net.prefixlen,
                                 type="local", table=255)
                idx = ip.link_lookup(ifname=self.config.bridge)
                if idx:
                    ip.link("del", index=idx[0])
            if self.config.masquerade:
                self._masquerade(add=False)
            if self.vip_cidr:
                self._guard_vips(add=False)
        await asyncio.to_thread(down)
        self.addrs.clear()
        self.state_file.unlink(missing_ok=True)

    # ------------------------------------------------------------------ tasks
    def address_of(self, task_id: str) -> str:
        return self.addrs.get(task_id, "")

    async def attach(self, task_id: str, pid: int) -> str:
        """Give the task (whose namespace holds ``pid``) its address; return it."""
        try:
            addr = self.addrs.get(task_id) or allocate_after(
                str(self.subnet), self.addrs.values(), self.last, skip_first=1)
        except IpamError as exc:
            raise NetworkError(f"cannot attach task {task_id}: {exc}") from exc
        self.addrs[task_id], self.last = addr, addr
        self._save()
        try:
            await asyncio.to_thread(self._attach, task_id, pid, addr)
        except (NetlinkError, OSError, NetworkError) as exc:
            raise NetworkError(f"cannot attach task {task_id} to the network: {exc}") from exc
        return addr

    def _attach(self, task_id: str, pid: int, addr: str) -> None:
        host_end = veth_name(task_id)
        with IPRoute() as ip:
            for idx in ip.link_lookup(ifname=host_end):  # a half-done earlier attempt
                ip.link("del", index=idx)
            br = ip.link_lookup(ifname=self.config.bridge)[0]
            # the peer is created inside the task's namespace as eth0: moving an existing
            # device between namespaces waits for an RCU grace period (~15 ms), this does not
            ip.link("add", ifname=host_end, kind="veth", mtu=self.config.mtu, master=br,
                    peer={"ifname": "eth0", "net_ns_pid": pid, "mtu": self.config.mtu})
            ip.link("set", index=ip.link_lookup(ifname=host_end)[0], state="up")
        self._configure_inside(pid, addr)

    def _configure_inside(self, pid: int, addr: str) -> None:
        with _ns_lock:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
            try:
                _setns(target)
                try:
                    ip = IPRoute()  # its netlink socket stays in the task's namespace
                finally:
                    _setns(own)
            finally:
                os.close(own)
                os.close(target)
        with ip:
            idx = ip.link_lookup(ifname="eth0")[0]
            ip.addr("add", index=idx, address=addr, prefixlen=self.subnet.prefixlen)
            ip.link("set", index=idx, state="up")
            ip.link("set", index=1, state="up")  # lo is always ifindex 1 in a namespace
            ip.route("add", dst="0.0.0.0/0", gateway=self.gateway)

    async def detach(self, task_id: str) -> None:
        if task_id not in self.addrs:
            return

        def drop() -> None:
            with IPRoute() as ip:
                for idx in ip.link_lookup(ifname=veth_name(task_id)):
                    with contextlib.suppress(NetlinkError):
                        ip.link("del", index=idx)
        await asyncio.to_thread(drop)
        self.addrs.pop(task_id, None)
        self._save()

    def forget_except(self, live: Iterable[str]) -> None:
        """Release addresses of tasks the runtime no longer knows (after a restart)."""
        keep = set(live)
        gone = [t for t in self.addrs if t not in keep]
        for t in gone:
            self.addrs.pop(t, None)
        if gone:
            self._save()

    def describe(self) -> dict[str, Any]:
        return {"bridge": self.config.bridge, "subnet": str(self.subnet),
                "gateway": self.gateway, "tasks": dict(self.addrs),
                "routes": dict(self._routes)}
