"""Pods on this node: a task's extra containers (sidecars, init containers) next to its main one.

Owns: running a task's ``init_containers`` (one after the other, each to its end, before the
main container's command starts) and ``sidecars`` (started after the main container, in
declared order), restarting a sidecar that ended by its own restart policy (alone: the main
container is never touched), probing their health checks, stopping and removing them with
the task, and the per-container status (``ContainerStatus``) the worker reports with the
task's. Must not touch: the main container (the worker starts, stops and removes it), desired
state (the leader's), the task's network (the mesh attaches the main container's network
namespace once; the extra containers join it through ``TaskConfig.join_netns``).

How a pod runs here::

    main container (the task's runtime id)   new pid/mount/uts/ipc/net namespaces; the mesh
      │                                       attaches the net namespace before anything runs
      ├─ init containers  "<task id>-<name>"  started from the main one's before_start hook:
      │                                       each joins /proc/<main init>/ns/net, runs to its
      │                                       end; a non-zero exit fails the task (InitFailed)
      └─ sidecars         "<task id>-<name>"  started once the main one runs, in order; each
                                              joins the same net namespace (127.0.0.1 is
                                              shared), has its own rootfs (its image) and its
                                              own cgroup, a sibling of the main one's

Each extra container is an ordinary runtime task (shoal.runtime: its own task directory,
logs, cgroup, shim that survives the agent), so `service logs --container NAME` reads it as
it reads a task. A restarted sidecar is a new runtime task under the same id: its previous
run's log files are moved aside before the old record is removed and become the new run's
rotated files (``NAME.log.1`` = the last run's active file...), at most ``KEEP_LOG_FILES``
per stream as the shim itself keeps, so its logs read on across restarts (the oldest fall
off as in a rotation). Health: the task is STARTING until every container with a check has passed
once, then HEALTHY; only the main container's failure makes the task UNHEALTHY (a task's
health never goes back, so an unhealthy sidecar is restarted alone instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from shoal.node.errors import InitFailed
from shoal.node.health import Check, HealthMonitor, resolve
from shoal.raft.models import ContainerStatus, Health, Task
from shoal.raft.spec import MAIN_CONTAINER, SidecarSpec
from shoal.runtime.controller import Controller
from shoal.runtime.errors import StartError, TaskNotFound
from shoal.runtime.records import RunState, RuntimeConfig, RuntimeStatus, TaskConfig

log = logging.getLogger("shoal.pod")

POLL = 0.05  # seconds between two looks at a running init container
LOG_STREAMS = ("stdout", "stderr")
# files per stream a restarted sidecar's logs keep, its new run's included (the runtime's
# default log_max_files: what the shim keeps of one run; the task's --log-opt max-file is
# its main container's only, which is never restarted in place)
KEEP_LOG_FILES = RuntimeConfig.log_max_files
# (task, container, host pid of the main container's init) → the container's TaskConfig
ConfigOf = Callable[[Task, SidecarSpec, int], Awaitable[TaskConfig]]


def container_id(task_id: str, name: str) -> str:
    """The runtime id of a task's container: the task's own id for the main one ("" or
    "main"), ``<task id>-<name>`` for a sidecar or init container."""
    return task_id if not name or name == MAIN_CONTAINER else f"{task_id}-{name}"


def parent_of(runtime_id: str) -> str:
    """The task id of an extra container's runtime id ("" for a task's own id)."""
    head, sep, _ = runtime_id.partition("-")
    return head if sep else ""


def is_pod(task: Task) -> bool:
    return bool(task.spec.sidecars or task.spec.init_containers)


@dataclass
class _Side:
    """One sidecar's bookkeeping on this node (lost on an agent restart: counts restart)."""

    restarts: int = 0
    attempts: list[float] = field(default_factory=list)  # restart times, for the window
    due: float = 0.0  # when an ended sidecar is restarted (its restart delay); 0 = not set
    ended: bool = False  # ended for good (its policy says no more restarts)
    ever_healthy: bool = False
    start_error: str = ""  # its last start failed: why
    starting: asyncio.Task[None] | None = None
    held: Path | None = None  # its previous runs' log files, until its next run takes them


@dataclass
class _Pod:
    sides: dict[str, _Side] = field(default_factory=dict)
    first_start: asyncio.Task[None] | None = None  # the sidecars' start, in declared order
    stopping: asyncio.Task[None] | None = None


class Pods:
    """The extra containers of the pods on this node (one per Worker)."""

    def __init__(self, runtime: Controller, health: HealthMonitor, config_of: ConfigOf,
                 wakeup: Callable[[], None]) -> None:
        self.runtime = runtime
        self.health = health
        self.config_of = config_of
        self.wakeup = wakeup
        self._pods: dict[str, _Pod] = {}

    # ------------------------------------------------------------------ starting
    async def run_inits(self, task: Task, pid: int) -> None:
        """Run the task's init containers in order, each to its end, in the network namespace
        of the main container's init ``pid`` (which waits meanwhile: the main command has not
        started). InitFailed if one exits non-zero or cannot start."""
        for c in task.spec.init_containers:
            cid = container_id(task.id, c.name)
            await self._remove(cid)  # a previous attempt's record
            try:
                rt = await self.runtime.start(await self.config_of(task, c, pid))
            except StartError as exc:
                raise InitFailed(f"init container {c.name} could not start: {exc}") from exc
            while rt.state is RunState.RUNNING:
                await asyncio.sleep(POLL)
                rt = self.runtime.status(cid) or rt
            if rt.exit_code != 0:
                raise InitFailed(f"init container {c.name} failed: {rt.message}")
            log.info("task %s: init container %s done", task.id, c.name)

    def start_sidecars(self, task: Task, pid: int) -> None:
        """Start the task's sidecars in declared order (in the background), once its main
        container (init ``pid``) runs."""
        pod = self._pods.setdefault(task.id, _Pod())
        if not task.spec.sidecars or pod.sides:
            return

        async def in_order() -> None:
            for c in task.spec.sidecars:
                await self._start(task, c, pid)
            self.wakeup()

        for c in task.spec.sidecars:
            pod.sides[c.name] = _Side()
        pod.first_start = asyncio.create_task(in_order(), name=f"sidecars-{task.id}")

    async def _start(self, task: Task, c: SidecarSpec, pid: int) -> None:
        side = self._pods.setdefault(task.id, _Pod()).sides.setdefault(c.name, _Side())
        cid = container_id(task.id, c.name)
        self.health.forget(cid)
        side.held = self._hold_logs(cid) or side.held
        await self._remove(cid)
        try:
            rt = await self.runtime.start(await self.config_of(task, c, pid))
        except StartError as exc:
            log.warning("task %s: sidecar %s failed to start: %s", task.id, c.name, exc)
            side.start_error = str(exc)
            return
        self._carry_logs(cid, side.held)
        side.held = None
        side.start_error = ""
        log.info("task %s: sidecar %s started, pid %s", task.id, c.name, rt.pid)
        check = self._check_of(c)
        if check is not None and rt.pid and rt.state is RunState.RUNNING:
            self.health.watch(cid, check, rt.pid, rt.started_at)

    def _hold_logs(self, cid: str) -> Path | None:
        """Move the log files of the container's last run (its record is about to be
        removed) aside, next to the runtime's task directories; None: nothing to keep."""
        try:
            taskdir = self.runtime.logs_path(cid)[0].parent
        except TaskNotFound:
            return None
        files = [p for stream in LOG_STREAMS for p in taskdir.glob(f"{stream}.log*")]
        if not files:
            return None
        hold = taskdir.parent.parent / "held-logs" / cid  # (DATA_DIR/held-logs: same disk)
        try:
            shutil.rmtree(hold, ignore_errors=True)
            hold.mkdir(mode=0o700, parents=True)
            for p in files:
                p.rename(hold / p.name)
        except OSError as exc:
            log.warning("container %s: cannot keep its previous logs: %s", cid, exc)
            return None
        return hold

    def _carry_logs(self, cid: str, held: Path | None) -> None:
        """The held files as the new run's rotated ones: ``NAME.log`` → ``NAME.log.1``,
        ``NAME.log.N`` → ``NAME.log.N+1``, up to ``KEEP_LOG_FILES`` files per stream."""
        if held is None:
            return
        try:
            taskdir = self.runtime.logs_path(cid)[0].parent
            for stream in LOG_STREAMS:
                old = sorted((p for p in held.glob(f"{stream}.log.*")
                              if p.name.rsplit(".", 1)[1].isdigit()),
                             key=lambda p: int(p.name.rsplit(".", 1)[1]))
                active = held / f"{stream}.log"
                newest_first = ([active] if active.exists() else []) + old
                for i, p in enumerate(newest_first[:KEEP_LOG_FILES - 1], start=1):
                    p.rename(taskdir / f"{stream}.log.{i}")
        except (OSError, TaskNotFound) as exc:
            log.warning("container %s: cannot keep its previous logs: %s", cid, exc)
        finally:
            shutil.rmtree(held, ignore_errors=True)

    def _check_of(self, c: SidecarSpec) -> Check | None:
        image = None
        shell: tuple[str, ...] = ()  # (its SHELL: CMD-SHELL's runner, Docker's)
        if c.image:
            with contextlib.suppress(StartError):
                config = self.runtime.image_config(c.image)
                image, shell = config.healthcheck, config.shell
        return resolve(c.healthcheck, image, shell)

    # ------------------------------------------------------------------ each pass
    def tend(self, task: Task, pid: int, now: float) -> tuple[ContainerStatus, ...]:
        """For a running pod (main container's init ``pid``): restart the sidecars that
        ended when their policy and delay say so, stop an unhealthy one (it is then restarted
        as a failure); return every extra container's status."""
        pod = self._pods.setdefault(task.id, _Pod())
        if task.spec.sidecars and not pod.sides:  # (e.g. adopted after an agent restart)
            for c in task.spec.sidecars:  # (a healthy task's sidecars were healthy)
                side = pod.sides[c.name] = _Side(
                    ever_healthy=task.status.health is Health.HEALTHY)
                rt = self.runtime.status(container_id(task.id, c.name))
                if rt is not None and rt.state is RunState.RUNNING and rt.pid:
                    check = self._check_of(c)
                    if check is not None:
                        self.health.watch(container_id(task.id, c.name), check, rt.pid,
                                          rt.started_at)
                elif rt is None:
                    side.due = now  # never started (or lost): start it now
        out = [self._init_status(task, c) for c in task.spec.init_containers]
        busy = pod.first_start is not None and not pod.first_start.done()
        for c in task.spec.sidecars:
            side = pod.sides[c.name]
            cid = container_id(task.id, c.name)
            rt = None if busy else self.runtime.status(cid)
            hs = self.health.status(cid)
            health = hs.health if hs is not None else Health.NONE
            if health is Health.HEALTHY:
                side.ever_healthy = True
            if busy or (side.starting is not None and not side.starting.done()):
                out.append(ContainerStatus(name=c.name, state="waiting", restarts=side.restarts,
                                           health=health, message="restarting"
                                           if side.restarts or side.starting else "starting"))
                continue
            if rt is not None and rt.state is RunState.RUNNING:
                if health is Health.UNHEALTHY:
                    self._stop_one(task, cid, task.spec.container.stop_grace_period)
                out.append(ContainerStatus(name=c.name, state="running", pid=rt.pid,
                                           restarts=side.restarts, health=health,
                                           message="unhealthy: restarting"
                                           if health is Health.UNHEALTHY else "running"))
                continue
            failed = rt is None or rt.exit_code != 0 or health is Health.UNHEALTHY
            why = side.start_error or (rt.message if rt is not None else "not started")
            if not side.ended and self._restart_due(c, side, failed, now):
                side.restarts += 1
                side.attempts.append(now)
                side.due = 0.0
                side.starting = asyncio.create_task(self._start(task, c, pid),
                                                    name=f"sidecar-{cid}")
                side.starting.add_done_callback(lambda _t: self.wakeup())
                why = f"restarting after: {why}"
            out.append(ContainerStatus(
                name=c.name, state="exited", exit_code=rt.exit_code if rt else None,
                restarts=side.restarts, health=health,
                message=why if not side.ended else f"ended: {why}"))
        return tuple(out)

    def _restart_due(self, c: SidecarSpec, side: _Side, failed: bool, now: float) -> bool:
        """Is it time to restart this ended sidecar (``failed``: non-zero exit, unhealthy or
        no start)? Marks it ended for good when its policy says never again."""
        policy = c.restart
        wanted = policy.condition == "any" or (policy.condition == "on-failure" and failed)
        recent = [t for t in side.attempts if not policy.window or now - t < policy.window]
        if not wanted or (policy.max_attempts and len(recent) >= policy.max_attempts):
            side.ended = True
            return False
        if not side.due:
            side.due = now + policy.delay
        return now >= side.due

    def _init_status(self, task: Task, c: SidecarSpec) -> ContainerStatus:
        rt = self.runtime.status(container_id(task.id, c.name))
        if rt is None:
            return ContainerStatus(name=c.name, kind="init", state="waiting")
        if rt.state is RunState.RUNNING:
            return ContainerStatus(name=c.name, kind="init", state="running", pid=rt.pid)
        return ContainerStatus(name=c.name, kind="init", state="exited",
                               exit_code=rt.exit_code, message=rt.message)

    def health_of(self, task: Task, main: Health) -> Health:
        """The task's health: the main container's, combined with its sidecars' (STARTING
        until each checked sidecar has passed once). Never goes back (see the module doc)."""
        pod = self._pods.get(task.id)
        checked = [c for c in task.spec.sidecars if self._check_of(c) is not None]
        if not checked or main is Health.UNHEALTHY:
            return main
        sides = pod.sides if pod is not None else {}
        if not all(sides.get(c.name, _Side()).ever_healthy for c in checked):
            return Health.STARTING
        return Health.HEALTHY if main in (Health.NONE, Health.HEALTHY) else main

    # ------------------------------------------------------------------ ending
    def stop(self, task_id: str, grace: float) -> None:
        """Stop the task's extra containers (in the background; idempotent): the pod stops
        together with its main container."""
        pod = self._pods.setdefault(task_id, _Pod())
        if pod.stopping is not None:
            return
        ids = [tid for tid, rt in self.runtime.tasks().items()
               if parent_of(tid) == task_id and rt.state is RunState.RUNNING]
        for side in pod.sides.values():
            side.ended = True
            if side.starting is not None:
                side.starting.cancel()
        if pod.first_start is not None:
            pod.first_start.cancel()

        async def stop_all() -> None:
            await asyncio.gather(*(self._stop_quiet(tid, grace) for tid in ids))
            self.wakeup()

        pod.stopping = asyncio.create_task(stop_all(), name=f"pod-stop-{task_id}")

    def _stop_one(self, task: Task, cid: str, grace: float) -> None:
        side = self._pods.setdefault(task.id, _Pod()).sides.setdefault(
            cid.partition("-")[2], _Side())
        if side.starting is None or side.starting.done():
            side.starting = asyncio.create_task(self._stop_quiet(cid, grace),
                                                name=f"sidecar-stop-{cid}")

    async def _stop_quiet(self, runtime_id: str, grace: float) -> None:
        self.health.stop(runtime_id)
        try:
            await self.runtime.stop(runtime_id, grace)
        except TaskNotFound:
            pass
        except Exception:
            log.exception("stopping container %s failed", runtime_id)

    async def release(self, task_id: str) -> None:
        """The ended task's extra containers let go of their network volumes (their records
        and logs stay until ``remove``)."""
        for tid in [t for t in self.runtime.tasks() if parent_of(t) == task_id]:
            await self.runtime.release(tid)

    async def remove(self, task_id: str) -> None:
        """Forget the task's extra containers (stopped first if still running)."""
        pod = self._pods.pop(task_id, None)
        if pod is not None:
            for side in pod.sides.values():
                if side.starting is not None:
                    side.starting.cancel()
                if side.held is not None:
                    shutil.rmtree(side.held, ignore_errors=True)
            if pod.first_start is not None:
                pod.first_start.cancel()
            if pod.stopping is not None:
                with contextlib.suppress(Exception):
                    await pod.stopping
        for tid in [t for t in self.runtime.tasks() if parent_of(t) == task_id]:
            await self._remove(tid)

    async def _remove(self, runtime_id: str) -> None:
        self.health.forget(runtime_id)
        try:
            await self.runtime.remove(runtime_id)
        except Exception:
            log.exception("removing container %s failed", runtime_id)

    def statuses(self, task: Task) -> tuple[ContainerStatus, ...]:
        """The extra containers' last status, without acting (a pod that no longer runs)."""
        out = [self._init_status(task, c) for c in task.spec.init_containers]
        pod = self._pods.get(task.id)
        for c in task.spec.sidecars:
            rt: RuntimeStatus | None = self.runtime.status(container_id(task.id, c.name))
            restarts = pod.sides[c.name].restarts if pod and c.name in pod.sides else 0
            if rt is None:
                out.append(ContainerStatus(name=c.name, state="waiting", restarts=restarts))
            else:
                out.append(ContainerStatus(
                    name=c.name, state="running" if rt.state is RunState.RUNNING else "exited",
                    pid=rt.pid, exit_code=rt.exit_code, restarts=restarts,
                    message=rt.message))
        return tuple(out)
