"""The agent-side reconciler: makes this node run exactly the tasks assigned to it.

Owns: comparing the tasks the replicated state assigns to this node with what the
runtime Controller runs, advancing each task one step (start, report, stop, forget),
and reporting observed status back through the state source. The decision is a pure
function, ``next_step(task, observation)`` (swarmkit's ``exec.Do``): it never moves a
status backwards (that would be a bug: ``BackwardsTransition``). The I/O is around it:
observing (the runtime's status, the task's address), then doing the step. Starts run
concurrently, each reporting its own outcome: one slow image pull does not hold back the
other tasks' starts and reports. It is level-triggered: every pass recomputes from
scratch, so a lost report or a restart of the agent is repaired by the next pass.

It reads and writes through a ``StateSource`` (shoal.node.source: a manager's Raft
replica, a worker's feed, or the in-memory store of the unit tests) and acts through the
runtime ``Controller`` (the real one, or FakeController in tests). Must not touch: desired
state or placement (the leader's), or namespaces/cgroups directly (the runtime's).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import posixpath
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import msgspec

from shoal.node.errors import (
    BackwardsTransition,
    InitFailed,
    TaskInputError,
    TaskInputUnavailable,
    task_input,
)
from shoal.node.generic import Claims
from shoal.node.health import Check, HealthMonitor, resolve
from shoal.node.pod import Pods, is_pod, parent_of
from shoal.node.reports import Reporter
from shoal.node.source import StateSource
from shoal.raft import generic, templates
from shoal.raft.models import (
    Health,
    Task,
    TaskState,
    TaskStatus,
    Volume,
    resolve_mount,
)
from shoal.raft.spec import HOST_GATEWAY, NAME_RE, Mount, SidecarSpec, log_limits
from shoal.runtime.controller import Controller
from shoal.runtime.errors import StartError, TaskNotFound
from shoal.runtime.images import ImageConfig
from shoal.runtime.records import (
    BUILD_TASK_PREFIX,
    RunState,
    RuntimeStatus,
    TaskConfig,
    parse_signal,
)
from shoal.runtime.rootfs import FileValue, MountSpec
from shoal.runtime.taskvols import anon_name

if TYPE_CHECKING:
    from shoal.node.mesh import Mesh

log = logging.getLogger("shoal.worker")


def image_volumes(image: ImageConfig | None, mounts: list[MountSpec],
                  files: Mapping[str, FileValue], owner: str) -> list[MountSpec]:
    """Docker's rule for an image's VOLUME paths: an anonymous volume at each one no mount
    (nor file) of the task is at, named for the container ``owner``; a path that is no
    clean absolute one, or one no mount may have (/, /proc...), is left out with a log
    line, as the task starts anyway."""
    taken = {m.target for m in mounts} | set(files)
    out = []
    for raw in image.volumes if image is not None else ():
        path = posixpath.normpath(raw) if raw.startswith("/") else raw
        path = "/" + path.lstrip("/") if path.startswith("//") else path
        if path in taken:
            continue
        spec = MountSpec("volume", path, anon_name(owner, path), anonymous=True)
        why = spec.problem()
        if why:
            log.warning("task %s: the image's VOLUME %r is left out: %s", owner, raw, why)
            continue
        taken.add(path)
        out.append(spec)
    return out


def observed_status(rt: RuntimeStatus) -> TaskStatus:
    """What the runtime saw, as a task status."""
    if rt.state is RunState.RUNNING:
        return TaskStatus(state=TaskState.RUNNING, timestamp=rt.started_at,
                          message="running", pid=rt.pid)
    if rt.stopped:
        state = TaskState.SHUTDOWN
    elif rt.exit_code == 0:
        state = TaskState.COMPLETE
    else:
        state = TaskState.FAILED
    return TaskStatus(state=state, timestamp=rt.finished_at or time.time(),
                      message=rt.message, exit_code=rt.exit_code,
                      err="" if state is not TaskState.FAILED else rt.message)


# a host name the runtime takes (shoal.runtime.records' rule), for one filled in here
HOSTNAME_OK = re.compile(r"^(?=.{1,64}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
                         r"(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$")


def _host_lines(lines: tuple[str, ...], gateway: str) -> tuple[tuple[str, str], ...]:
    """The spec's ``NAME:IP`` /etc/hosts lines as the runtime takes them ((name, ip)),
    ``host-gateway`` as ``gateway`` (this node's address on the task network, Docker's
    host.docker.internal; the line is left out while the node has no task network)."""
    out = []
    for name, _, addr in (line.partition(":") for line in lines):
        if addr == HOST_GATEWAY:
            if not gateway:
                log.warning("extra host %s: this node has no task network yet: left out "
                            "of /etc/hosts", name)
                continue
            addr = gateway
        out.append((name, addr.strip("[]")))
    return tuple(out)


def _signal_ok(name: str) -> bool:
    """An image's STOPSIGNAL the runtime can send (any name or number, SIGRTMIN+3)."""
    try:
        parse_signal(name)
    except ValueError:
        return False
    return True


_ARCH = os.uname().machine  # {{.Node.Platform.Architecture}}: x86_64, aarch64 (Docker's)


# ---------------------------------------------------------------------------- the decision
def default_hostname(task_name: str) -> str:
    """A task's host name when its spec sets none: its name ("web.3", "agent.1f2e3d4c5b6a")
    with '.' and '_' as '-', within a DNS label's 63 characters — a long service name is cut,
    never the slot or node part, and no cut leaves a trailing '-' (an invalid host name)."""
    service, dot, part = task_name.rpartition(".")
    if not dot:
        service, part = task_name, ""
    service, part = (x.replace(".", "-").replace("_", "-") for x in (service, part))
    if not part:
        return service[:63].rstrip("-")
    return f"{service[:62 - len(part)].rstrip('-')}-{part}"


class Action(enum.Enum):
    NONE = "none"
    START = "start"  # prepare (image, files, network) and start; report what happened
    STOP = "stop"  # signal it, SIGKILL after ``grace``
    # an ended task that is not to run again: release its address and health watch; its
    # runtime record (logs, exit code) stays until the task leaves the state (trimmed from
    # the history, its service removed), as Docker keeps a task's stopped container
    RELEASE = "release"


@dataclass(frozen=True)
class Step:
    """What to do with one task now, and the status to report (None: nothing new)."""

    action: Action = Action.NONE
    report: TaskStatus | None = None
    grace: float = 0.0  # STOP: seconds between the stop signal and SIGKILL


def next_step(task: Task, seen: TaskStatus | None, *, busy: bool = False,
              now: float = 0.0) -> Step:
    """The next step for ``task`` (as the cluster state has it) given what the runtime
    observed: ``seen`` is the runtime's status as a task status (``observed_status``, with
    the task's address filled in), None when the runtime has no trace of the task; ``busy``:
    a start of it is in flight. Pure: no I/O, the clock comes in ``now``."""
    if busy:
        return Step()
    wants_run = task.desired_state <= TaskState.RUNNING
    current = task.status.state
    if seen is None:
        if wants_run and current is TaskState.PENDING:
            return Step()  # a global task waiting on this node for its reserved resources
        if wants_run and current < TaskState.RUNNING:
            return Step(Action.START)
        if wants_run and not current.terminal:
            # it ran here before but the runtime has no trace of it (host reboot?)
            return _forward(task, Step(report=TaskStatus(
                state=TaskState.FAILED, timestamp=now,
                message="task lost: not found in the runtime after agent restart",
                err="task lost")))
        if not wants_run and not current.terminal:
            return _forward(task, Step(report=TaskStatus(
                state=TaskState.SHUTDOWN, timestamp=now,
                message="shut down before it started")))
        return Step()
    if not wants_run and seen.state is TaskState.RUNNING:
        return Step(Action.STOP, grace=task.spec.container.stop_grace_period)
    report: TaskStatus | None = None
    if seen.state > current or (
            seen.state == current and seen.state is TaskState.RUNNING
            and _running_view(seen) != _running_view(task.status)
            and seen.merges_over(task.status)):
        report = seen
    if seen.state is TaskState.RUNNING and seen.health is Health.UNHEALTHY:
        # Swarm: an unhealthy task is stopped (and reported FAILED once it ended: replaced)
        return _forward(task, Step(Action.STOP, report,
                                   grace=task.spec.container.stop_grace_period))
    ended = seen.state is not TaskState.RUNNING
    action = Action.RELEASE if ended and current.terminal and \
        task.desired_state >= TaskState.SHUTDOWN else Action.NONE
    return _forward(task, Step(action, report))


def _running_view(s: TaskStatus) -> tuple[object, ...]:
    """What a RUNNING report can change: the init, the address, the health, a pod's
    containers."""
    return (s.pid, s.addr, s.health, s.failing_streak, s.health_log, s.containers)


def _forward(task: Task, step: Step) -> Step:
    if step.report is not None and step.report.state < task.status.state:
        raise BackwardsTransition(f"task {task.id}: {task.status.state.name} → "
                                  f"{step.report.state.name}")
    return step


# ---------------------------------------------------------------------------- the I/O
PROGRESS_PERIOD = 1.0  # seconds: at most one pull-progress status report per task per period


class Worker:
    def __init__(self, node_id: str, store: StateSource, runtime: Controller,
                 wakeup: asyncio.Event, interval: float = 1.0,
                 mesh: Mesh | None = None,
                 task_files: Callable[[Task], Awaitable[dict[str, FileValue]]] | None
                 = None,
                 pull_image: Callable[[str], Awaitable[None]] | None = None,
                 health: HealthMonitor | None = None,
                 pull_progress: Callable[[str], str | None] | None = None,
                 clock_offset: Callable[[], float | None] = lambda: None) -> None:
        self.node_id = node_id
        # health checks of the tasks running here (node/health.py)
        self.health = health or HealthMonitor()
        self.health.on_change = lambda _tid: wakeup.set()
        self._checks: dict[str, Check | None] = {}  # task id → its resolved check
        self.mesh = mesh  # task networking: attach after start, detach on removal
        # files a task must see besides resolv.conf (secrets/configs), fetched per task
        self.task_files = task_input(task_files) if task_files is not None else None
        # fetch an image this node lacks from a peer (raises TaskInputError if none has it)
        self.pull_image = task_input(pull_image) if pull_image is not None else None
        # how far this node's pull of an image is (a status message), None if not pulling
        self.pull_progress = pull_progress
        self.store = store  # swapped by the agent when this node changes role
        # status reports, gathered into one write per round trip (node/reports.py)
        self.reporter = Reporter(node_id, lambda: self.store, clock_offset)
        self.runtime = runtime
        self.wakeup = wakeup
        self.interval = interval
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._starting: dict[str, asyncio.Task[None]] = {}
        self._released: set[str] = set()  # ended tasks whose address and watch are let go
        # starts that waited (TaskInputUnavailable) → when to try again (monotonic): one
        # try per ``interval``, not one per wake-up (each would be a report: a Raft write)
        self._retry_at: dict[str, float] = {}
        self.claims = Claims()  # generic resource IDs taken by starts in flight
        self._closed = False
        # a pod's sidecars and init containers (node/pod.py)
        self.pods = Pods(runtime, self.health, self.container_config, wakeup.set)

    async def run(self) -> None:
        self.runtime.set_listener(lambda _tid: self.wakeup.set())
        while not self._closed:
            self.wakeup.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("reconcile pass failed; retrying")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):  # (wait_for can swallow a cancel)
                    await self.wakeup.wait()

    def close(self) -> None:
        self._closed = True
        self.health.close()
        self.wakeup.set()
        for t in self._starting.values():
            t.cancel()

    async def reconcile(self) -> None:
        """One pass: observe every task of this node, decide its step, do it. Starts are
        launched in the background (see ``_begin_start``); reports go out together."""
        if not self.store.is_ready():
            return
        snap = self.store.snapshot()
        mine = {t.id: t for t in snap.tasks.values() if t.node_id == self.node_id}
        # The starts in flight and the runtime's tasks, read together (no await between): a
        # start that ends later in this pass is still "busy" here, never "unseen" (which
        # would start it a second time).
        starting = set(self._starting)
        running = self.runtime.tasks()
        reports: list[tuple[Task, TaskStatus]] = []

        for task in mine.values():
            busy = task.id in starting
            seen = None if busy else await self._observe(task, running.get(task.id))
            step = next_step(task, seen, busy=busy, now=time.time())
            if step.action is Action.START:
                if self._retry_at.get(task.id, 0.0) <= time.monotonic():
                    self._retry_at.pop(task.id, None)
                    self._begin_start(task)
            elif step.action is Action.STOP:
                self._stop(task.id, step.grace)
                if is_pod(task):
                    self.pods.stop(task.id, step.grace)
            if step.report is not None:
                reports.append((task, step.report))
            if step.action is Action.RELEASE and task.id not in self._released:
                await self._release(task.id)

        # runtime tasks that are no longer ours (deleted, or reassigned): stop and forget
        for tid, rt in running.items():
            if tid in mine or tid in starting or tid.startswith(BUILD_TASK_PREFIX) or \
                    parent_of(tid) in mine:
                continue  # (`image build` RUN steps are runtime/build.py's own; a pod's
                #           containers are node/pod.py's)
            if rt.state is RunState.RUNNING:
                self._stop(tid, 10.0)
            elif tid not in self._stopping:
                await self._remove(tid)

        self._released.intersection_update(mine)
        for tid in self._retry_at.keys() - mine.keys():
            del self._retry_at[tid]
        if reports:
            await asyncio.gather(*(self._report(t, s) for t, s in reports))

    async def _observe(self, task: Task, rt: RuntimeStatus | None) -> TaskStatus | None:
        """The runtime's view of ``task`` as a task status (None: it has no trace of it); a
        running task that should run is (re)attached to the network first (e.g. after an
        agent restart), so its address is part of what was observed."""
        if rt is None:
            return None
        seen = observed_status(rt)
        if seen.state is TaskState.RUNNING and task.desired_state <= TaskState.RUNNING:
            addr = await self._attach(task, rt.pid) or task.status.addr
            seen = replace(seen, addr=addr)
            if rt.pid and not self.health.watching(task.id):  # e.g. adopted after a restart
                check = self._check_of(task)
                if check is not None:
                    self.health.watch(task.id, check, rt.pid, rt.started_at,
                                      initial=task.status.health)
        seen = self._with_health(task, seen)
        if not is_pod(task):
            return seen
        if seen.state is TaskState.RUNNING and task.desired_state <= TaskState.RUNNING \
                and rt.pid:
            return replace(seen, containers=self.pods.tend(task, rt.pid, time.time()),
                           health=self.pods.health_of(task, seen.health))
        if seen.state is not TaskState.RUNNING:  # the main container ended: so does the pod
            self.pods.stop(task.id, task.spec.container.stop_grace_period)
        return replace(seen, containers=self.pods.statuses(task))

    def _with_health(self, task: Task, seen: TaskStatus) -> TaskStatus:
        """``seen`` with the task's health; a task this node stopped for being unhealthy is
        FAILED (so it is replaced, and a rolling update counts it as failed)."""
        hs = self.health.status(task.id)
        if hs is None:
            return seen
        if seen.state is TaskState.RUNNING:
            return replace(seen, health=hs.health, failing_streak=hs.failing_streak,
                           health_log=hs.log)
        self.health.stop(task.id)
        if hs.health is not Health.UNHEALTHY or seen.state is not TaskState.SHUTDOWN or \
                task.desired_state > TaskState.RUNNING:
            # one that ended by itself keeps its own exit, whatever a late probe saw; one the
            # leader stopped is SHUTDOWN
            return seen
        last = hs.log[-1].output.strip() if hs.log else ""
        why = f"unhealthy: {hs.failing_streak} health checks failed" + \
            (f" (last: {last[:200]})" if last else "")
        return replace(seen, state=TaskState.FAILED, message=why, err=why,
                       health=hs.health, failing_streak=hs.failing_streak, health_log=hs.log)

    def _check_of(self, task: Task) -> Check | None:
        """The task's health check: its spec's over its image's HEALTHCHECK (cached)."""
        if task.id not in self._checks:
            image = None
            shell: tuple[str, ...] = ()  # (its SHELL: CMD-SHELL's runner, Docker's)
            ref = task.spec.container.image
            if ref:
                try:
                    config = self.runtime.image_config(ref)
                    image, shell = config.healthcheck, config.shell
                except StartError:
                    image = None
            self._checks[task.id] = resolve(task.spec.container.healthcheck, image, shell)
        return self._checks[task.id]

    async def task_config(self, task: Task) -> TaskConfig:
        """The runtime's view of a task: its spec, with the image's config applied (Docker's
        rules) and the files it must see (resolv.conf naming the node's DNS, secrets)."""
        s = task.spec.container
        limits = task.spec.resources.limits
        generic_env = self._generic_env(task)  # (before any await: see Claims)
        fill = self._placeholders(task)
        cmd, env, wd, user = tuple(s.command), {k: fill(v) for k, v in s.env.items()}, \
            s.workdir, s.user
        stop_signal = s.stop_signal
        image: ImageConfig | None = None
        if not s.image:  # (the host's filesystem: the program is entrypoint + command)
            cmd = tuple(s.entrypoint) + cmd
        else:
            image = await self._ensure_image(s.image, task)
            cmd, env, wd, user = image.apply(cmd, env, wd, user,
                                             entrypoint=s.entrypoint or None)
            if stop_signal == "SIGTERM" and _signal_ok(image.stop_signal):  # (the default)
                stop_signal = image.stop_signal  # the image's STOPSIGNAL
            if not cmd:
                raise StartError(f"image {s.image} has no command and the service gives none")
        env.update(generic_env)
        vols = self.store.snapshot().volumes if s.mounts else {}
        # (its resolv.conf: the node's DNS server, its own search domains and options)
        files: dict[str, FileValue] = dict(self.mesh.task_files(task.spec)) \
            if self.mesh is not None else {}
        if self.task_files is not None:
            files.update(await self.task_files(task))
        mounts = [self._mount_spec(m, vols, fill, task.id) for m in s.mounts]
        mounts += image_volumes(image, mounts, files, task.id)
        # (Docker's --log-opt max-size and max-file; 0: the node's runtime default)
        log_bytes, log_files = log_limits(s.log_options)
        return TaskConfig(
            task_id=task.id,
            hostname=self._hostname(task, fill),
            command=cmd, env=env, workdir=wd, user=user,
            image=s.image, stop_signal=stop_signal,
            memory_limit=limits.memory, cpu_limit=limits.cpu, pids_limit=limits.pids,
            mounts=tuple(mounts), files=files, host_network=task.spec.network_mode == "host",
            read_only=s.read_only, cap_add=s.cap_add, cap_drop=s.cap_drop,
            group_add=s.group_add,
            extra_hosts=_host_lines(s.extra_hosts, self._gateway()),
            ulimits=tuple((u.name, u.soft, u.hard) for u in s.ulimits),
            sysctls=tuple(sorted(s.sysctls.items())),
            log_max_bytes=log_bytes, log_max_files=log_files,
            tty=s.tty, stdin_open=s.stdin_open, oom_score_adj=s.oom_score_adj,
            seccomp=s.seccomp,
        )

    def _gateway(self) -> str:
        """This node's address on its task network ("" while it has none)."""
        net = self.mesh.network if self.mesh is not None else None
        return net.gateway if net is not None else ""

    def _generic_env(self, task: Task) -> dict[str, str]:
        """The task's DOCKER_RESOURCE_* variables: the named IDs of its node it takes, free of
        the node's other live tasks and starts (shoal.node.generic); TaskInputUnavailable
        (the start waits) while a task on its way out still holds them, a StartError (the
        task is rejected, saying which kind) when too few are free otherwise."""
        need = task.spec.resources.reservations.generic_resources
        if not need:
            return {}
        snap = self.store.snapshot()
        node = snap.nodes.get(self.node_id)

        def wanted(tid: str) -> bool:
            t = snap.tasks.get(tid)
            return t is not None and t.desired_state <= TaskState.RUNNING and \
                not t.status.state.terminal

        running: list[dict[str, str]] = []
        stopping: list[dict[str, str]] = []
        for tid, rt in self.runtime.tasks().items():
            if rt.state is not RunState.RUNNING or tid == task.id or \
                    tid.startswith(BUILD_TASK_PREFIX) or parent_of(tid) in snap.tasks:
                continue  # (a pod's other containers and `image build` steps claim nothing)
            env = self.runtime.task_env(tid) or {}
            other = snap.tasks.get(tid)
            if other is not None:  # (what it reserves: a variable a user set claims nothing)
                names = {generic.env_name(k)
                         for k in other.spec.resources.reservations.generic_resources}
                env = {k: v for k, v in env.items() if k in names}
            if env:
                (running if wanted(tid) else stopping).append(env)
        leaving = {tid for tid in self.claims.starting if not wanted(tid)}
        return self.claims.take(task.id, node.generic_resources if node else {}, need,
                                running, stopping, leaving)

    async def container_config(self, task: Task, c: SidecarSpec, pid: int) -> TaskConfig:
        """The runtime's view of a pod's extra container (node/pod.py): its own image,
        command, env and limits; the task's host name, files and the mounts it lists; the
        network namespace of the main container's init ``pid`` (the node's, for a task on
        the host's network)."""
        fill = self._placeholders(task)
        cmd, env, wd, user = tuple(c.command), {k: fill(v) for k, v in c.env.items()}, \
            c.workdir, c.user
        stop_signal = c.stop_signal
        image: ImageConfig | None = None
        if c.image:
            image = await self._ensure_image(c.image, task)
            cmd, env, wd, user = image.apply(cmd, env, wd, user)
            if stop_signal == "SIGTERM" and _signal_ok(image.stop_signal):
                stop_signal = image.stop_signal
            if not cmd:
                raise StartError(f"image {c.image} has no command and container {c.name} "
                                 "gives none")
        shared = [m for m in task.spec.container.mounts if m.target in c.mounts]
        vols = self.store.snapshot().volumes if shared else {}
        files: dict[str, FileValue] = dict(self.mesh.task_files(task.spec)) \
            if self.mesh is not None else {}
        if self.task_files is not None:
            files.update(await self.task_files(task))
        # (the task's anonymous volumes are named by the task's id: shared with the main
        # container; its own image's VOLUMEs are its own)
        mounts = [self._mount_spec(m, vols, fill, task.id) for m in shared]
        mounts += image_volumes(image, mounts, files, f"{task.id}-{c.name}")
        host = task.spec.network_mode == "host"  # (already the node's: nothing to join)
        return TaskConfig(
            task_id=f"{task.id}-{c.name}",
            hostname=self._hostname(task, fill),
            # (its network namespace is the task's: the same /etc/hosts lines; read_only,
            # capabilities, ulimits, groups, sysctls and seccomp are the main container's
            # own: a sidecar has Docker's defaults)
            extra_hosts=_host_lines(task.spec.container.extra_hosts, self._gateway()),
            command=cmd, env=env, workdir=wd, user=user, image=c.image,
            stop_signal=stop_signal, memory_limit=c.limits.memory, cpu_limit=c.limits.cpu,
            pids_limit=c.limits.pids,
            mounts=tuple(mounts), files=files, host_network=host,
            join_netns="" if host else f"/proc/{pid}/ns/net")

    @staticmethod
    def _mount_spec(m: Mount, vols: Mapping[str, Volume],
                    fill: Callable[[str], str] = str, task_id: str = "") -> MountSpec:
        """A spec mount for the runtime, its placeholders filled in (a bind's source, a
        target); a volume with the driver and options it uses (its own, else ``volume
        create``'s: shoal.raft.models.resolve_mount); an anonymous one (no source) named
        for the task ``task_id`` (shoal.runtime.taskvols.anon_name)."""
        if m.type == "volume" and not m.source:
            target = fill(m.target)
            return MountSpec("volume", target, anon_name(task_id, target), m.readonly,
                             anonymous=True, nocopy=m.nocopy)
        source = fill(m.source)
        if m.type == "volume" and source != m.source:
            # (a volume's name is lower case: filled in so — a service webApp's
            # {{.Service.Name}}-data is webapp-data, as shoal.node.volapi lists it)
            source = source.lower()
        m = msgspec.structs.replace(m, target=fill(m.target), source=source)
        if m.type == "volume" and not NAME_RE.match(m.source):
            raise StartError(f"task.container.mounts: the volume name {m.source!r} (its "
                             "placeholders filled in) is not a volume name")
        driver, opts = resolve_mount(m, vols)
        return MountSpec(m.type, m.target, m.source, m.readonly, m.tmpfs_size,
                         "" if driver == "local" else driver, tuple(sorted(opts.items())),
                         nocopy=m.nocopy)

    @staticmethod
    def _hostname(task: Task, fill: Callable[[str], str]) -> str:
        """The task's host name: its spec's, placeholders filled in (said plainly when that
        is no host name), else its name's."""
        given = task.spec.container.hostname
        if not given:
            return default_hostname(task.name)
        name = fill(given)
        if name != given and not HOSTNAME_OK.match(name):
            raise StartError(f"--hostname {given!r} is {name!r} on this node: not a valid "
                             "host name (letters, digits and '-', dotted, at most 64 bytes)")
        return name

    def _placeholders(self, task: Task) -> Callable[[str], str]:
        """A text of ``task``'s template with Docker's placeholders (shoal.raft.templates)
        filled in for this task on this node: ``{{.Node.Hostname}}``, ``{{.Task.Slot}}`` (a
        global task's is its node's id, as its name)…"""
        snap = self.store.snapshot()
        node, svc = snap.nodes.get(self.node_id), snap.services.get(task.service_id)
        values = templates.task_values(task, node.hostname if node else "", _ARCH)
        labels = dict(svc.spec.labels) if svc is not None else {}

        def fill(text: str) -> str:
            if not templates.has_placeholders(text):
                return text
            try:
                return templates.expand(text, values, labels)
            except ValueError:  # (a spec written before placeholders: "{{" taken as text)
                return text
        return fill

    async def _ensure_image(self, ref: str, task: Task | None = None) -> ImageConfig:
        """The image's config; fetched from a peer first if this node lacks it. While it
        is pulled, the task's status message says how far (PREPARING, one report per
        PROGRESS_PERIOD at most, only when the message changed)."""
        try:
            return self.runtime.image_config(ref)
        except StartError:
            if self.pull_image is None:
                raise
        pull = asyncio.ensure_future(self.pull_image(ref))
        try:
            last = ""
            while task is not None and self.pull_progress is not None and not pull.done():
                await asyncio.wait({pull}, timeout=PROGRESS_PERIOD)
                msg = self.pull_progress(ref)
                if msg and msg != last and not pull.done():
                    last = msg
                    await self._report(task, TaskStatus(
                        state=TaskState.PREPARING, timestamp=time.time(), message=msg))
            await pull
        finally:
            pull.cancel()
        return self.runtime.image_config(ref)

    async def wait_started(self) -> None:
        """Wait until the starts in flight have reported (or failed)."""
        while self._starting:
            await asyncio.gather(*self._starting.values(), return_exceptions=True)

    def _begin_start(self, task: Task) -> None:
        """Start ``task`` in the background and report the outcome when it is known; the
        pass goes on with the other tasks meanwhile."""
        async def start() -> None:
            try:
                status = await self._start(task)
                if status.state is TaskState.PREPARING:  # it waits: tried again later
                    self._retry_at[task.id] = time.monotonic() + self.interval
                    if task.status.state is TaskState.PREPARING and \
                            task.status.message == status.message:
                        return  # (said already)
                await self._report(task, status)
            finally:
                self._starting.pop(task.id, None)
                self.claims.release(task.id)  # (the runtime's task env says it from now)
                self.wakeup.set()

        self._starting[task.id] = asyncio.create_task(start(), name=f"start-{task.id}")

    async def _start(self, task: Task) -> TaskStatus:
        addr = ""

        async def network(pid: int) -> str | None:
            """The task's veth, address and routes, before anything of it runs (as Docker
            and CNI do): its command may use the network from its first instruction. Its
            address (its /etc/hosts names its host name with it), None on the host's
            network."""
            nonlocal addr
            assert self.mesh is not None
            if task.spec.network_mode != "default":
                addr = self._own_address(task)
                return None
            try:
                addr = await self.mesh.attach(task.id, pid)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.mesh.detach(task.id)  # release the address, drop the veth
                raise
            log.info("task %s attached with address %s", task.id, addr)
            return addr or None

        async def prepare(pid: int) -> str | None:
            """The network, then the pod's init containers (node/pod.py), in its namespace."""
            own = await network(pid) if early else None
            try:
                await self.pods.run_inits(task, pid)
            except BaseException:
                if early and self.mesh is not None:  # (the task never runs: its address back)
                    with contextlib.suppress(Exception):
                        await self.mesh.detach(task.id)
                raise
            return own

        try:
            cfg = await self.task_config(task)
            # (a mesh not up yet: the task starts without a network, a later pass attaches it)
            early = self.mesh is not None and self.mesh.ready
            attach = early and task.spec.network_mode == "default"  # (else: nothing to do)
            hook = prepare if task.spec.init_containers else network if attach else None
            rt = await self.runtime.start(cfg, before_start=hook)
        except TaskInputUnavailable as exc:  # no manager/peer reachable yet: retried later
            log.info("task %s (%s) waits: %s", task.id, task.name, exc.message)
            return TaskStatus(state=TaskState.PREPARING, timestamp=time.time(),
                              message=f"waiting: {exc.message}")
        except TaskInputError as exc:  # a secret missing, or no peer has the image
            log.warning("task %s (%s) cannot start yet: %s", task.id, task.name, exc.message)
            return TaskStatus(state=TaskState.REJECTED, timestamp=time.time(),
                              message=exc.message, err=exc.message)
        except StartError as exc:
            log.warning("task %s (%s) failed to start: %s", task.id, task.name, exc)
            if self.mesh is not None:  # (it never ran: the address it was given goes back)
                try:
                    await self.mesh.detach(task.id)
                except Exception as err:  # (logged: a leak would exhaust the subnet)
                    log.warning("task %s: releasing its address failed: %s", task.id, err)
            if isinstance(exc.__cause__, InitFailed):  # it ran, and an init container failed
                return TaskStatus(state=TaskState.FAILED, timestamp=time.time(),
                                  message=str(exc.__cause__), err=str(exc.__cause__),
                                  containers=self.pods.statuses(task))
            return TaskStatus(state=TaskState.REJECTED, timestamp=time.time(),
                              message=str(exc), err=str(exc))
        except Exception as exc:  # a bug below (not a StartError): logged with its traceback,
            # and the task still rejected and its address given back — else nothing reports
            # it and every pass tries again
            log.exception("task %s (%s) failed to start", task.id, task.name)
            if self.mesh is not None:
                with contextlib.suppress(Exception):
                    await self.mesh.detach(task.id)
            message = f"internal error starting the task: {exc!r}"
            return TaskStatus(state=TaskState.REJECTED, timestamp=time.time(),
                              message=message, err=message)
        log.info("started task %s (%s) pid %s", task.id, task.name, rt.pid)
        seen = observed_status(rt)
        if seen.state is TaskState.RUNNING:
            seen = replace(seen, addr=addr or await self._attach(task, rt.pid))
            check = self._check_of(task)
            if check is not None and rt.pid:
                # starting until a probe passes: no connections reach it before (node/mesh.py)
                self.health.watch(task.id, check, rt.pid, rt.started_at)
                seen = replace(seen, health=Health.STARTING)
            if is_pod(task) and rt.pid:
                self.pods.start_sidecars(task, rt.pid)
                seen = replace(seen, containers=self.pods.statuses(task),
                               health=self.pods.health_of(task, seen.health))
        return seen

    def _own_address(self, task: Task) -> str:
        """The address of a task that is not on the cluster network: on the host's network,
        the node's (the mesh and DNS lead there, to the port the task listens on); with
        network mode none, nothing."""
        if task.spec.network_mode == "host" and self.mesh is not None:
            return self.mesh.advertise_addr
        return ""

    async def _attach(self, task: Task, pid: int | None) -> str:
        """The task's address, attaching it to the node's network if it has none yet ("" while
        the mesh is not up: the next pass retries)."""
        if task.spec.network_mode != "default":
            return self._own_address(task)
        mesh, task_id = self.mesh, task.id
        if mesh is None or not mesh.ready or not pid:
            return ""
        addr = mesh.address_of(task_id)
        if addr:
            return addr
        try:
            addr = await mesh.attach(task_id, pid)
        except Exception as exc:  # NetworkError, or the task died meanwhile
            log.warning("task %s: no network: %s", task_id, exc)
            return ""
        log.info("task %s attached with address %s", task_id, addr)
        return addr

    async def _release(self, task_id: str) -> None:
        """What an ended task holds besides its record: its health watch, its network
        volumes and its address."""
        self._released.add(task_id)
        self.health.forget(task_id)
        self._checks.pop(task_id, None)
        await self.runtime.release(task_id)  # (its network volumes, and its sidecars')
        await self.pods.release(task_id)
        if self.mesh is not None:
            try:
                await self.mesh.detach(task_id)
            except Exception as exc:
                log.warning("task %s: releasing its address failed: %s", task_id, exc)

    async def _remove(self, task_id: str) -> None:
        """Forget a task that left the state in the runtime (its logs with it), then release
        its address."""
        await self.pods.remove(task_id)
        await self.runtime.remove(task_id)
        await self._release(task_id)
        self._released.discard(task_id)

    def _stop(self, task_id: str, grace: float) -> None:
        if task_id in self._stopping:
            return

        async def stop() -> None:
            try:
                await self.runtime.stop(task_id, grace)
                log.info("stopped task %s", task_id)
            except TaskNotFound:  # it ended and was removed meanwhile: nothing left to stop
                log.info("task %s already stopped and removed", task_id)
            except Exception:
                log.exception("stopping task %s failed", task_id)
            finally:
                self._stopping.pop(task_id, None)
                self.wakeup.set()

        self._stopping[task_id] = asyncio.create_task(stop())

    async def _report(self, task: Task, status: TaskStatus) -> None:
        await self.reporter.report(task.id, status)

    async def stop_all(self, grace: float = 10.0) -> None:
        """Stop every task (used by `shoal leave`)."""
        starting = list(self._starting.values())
        for t in starting:
            t.cancel()
        if starting:
            await asyncio.gather(*starting, return_exceptions=True)
        for tid, rt in self.runtime.tasks().items():
            if rt.state is RunState.RUNNING:
                self._stop(tid, grace)
        if self._stopping:
            await asyncio.gather(*self._stopping.values(), return_exceptions=True)
        for tid in list(self.runtime.tasks()):
            await self._remove(tid)
