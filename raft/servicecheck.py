"""Service and task helpers of the state machine: what a service spec must agree with in the
rest of the state, and the deterministic allocations made while a command applies.

Owns: published-port assignment (``assign_ports``: ``-p TARGET`` gets a port of
ASSIGNED_PORTS), the cross-object checks of a service spec (``check_spec``: ports, networks,
volume key secrets), a task's addresses on its networks (``net_addresses``), the autoscaled
service's manual-scale refusal and a scheduled job's run record (``job_op``). Pure and
deterministic like every part of shoal.raft.state (every manager computes the same); raises
only ``Rejected``. Must not touch: the state's maps (it reads them; ``ClusterState``'s handlers
write), the op dispatch, pysyncobj, the network.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Protocol

import msgspec

from shoal.raft import networks as netalloc
from shoal.raft.errors import IpamError, Rejected
from shoal.raft.models import (
    JobRun,
    JobStatus,
    Network,
    Service,
    ServiceSpec,
    Task,
    TaskState,
    Volume,
    resolve_mount,
)
from shoal.raft.spec import ASSIGNED_PORTS


class ServiceState(Protocol):
    """What these helpers read of shoal.raft.state.ClusterState (not imported: it imports
    this module)."""

    services: dict[str, Service]
    tasks: dict[str, Task]
    networks: dict[str, Network]
    volumes: dict[str, Volume]


def assign_ports(state: ServiceState, spec: ServiceSpec, sid: str, old: ServiceSpec | None
                  ) -> ServiceSpec:
    """``spec`` with each published port 0 (``-p TARGET``) replaced: the port the service
    already had for that target and protocol (an update keeps it), else the lowest of
    ASSIGNED_PORTS no service publishes (deterministic: every manager applies the same)."""
    if not any(p.published == 0 for p in spec.endpoint.ports):
        return spec
    taken = {(p.published, p.protocol) for s in state.services.values() if s.id != sid
             for p in s.spec.endpoint.ports}
    taken |= {(p.published, p.protocol) for s in state.services.values() if s.id != sid
              for p in s.spec.endpoint.host_ports}
    taken |= {(p.published, p.protocol) for p in spec.endpoint.ports if p.published}
    taken |= {(p.published, p.protocol) for p in spec.endpoint.host_ports}
    if spec.task.network_mode == "host":  # (its tasks hold their targets on the node)
        taken |= {(p.target, p.protocol) for p in spec.endpoint.ports}
    had = {(p.target, p.protocol): p.published for p in (old.endpoint.ports if old else ())
           if p.published in ASSIGNED_PORTS}
    ports = []
    for p in spec.endpoint.ports:
        if p.published == 0:
            port = had.pop((p.target, p.protocol), 0)
            if not port or (port, p.protocol) in taken:
                port = next((n for n in ASSIGNED_PORTS if (n, p.protocol) not in taken), 0)
            if not port:
                raise Rejected("exhausted", "no free port left in 30000-32767 to publish "
                               f"target {p.target}/{p.protocol}", "endpoint.ports")
            taken.add((port, p.protocol))
            p = msgspec.structs.replace(p, published=port)
        ports.append(p)
    return msgspec.structs.replace(spec, endpoint=msgspec.structs.replace(
        spec.endpoint, ports=tuple(ports)))


def check_ports(state: ServiceState, spec: ServiceSpec, sid: str) -> None:
    """A published port belongs to one service cluster-wide (every node listens on it); a
    port that tasks on the host's network listen on is nobody else's listener either."""
    for other in state.services.values():
        if other.id == sid:
            continue
        mine = {(p.published, p.protocol) for p in spec.endpoint.ports}
        for p in other.spec.endpoint.ports:
            if (p.published, p.protocol) in mine:
                raise Rejected("conflict", f"port {p.published}/{p.protocol} is already "
                               f"published by service {other.spec.name}",
                               "endpoint.ports")
        for host, held, by in ((spec, other.spec, other.spec.name),
                               (other.spec, spec, spec.name)):
            clash = host_ports(host) & listened(held)
            if clash:
                port, proto = min(clash)
                raise Rejected("conflict", f"port {port}/{proto}: the tasks of service "
                               f"{host.name} on the host's network listen on it on their "
                               f"nodes, and service {by} has a routing-mesh listener on "
                               "it on every node", "task.network_mode")
        _check_host_mode(spec, other.spec)


def _check_host_mode(spec: ServiceSpec, other: ServiceSpec) -> None:
    """A port published in host mode belongs to one service too (simpler than Swarm, whose
    scheduler keeps two such services apart): nor may it be a routing-mesh listener (every
    node has it) or a port tasks on the host's network bind, whichever service comes
    second."""
    mine = published_on_host(spec)
    theirs = published_on_host(other)
    for held, by in ((theirs, "publishes it in host mode"),
                     ({(p.published, p.protocol) for p in other.endpoint.ports},
                      "publishes it through the routing mesh on every node"),
                     (host_ports(other), "has tasks on the host's network listening on it")):
        clash = mine & held
        if clash:
            port, proto = min(clash)
            raise Rejected("conflict", f"port {port}/{proto}: service {other.name} {by}",
                           "endpoint.host_ports")
    clash = theirs & ({(p.published, p.protocol) for p in spec.endpoint.ports}
                      | host_ports(spec))
    if clash:
        port, proto = min(clash)
        raise Rejected("conflict", f"port {port}/{proto} is published in host mode by "
                       f"service {other.name}", "endpoint.ports" if spec.endpoint.ports
                       else "task.network_mode")


def published_on_host(spec: ServiceSpec) -> set[tuple[int, str]]:
    """The ports a service publishes in host mode (on the nodes running its tasks)."""
    return {(p.published, p.protocol) for p in spec.endpoint.host_ports}


def host_ports(spec: ServiceSpec) -> set[tuple[int, str]]:
    """The node ports a service's tasks on the host's network listen on, as far as the spec
    says (its published targets and ``expose``); none for other network modes."""
    if spec.task.network_mode != "host":
        return set()
    ep = spec.endpoint
    return {(p.target, p.protocol) for p in ep.ports} | {(e.port, e.protocol)
                                                          for e in ep.expose}


def listened(spec: ServiceSpec) -> set[tuple[int, str]]:
    """The ports the routing mesh listens on for a service on every node: its published
    ports and, with a VIP, the ports the VIP serves (as far as the spec says: the image's
    ExposedPorts are the node's to read)."""
    return {(p.published, p.protocol) for p in spec.endpoint.ports} | set(spec.vip_ports())


def check_volume_keys(state: ServiceState, spec: ServiceSpec) -> None:
    """A volume's key secret (sshfs ``IdentityFile-secret``) reaches a node only as a
    secret of the task: the service must use it."""
    c = spec.task.container
    names = {r.name for r in c.secrets}
    for i, m in enumerate(c.mounts):
        if m.type != "volume":
            continue
        opts = resolve_mount(m, state.volumes)[1]
        key = next((v for k, v in opts.items() if k.lower() == "identityfile-secret"), "")
        if key and key not in names:
            raise Rejected("invalid", f"volume {m.source} takes its key from the secret "
                           f"{key}: the service must use it too (--secret {key})",
                           f"task.container.mounts[{i}]")


def check_networks(state: ServiceState, spec: ServiceSpec) -> None:
    names = {n.name for n in state.networks.values()}
    for i, name in enumerate(spec.task.networks):
        if name not in names:
            raise Rejected("not_found", f"no such network: {name} (create it with "
                           "`shoal network create`)", f"task.networks[{i}]")


def check_spec(state: ServiceState, spec: ServiceSpec, sid: str) -> None:
    """What a created or updated service's spec must agree with in the rest of the state:
    its published ports are its own, its networks exist, its volumes' key secrets are
    used (each check raises Rejected naming the field)."""
    check_ports(state, spec, sid)
    check_networks(state, spec)
    check_volume_keys(state, spec)


def net_addresses(state: ServiceState, t: Task, used: dict[str, set[str]]) -> dict[str, str]:
    """``t``'s address on each of its networks (deterministic: lowest free)."""
    out: dict[str, str] = {}
    for name in t.spec.networks:
        net = next((n for n in state.networks.values() if n.name == name), None)
        if net is None:
            continue
        # (an ORPHANED task may still run on a node cut off from the cluster: its
        # address is not reused while its record exists)
        taken = used.setdefault(name, {
            x.net_addrs[name] for x in state.tasks.values()
            if name in x.net_addrs and (not x.status.state.terminal
                                        or x.status.state is TaskState.ORPHANED)})
        try:
            addr = netalloc.pick_task_address(net.subnet, net.gateway, taken)
        except IpamError:
            continue  # the task starts without it and says so (node/mesh.py)
        taken.add(addr)
        out[name] = addr
    return out


def refuse_manual_scale(svc: Service) -> None:
    """An autoscaled service's replica count is the autoscaler's (shoal.node.autoscale)."""
    auto = svc.spec.mode.autoscale
    raise Rejected("invalid", f"service {svc.spec.name} is autoscaled (--autoscale "
                   f"min={auto.min},max={auto.max}): the autoscaler sets its replicas; "
                   "change the range with `service update --autoscale min=N,max=N`, or "
                   "turn autoscaling off with `service update --autoscale-rm` first",
                   "replicas")


def job_op(svc: Service, op: Any, now: float, *, keep_running: bool) -> JobStatus:
    """A scheduled job's run (shoal.node.cron), as the leader decided it:

    * ("job_run", service_id, scheduled_at, skip_reason): the run due at ``scheduled_at``
      starts (the job iteration goes up: the orchestrator runs its tasks), or with a reason
      is recorded as skipped. Ignored unless ``scheduled_at`` is later than the last run's:
      a run is started once, whichever leader (or retried batch) proposes it.
    * ("job_run_status", service_id, iteration, state, completed, failed, message): the
      progress of the run of that iteration.

    The history keeps the last ``mode.schedule.history`` runs; with ``keep_running`` (schema
    11) a run still going is kept beyond them, however many runs were skipped since (before,
    skips pushed it out, and with it what told policy forbid that a run was going)."""
    job = svc.job_status
    if op[0] == "job_run":
        at, skip = float(op[2]), str(op[3])
        if at <= job.last_scheduled:
            return job
        iteration = job.iteration if skip else job.iteration + 1
        run = JobRun(scheduled_at=at, iteration=0 if skip else iteration,
                     state="skipped" if skip else "running", started_at=now,
                     finished_at=now if skip else 0.0, message=skip)
        keep = svc.spec.mode.schedule.history
        runs = (*job.runs, run)
        kept = runs[-keep:]
        if keep_running:
            kept = tuple(r for r in runs[:-keep] if r.state == "running") + kept
        return replace(job, iteration=iteration, last_scheduled=at, runs=kept)
    iteration, state = int(op[2]), str(op[3])
    runs = tuple(replace(r, state=state, completed=int(op[4]), failed=int(op[5]),
                         message=str(op[6]),
                         finished_at=r.finished_at or (now if state != "running" else 0.0))
                 if r.iteration == iteration and r.state != "skipped" else r
                 for r in job.runs)
    return replace(job, runs=runs)

