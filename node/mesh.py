"""The node's share of the cluster network: task networking, the routing mesh, service DNS.

Owns: driving four building blocks from the replicated state, on every member node —

* ``NodeNetwork`` (node/network.py): the bridge from this node's ``Node.subnet``, host-gateway
  routes to every other node's subnet via that node's address, the VIP range routed locally
  (``local VIP_CIDR dev lo``: any VIP can be bound and is delivered to this node's balancer),
  one veth per task (``attach``/``detach``, called by the Worker);
* the ``Balancer`` (shoal.lb: worker processes, the agent only sends tables): one
  ``ServiceLB`` per (service, target port) — frontends on every published port (at its
  ``host_ip`` only when it has one, and only on a node that has that address), and in
  endpoint mode ``vip`` a frontend on ``VIP:port`` for every port the service declares
  (published targets, ``--expose``, the image's ExposedPorts), endpoints = tasks whose
  status is RUNNING with an address and healthy (or without a health check), on any node
  (``serving``); a task whose desired state went past RUNNING stays in the table *draining*
  (no new connections, open ones cut at first-seen + ``stop_grace_period``);
* the ``DnsServer`` (node/dns.py) on the bridge gateway, port 53: ``SERVICE[.shoal]`` → the
  VIP (endpoint mode ``vip``, when the service declares a port), the task addresses
  shuffled per query otherwise (``dnsrr``); ``tasks.SERVICE`` → task addresses, shuffled;
  a service's network aliases (``task.network_aliases``) likewise, on their network only.
  Tasks get ``nameserver GATEWAY`` as their /etc/resolv.conf, with their own search
  domains and options (``resolv_conf``, ``task_files(spec)``, passed to the runtime through
  ``TaskConfig.files``); their other names go to their own ``dns`` servers if they have any
  (``task_upstreams``), else to the node's.

* ``HostPorts`` (node/hostports.py): the DNAT rules of the ports published in host mode
  (``endpoint.host_ports``) to this node's own tasks — not the balancer's.

``plan_tables`` and ``lookup`` are pure (snapshot in, records out) and unit-tested; ``run()``
re-plans on every state change (``wake()``) and every ``resync`` seconds, and sends only the
tables that changed. Errors::

    NetworkError (node/errors.py)
     └─ MeshError           mesh not started / no subnet for this node yet

Must not touch: the store (read-only snapshots), the runtime (the Worker calls ``attach``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.lb import Balancer
from shoal.lb.config import Config as LBConfig
from shoal.lb.errors import LBError
from shoal.lb.model import Algorithm, Endpoint, Frontend, Proto, ServiceLB
from shoal.node import dns
from shoal.node.errors import MeshError, NetworkError
from shoal.node.hostports import HostPorts
from shoal.node.network import NetworkConfig, NodeNetwork
from shoal.node.overlay import Overlay, OverlayConfig
from shoal.raft.models import Service, Task, TaskSpec, TaskState
from shoal.raft.state import Snapshot
from shoal.runtime.rootfs import FileValue

log = logging.getLogger("shoal.mesh")

# seconds an image's ExposedPorts are cached (an image loaded later is seen this much later)
IMAGE_PORTS_TTL = 5.0
_ALGORITHMS = {"round-robin": Algorithm.ROUND_ROBIN, "least-conn": Algorithm.LEAST_CONNECTIONS}


@dataclass
class MeshConfig:
    # UDP port of the node's DNS server on the bridge gateway address. 53: tasks' resolvers
    # cannot be told another port. 0 = no DNS server (tasks keep the host's resolv.conf).
    dns_port: int = 53
    # Seconds between two full re-plans when nothing wakes the mesh (every applied command
    # wakes it; this retries a table the balancer refused and reads image ports pulled since).
    # Lower = faster repair, more wake-ups of an idle agent.
    resync: float = 2.0
    # Seconds ``attach`` waits for the mesh to be up (bridge made) before giving up.
    ready_timeout: float = 15.0
    # The balancer's settings; ``listen_addrs`` is replaced by the node's advertise address,
    # 127.0.0.1 and the bridge gateway (published ports listen on those, a port with a
    # ``host_ip`` there only, VIPs on themselves).
    lb: LBConfig | None = None
    # The bridge, MTU and masquerade settings.
    network: NetworkConfig | None = None
    # User-defined networks: VXLAN port, MTU, isolation rules (node/overlay.py).
    overlay: OverlayConfig | None = None


def lb_name(service: str, target: int) -> str:
    """The balancer table name of one (service, target port)."""
    return f"{service}.{target}"


def serving(task: Task) -> bool:
    """May ``task`` receive new connections (and be a DNS answer)? RUNNING with an address,
    and healthy if it has a health check: a task still starting or unhealthy gets none."""
    return task.status.up and bool(task.status.addr)


ImagePorts = Callable[[str], tuple[tuple[int, str], ...]]


def _no_image_ports(_image: str) -> tuple[tuple[int, str], ...]:
    return ()


def vip_ports(svc: Service, image_ports: ImagePorts) -> tuple[tuple[int, str], ...]:
    """(port, protocol) the service's VIP serves (``ServiceSpec.vip_ports``, with the
    image's ExposedPorts from this node's store); none without a VIP."""
    if not svc.vip:
        return ()
    image = svc.spec.task.container.image
    return svc.spec.vip_ports(image_ports(image) if image else ())


def balanced(snap: Snapshot, image_ports: ImagePorts = _no_image_ports
             ) -> Iterator[tuple[Service, tuple[tuple[int, str], ...]]]:
    """The services the balancer serves (a published port, or a VIP with ports), each with
    its VIP's (port, protocol)."""
    for svc in snap.services.values():
        vips = vip_ports(svc, image_ports)
        if svc.spec.endpoint.ports or vips:
            yield svc, vips


def _everywhere(_addr: str) -> bool:
    return True


def host_ips(snap: Snapshot) -> set[str]:
    """The addresses published ports of the routing mesh are given (``host_ip``)."""
    return {p.host_ip for svc in snap.services.values() for p in svc.spec.endpoint.ports
            if p.host_ip}


def has_address(addr: str) -> bool:
    """Whether this node (its network namespace) has the IPv4 address ``addr``: a socket
    binds there. Another error than "not an address of this node" says yes (the balancer
    then reports it for the table)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((addr, 0))
        except OSError as exc:
            return exc.errno != errno.EADDRNOTAVAIL
    return True


def plan_tables(snap: Snapshot, drain_since: Mapping[str, float],
                image_ports: ImagePorts = _no_image_ports,
                has_addr: Callable[[str], bool] = _everywhere) -> dict[str, ServiceLB]:
    """The balancer tables the state asks for: one per (service, target port) — every port a
    service publishes (listening on every node; a port given a ``host_ip`` at that address
    only, and not at all on a node without it: ``has_addr(host_ip)`` false) and, in
    endpoint mode ``vip``, every port its VIP serves (published targets, ``expose``, the
    image's ExposedPorts from ``image_ports(image)``). ``drain_since``: task id → wall-clock
    time its stop was first seen (its connections are cut at that time + the task's
    ``stop_grace_period``)."""
    out: dict[str, ServiceLB] = {}
    for svc, vips in balanced(snap, image_ports):
        ep = svc.spec.endpoint
        endpoints: list[Endpoint] = []
        for task in snap.tasks_of(svc.id):
            st = task.status
            if not serving(task):
                continue
            deadline = None
            if task.desired_state > TaskState.RUNNING:
                deadline = drain_since.get(task.id, 0.0) + task.spec.container.stop_grace_period
            endpoints.append(Endpoint(st.addr, task.id, None, deadline))
        endpoints.sort(key=lambda e: e.task_id)
        by_target: dict[int, list[Frontend]] = {}
        for p in ep.ports:
            if p.host_ip and not has_addr(p.host_ip):
                continue
            by_target.setdefault(p.target, []).append(
                Frontend(p.published, Proto(p.protocol), p.host_ip or None))
        for port, proto in vips:  # the VIP's listeners that publishing does not imply (a
            # port published at one address implies none: ServiceLB.all_frontends)
            published = {f.proto for f in by_target.get(port, ()) if f.addr is None}
            if Proto(proto) not in published:
                by_target.setdefault(port, []).append(Frontend(port, Proto(proto), svc.vip))
        for target, frontends in sorted(by_target.items()):
            name = lb_name(svc.spec.name, target)
            out[name] = ServiceLB(
                name=name, target_port=target, frontends=tuple(frontends),
                endpoints=tuple(endpoints), vip=svc.vip if vips else None,
                algorithm=_ALGORITHMS.get(ep.lb_algorithm, Algorithm.ROUND_ROBIN))
    return out


def stopping_tasks(snap: Snapshot, image_ports: ImagePorts = _no_image_ports) -> set[str]:
    """Tasks still RUNNING whose desired state moved past RUNNING (they are being stopped),
    of the services the balancer serves: the others have no connections to drain, and
    going through every task of the cluster at each sync was a worker's main cost while
    1,000 tasks started (issue 16's scale lab)."""
    out: set[str] = set()
    for svc, _ in balanced(snap, image_ports):
        out.update(t.id for t in snap.tasks_of(svc.id) if t.status.state
                   is TaskState.RUNNING and t.desired_state > TaskState.RUNNING)
    return out


def service_networks(svc: Service) -> tuple[str, ...]:
    """The networks a service's tasks are on ("" = the cluster's default network)."""
    return svc.spec.task.networks or ("",)


def networks_of_addr(snap: Snapshot, addr: str, subnet: str = "") -> set[str] | None:
    """The networks of the task that has ``addr`` ("" = the default network); None when no
    live task has it (the node itself, a client outside the cluster). ``subnet``: this
    node's task subnet — an address of it that no task has is on the default network all
    the same (its bridge carries nothing else: an `image build` RUN step, a task whose
    address the state does not show yet), but for its gateway (the node itself)."""
    for t in snap.tasks.values():
        if t.status.state.terminal:
            continue
        if t.net_addrs and addr in t.net_addrs.values():
            return set(t.net_addrs)
        if t.status.addr == addr and not t.spec.networks:
            return {""}
    if subnet and addr:
        with contextlib.suppress(ValueError):
            net, ip = ipaddress.ip_network(subnet), ipaddress.ip_address(addr)
            if ip in net and ip != next(net.hosts()):
                return {""}
    return None


def lookup(snap: Snapshot, name: str, image_ports: ImagePorts = _no_image_ports,
           shuffle: Callable[[list[str]], None] | None = None,
           asker: str = "", subnet: str = "") -> list[str] | None:
    """DNS: ``SERVICE`` → [VIP] in endpoint mode ``vip`` when the VIP serves a port (a
    service that declares none answers on its task addresses: a VIP would refuse every
    connection); in ``dnsrr`` mode its task addresses, passed through ``shuffle`` (each
    query gets another order, so resolvers do not pin one task). ``tasks.SERVICE`` → its
    task addresses (shuffled likewise); None = not a shoal name. ``asker``: the client's
    address — a task sees only services on a network it is on (no addresses otherwise),
    and task addresses on that shared network. A name that finds no service there is
    looked up as a network alias (``alias_lookup``): a service's own name wins. ``subnet``:
    the answering node's task subnet (``networks_of_addr``)."""
    tasks_only = name.startswith("tasks.")
    svc: Service | None = snap.service_by_name(name[6:] if tasks_only else name)
    if svc is not None:
        mine = networks_of_addr(snap, asker, subnet) if asker else None
        ips = _answer(snap, svc, service_networks(svc), tasks_only, mine, image_ports)
        if ips is not None:
            if shuffle is not None:
                shuffle(ips)
            return ips
    return alias_lookup(snap, name, image_ports, shuffle, asker, subnet)


def _answer(snap: Snapshot, svc: Service, nets: tuple[str, ...], tasks_only: bool,
            mine: set[str] | None, image_ports: ImagePorts, alias: bool = False
            ) -> list[str] | None:
    """``svc``'s answer by a name it has on ``nets`` ("" = the default network) for an
    asker on the networks ``mine``, with the tasks' addresses on the first shared one;
    None when it shares none. ``mine`` None (not a task: the node itself): every name
    answers, with the tasks' primary addresses (an ``alias``: those on its network)."""
    net = nets[0] if alias else ""
    if mine is not None:
        shared = [n for n in nets if n in mine]
        if not shared:  # not a name on the asker's networks: unknown there (as Docker's
            return None  # resolver: forwarded, so an outside host of that name still works)
        net = shared[0]
    if not tasks_only and vip_ports(svc, image_ports):
        return [svc.vip]
    addrs = sorted((t.net_addrs.get(net, "") if net else t.status.addr)
                   for t in snap.tasks_of(svc.id)
                   if serving(t) and t.desired_state <= TaskState.RUNNING)
    return list(dict.fromkeys(a for a in addrs if a))  # (host-network tasks: their node's)


def alias_lookup(snap: Snapshot, name: str, image_ports: ImagePorts = _no_image_ports,
                 shuffle: Callable[[list[str]], None] | None = None,
                 asker: str = "", subnet: str = "") -> list[str] | None:
    """``ALIAS`` / ``tasks.ALIAS``: a service's network alias (``task.network_aliases``,
    Docker's ``--network name=N,alias=A``) answers exactly as the service's name does (VIP,
    or its tasks' addresses), but only to askers on a network it is given for. As
    libnetwork's, ``tasks.ALIAS`` answers the tasks' addresses. Several services with the
    alias on the asker's networks: all their answers (Docker's records pile up likewise);
    None when none has it there."""
    tasks_only = name.startswith("tasks.")
    alias = name[6:] if tasks_only else name
    found: list[tuple[str, Service, tuple[str, ...]]] = []
    for svc in snap.services.values():
        given = svc.spec.task.network_aliases
        nets = tuple(n for n in svc.spec.task.networks
                     if any(a.lower() == alias for a in given.get(n, ()))) if given else ()
        if nets:
            found.append((svc.spec.name, svc, nets))
    if not found:
        return None
    mine = networks_of_addr(snap, asker, subnet) if asker else None
    out: list[str] | None = None
    for _, svc, nets in sorted(found, key=lambda f: f[0]):
        ips = _answer(snap, svc, nets, tasks_only, mine, image_ports, alias=True)
        if ips is not None:
            out = list(dict.fromkeys((out or []) + ips))
    if out is not None and shuffle is not None:
        shuffle(out)
    return out


# --- a stack's short names (issue 13) ------------------------------------------------------
# Swarm gives each service of a stack the alias SERVICE on the stack's network, so a task of
# stack X finds X_web as "web". Here: the asking task's address → its service's stack label
# → X_<name>. The label is the one shoal.cli.compose writes (tests check they agree).
STACK_LABEL = "com.docker.stack.namespace"


def stack_lookup(snap: Snapshot, name: str, client: str) -> list[str] | None:
    """``web`` / ``tasks.web`` asked by a task of stack X → ``lookup`` of ``X_web`` on the
    networks the asker shares with it (Swarm's alias lives on the service's networks only);
    None when the asker is in no stack, X has no such service, or none on its networks —
    then the name is looked up as any other (a service ``web`` on the asker's network)."""
    asker = next((t for t in snap.tasks.values() if t.desired_state <= TaskState.RUNNING
                  and (t.status.addr == client or client in t.net_addrs.values())),
                 None) if client else None
    svc = snap.services.get(asker.service_id) if asker is not None else None
    stack = svc.spec.labels.get(STACK_LABEL, "") if svc is not None else ""
    if not stack:
        return None
    prefix = "tasks." if name.startswith("tasks.") else ""
    return lookup(snap, f"{prefix}{stack}_{name[len(prefix):]}", asker=client)
# ------------------------------------------------------------------------------------------


def forwards_for(snap: Snapshot, client: str) -> bool:
    """Whether the DNS server forwards ``client``'s other names upstream: not for a task
    whose networks are all internal (CVE-2024-29018: a query is a way out of the network;
    moby's resolver stopped forwarding for them likewise)."""
    nets = networks_of_addr(snap, client) if client else None
    if not nets:
        return True  # (the node itself, or a default-network task)
    return not all(n and (net := snap.network_by_name(n)) is not None and net.internal
                   for n in nets)


def task_upstreams(snap: Snapshot, client: str) -> list[str] | None:
    """The resolvers the DNS server forwards ``client``'s other names to: the ``dns``
    servers of the live task with that address (Docker's ``--dns``: moby's embedded resolver
    forwards to them instead of the host's), None for the node's own — a client that is no
    task, a task without ``dns``, or on the host's network (its address is the node's, shared
    by every such task; it names its servers in its resolv.conf instead). Whether to forward
    at all is ``forwards_for``'s (an internal network's task: never, whatever it names)."""
    if not client:
        return None
    for t in snap.tasks.values():
        if t.status.state.terminal or t.spec.network_mode == "host":
            continue
        if client in t.net_addrs.values() or (t.status.addr == client and not t.spec.networks):
            return list(t.spec.container.dns) or None
    return None


@dataclass(frozen=True)
class HostResolv:
    """What the node's own /etc/resolv.conf says (read once by the Mesh)."""

    servers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()  # (without shoal's own domain)
    options: tuple[str, ...] = ()

    @classmethod
    def read(cls, path: str = "/etc/resolv.conf") -> HostResolv:
        return cls(tuple(dns.host_upstreams(path)), tuple(dns.host_search(path)),
                   tuple(dns.host_options(path)))


def resolv_conf(spec: TaskSpec, gateway: str, host: HostResolv) -> str | None:
    """A task's /etc/resolv.conf. With the node's DNS server (``gateway``: its address, ""
    = none on this node): ``nameserver GATEWAY`` (service names; other names forwarded, to
    the task's ``dns`` servers if it has any: ``task_upstreams``), ``search`` shoal's domain
    then the task's ``dns_search`` (else the host's domains; Docker's rule: given ones
    replace the host's, "." = none), ``options ndots:1`` (unless its ``dns_options`` name
    ndots: the user's wins) and its ``dns_options``. Without the node's DNS server, or on
    the host's network with ``dns`` given, Docker's: the ``dns`` servers named directly
    (else the host's), its search domains and options (else the host's), no shoal domain.
    None: nothing to write (no node DNS and no settings: the host's file as it is)."""
    c = spec.container
    direct = not gateway or (spec.network_mode == "host" and bool(c.dns))
    if direct and not (c.dns or c.dns_search or c.dns_options):
        return None
    search = [d.rstrip(".") for d in c.dns_search if d != "."] if c.dns_search \
        else list(host.search)
    if direct:  # (the host's loopback servers are not the task's: runtime/rootfs.py's rule)
        servers = list(c.dns) or [s for s in host.servers if spec.network_mode == "host"
                                  or not (s.startswith("127.") or s == "::1")]
        options = list(c.dns_options or host.options)
    else:
        servers, search = [gateway], [dns.DOMAIN, *(d for d in search if d != dns.DOMAIN)]
        ndots = any(o.partition(":")[0] == "ndots" for o in c.dns_options)
        options = [*([] if ndots else ["ndots:1"]), *c.dns_options]
    lines = [f"nameserver {s}" for s in servers]
    if search:
        lines.append("search " + " ".join(dict.fromkeys(search)))
    if options:
        lines.append("options " + " ".join(dict.fromkeys(options)))
    return "\n".join(lines) + "\n"


def peer_routes(snap: Snapshot, node_id: str) -> list[tuple[str, str]]:
    """(subnet, via address) of every other node."""
    return sorted((n.subnet, n.addr) for n in snap.nodes.values() if n.id != node_id and n.subnet)


class Mesh:
    """One per member agent; every method runs on the agent's event loop."""

    def __init__(self, data_dir: Path, node_id: str, advertise_addr: str,
                 snapshot: Callable[[], Snapshot | None], is_ready: Callable[[], bool],
                 live_tasks: Callable[[], Iterable[str]],
                 config: MeshConfig | None = None,
                 image_ports: ImagePorts | None = None) -> None:
        self.data_dir = data_dir
        self.node_id = node_id
        self.advertise_addr = advertise_addr
        self.config = config or MeshConfig()
        self._snapshot = snapshot
        self._is_ready = is_ready
        self._live_tasks = live_tasks
        # image ref → its ExposedPorts, read from this node's image store (blocking: called
        # in a thread, cached for IMAGE_PORTS_TTL seconds)
        self._read_image_ports = image_ports
        self._image_ports: dict[str, tuple[float, tuple[tuple[int, str], ...]]] = {}
        self._host_resolv = HostResolv.read()  # (read once: what tasks' resolv.conf keep)
        self.network: NodeNetwork | None = None
        self.overlay: Overlay | None = None
        self.host_ports = HostPorts(node_id)
        self.balancer: Balancer | None = None
        self._dns: asyncio.DatagramTransport | None = None
        self._dns_server: dns.DnsServer | None = None
        self._snap: Snapshot | None = None
        self._pushed: dict[str, ServiceLB] = {}
        self._drain_since: dict[str, float] = {}
        self._wakeup = asyncio.Event()
        self._ready = asyncio.Event()
        self._closed = False
        self.errors: dict[str, str] = {}  # table name → why the balancer refused it
        # (host_ip, "PORT/PROTO (SERVICE)") of the ports this node skips, lacking the address
        # (each said once, at info)
        self.skipped: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ lifecycle
    def wake(self) -> None:
        self._wakeup.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def run(self) -> None:
        """Set the node up once its subnet is in the state, then follow the state."""
        while not self._closed and not self.ready:
            snap = self._snapshot() if self._is_ready() else None
            node = snap.nodes.get(self.node_id) if snap is not None else None
            if snap is not None and node is not None and node.subnet:
                try:
                    await self._start(snap, node.subnet)
                except (NetworkError, LBError, OSError) as exc:
                    log.error("cluster network could not start (retrying): %s", exc)
                    await self._close_parts()
            if not self.ready:
                await self._sleep(1.0)
        while not self._closed:
            self._wakeup.clear()
            try:
                await self.sync()
            except Exception:
                log.exception("mesh sync failed; retrying")
            await self._sleep(self.config.resync)

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)  # Event.wait() on a set event does not yield
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):  # (wait_for can swallow a cancel)
                await self._wakeup.wait()
        self._wakeup.clear()

    async def _start(self, snap: Snapshot, subnet: str) -> None:
        cluster = snap.cluster
        net = NodeNetwork(self.data_dir, subnet, cluster.cluster_cidr, self.config.network,
                          vip_cidr=cluster.vip_cidr)
        self.network = net
        await net.setup()
        live = set(self._live_tasks())
        net.forget_except(live)
        self.overlay = Overlay(self.node_id, self.advertise_addr, net.config.bridge,
                               self.config.overlay)
        for tid in live:  # tasks that survived an agent restart keep their interfaces
            task = snap.tasks.get(tid)
            if task is not None and task.spec.networks:
                self.overlay.adopt(task)
        lb_cfg = (self.config.lb or LBConfig()).replace(
            listen_addrs=tuple(dict.fromkeys((self.advertise_addr, "127.0.0.1", net.gateway))))
        self.balancer = Balancer(lb_cfg)
        await self.balancer.start()
        if self.config.dns_port:
            self._dns, self._dns_server = await dns.serve(
                self._dns_lookup, net.gateway, self.config.dns_port,
                scoped=self._dns_stack_lookup, lookup_from=self._dns_lookup_from,
                forwards=self._dns_forwards, upstreams_for=self._dns_upstreams)
        self._ready.set()
        log.info("cluster network up: subnet %s, gateway %s, balancer pids %s", subnet,
                 net.gateway, self.balancer.pids)

    async def close(self, teardown: bool = False) -> None:
        """Stop the balancer and DNS; with ``teardown`` also remove the bridge, routes and
        NAT rule (leaving the cluster). Running tasks keep their addresses otherwise."""
        self._closed = True
        self._wakeup.set()
        net = self.network
        await self._close_parts()
        if teardown and self.overlay is not None:
            with contextlib.suppress(NetworkError, OSError):
                await self.overlay.teardown()
        if teardown:
            with contextlib.suppress(NetworkError, OSError):
                await self.host_ports.teardown()
        if teardown and net is not None:
            with contextlib.suppress(NetworkError, OSError):
                await net.teardown()

    async def _close_parts(self) -> None:
        self._ready.clear()
        if self._dns is not None:
            self._dns.close()  # (and its TCP listener)
            self._dns = None
        if self.balancer is not None:
            balancer, self.balancer = self.balancer, None
            with contextlib.suppress(LBError, OSError):
                await balancer.close()
        self._pushed.clear()

    # ------------------------------------------------------------------ tasks
    async def attach(self, task_id: str, pid: int) -> str:
        """Give a started task (its init is ``pid``) its veth and address; return the address.
        Raises MeshError if the mesh is not up within ``ready_timeout``, NetworkError."""
        if not self.ready:
            try:
                await asyncio.wait_for(self._ready.wait(), self.config.ready_timeout)
            except TimeoutError:
                raise MeshError("the node's network is not set up yet (no subnet assigned?)"
                                ) from None
        assert self.network is not None
        snap = self._snapshot() if self._is_ready() else None
        task = snap.tasks.get(task_id) if snap is not None else None
        if task is not None and task.spec.networks:  # user-defined networks only
            assert snap is not None and self.overlay is not None
            return await self.overlay.attach(task, pid, snap, self.network.gateway)
        return await self.network.attach(task_id, pid)

    def address_of(self, task_id: str) -> str:
        if self.overlay is not None and self.overlay.address_of(task_id):
            return self.overlay.address_of(task_id)
        return self.network.address_of(task_id) if self.network is not None else ""

    async def detach(self, task_id: str) -> None:
        if self.overlay is not None:
            await self.overlay.detach(task_id)
        if self.network is not None:
            await self.network.detach(task_id)

    def task_files(self, spec: TaskSpec | None = None) -> dict[str, FileValue]:
        """Files a task of ``spec`` gets (None: a task without DNS settings): its
        /etc/resolv.conf, naming this node's DNS server (``resolv_conf``)."""
        gateway = self.network.gateway if self.config.dns_port and self.network is not None \
            else ""
        text = resolv_conf(spec if spec is not None else TaskSpec(), gateway, self._host_resolv)
        return {"/etc/resolv.conf": (text.encode(), 0o644)} if text is not None else {}

    # ------------------------------------------------------------------ state → tables
    def _dns_lookup(self, name: str) -> list[str] | None:
        snap = self._snap
        return lookup(snap, name, self._cached_image_ports, random.shuffle) \
            if snap is not None else None

    def _dns_lookup_from(self, name: str, client: str) -> list[str] | None:
        snap, net = self._snap, self.network
        return lookup(snap, name, self._cached_image_ports, random.shuffle, client,
                      str(net.subnet) if net is not None else "") if snap is not None else None

    def _dns_forwards(self, client: str) -> bool:
        snap = self._snap
        return snap is None or forwards_for(snap, client)

    def _dns_upstreams(self, client: str) -> list[str] | None:
        snap = self._snap
        return task_upstreams(snap, client) if snap is not None else None

    def _cached_image_ports(self, image: str) -> tuple[tuple[int, str], ...]:
        hit = self._image_ports.get(image)
        return hit[1] if hit is not None else ()

    async def _refresh_image_ports(self, snap: Snapshot, now: float) -> None:
        read = self._read_image_ports
        if read is None:
            return
        refs = {s.spec.task.container.image for s in snap.services.values()} - {""}
        for ref in refs:
            hit = self._image_ports.get(ref)
            if hit is None or now - hit[0] > IMAGE_PORTS_TTL:
                try:
                    ports = await asyncio.to_thread(read, ref)
                except Exception:  # (an image not on this node yet, a race with `image rm`)
                    ports = ()
                self._image_ports[ref] = (now, ports)
        for ref in set(self._image_ports) - refs:
            del self._image_ports[ref]

    def _dns_stack_lookup(self, name: str, client: str) -> list[str] | None:
        snap = self._snap
        return stack_lookup(snap, name, client) if snap is not None else None

    async def sync(self) -> None:
        """One pass: routes, then every balancer table that changed."""
        if not self._is_ready():
            return
        snap = self._snapshot()
        if snap is None or self.network is None or self.balancer is None:
            return
        self._snap = snap
        await self.network.sync_routes(peer_routes(snap, self.node_id))
        if self.overlay is not None:
            try:
                await self.overlay.sync(snap)
            except (NetworkError, OSError) as exc:
                log.warning("overlay networks: %s", exc)
        try:
            await self.host_ports.sync(snap)
        except (NetworkError, OSError) as exc:
            self.host_ports.error = str(exc)
            log.warning("ports published in host mode: %s", exc)
        now = time.time()
        stopping = stopping_tasks(snap, self._cached_image_ports)
        for tid in stopping:
            self._drain_since.setdefault(tid, now)
        for tid in set(self._drain_since) - stopping:
            del self._drain_since[tid]
        await self._refresh_image_ports(snap, now)
        want = plan_tables(snap, self._drain_since, self._cached_image_ports,
                           self._has_addresses(snap).__contains__)
        for name, table in want.items():
            if self._pushed.get(name) == table:
                continue
            try:
                await self.balancer.set_service(table)
            except LBError as exc:
                if self.errors.get(name) != str(exc):
                    log.warning("balancer refused %s: %s", name, exc)
                self.errors[name] = str(exc)
                continue
            self.errors.pop(name, None)
            self._pushed[name] = table
        for name in set(self._pushed) - set(want):
            with contextlib.suppress(LBError):
                await self.balancer.remove_service(name)
            self._pushed.pop(name, None)
            self.errors.pop(name, None)

    def _has_addresses(self, snap: Snapshot) -> set[str]:
        """The published ports' ``host_ip`` addresses this node has. A port at one it lacks
        is left out here and said once, at info (again only if the address came and went,
        or the port did)."""
        asked = host_ips(snap)
        present = {a for a in asked if has_address(a)}
        skipped = {(p.host_ip, f"{p.published}/{p.protocol} ({s.spec.name})")
                   for s in snap.services.values() for p in s.spec.endpoint.ports
                   if p.host_ip and p.host_ip not in present}
        new: dict[str, list[str]] = {}
        for addr, port in sorted(skipped - self.skipped):
            new.setdefault(addr, []).append(port)
        for addr, ports in new.items():
            log.info("not publishing %s at %s: not an address of this node", ", ".join(ports),
                     addr)
        self.skipped = skipped
        return present

    def describe(self) -> dict[str, Any]:
        """For ``shoal info``: subnet, gateway, task addresses, routes, tables, errors."""
        out: dict[str, Any] = {"ready": self.ready, "errors": dict(self.errors),
                               "services": sorted(self._pushed)}
        if self.network is not None:
            out.update(self.network.describe())
        if self.overlay is not None:
            out["overlay"] = self.overlay.describe()
        if self.skipped:  # (host_ip addresses this node lacks: those ports skip it)
            out["absent_host_ips"] = sorted({addr for addr, _ in self.skipped})
        if self.host_ports.error:
            out["errors"]["host_ports"] = self.host_ports.error
        if self._dns_server is not None:
            out["dns"] = dict(self._dns_server.stats)
        return out
