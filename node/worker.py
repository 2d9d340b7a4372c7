"""The agent-side reconciler: makes this node run exactly the tasks assigned to it.

Owns: comparing the tasks the replicated state assigns to this node with what the
runtime Controller runs, advancing each task one step (start, report, stop, forget),
and reporting observed status back through the store. It is level-triggered: every
pass recomputes from scratch, so a lost report or a restart of the agent is repaired
by the next pass. Must not touch: desired state or placement (the leader's), or
namespaces/cgroups directly (the runtime's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from shoal.node.errors import ApiError, Unavailable
from shoal.node.feed import StateFeed
from shoal.raft.errors import CommandRejected, StoreError
from shoal.raft.models import Task, TaskState, TaskStatus, to_dict
from shoal.raft.store import RaftStore
from shoal.runtime.controller import Controller, RunState, RuntimeStatus, TaskConfig
from shoal.runtime.errors import StartError, TaskNotFound
from shoal.runtime.images import ImageConfig
from shoal.runtime.rootfs import MountSpec

if TYPE_CHECKING:
    from shoal.node.mesh import Mesh

log = logging.getLogger("shoal.worker")


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


class Worker:
    def __init__(self, node_id: str, store: RaftStore | StateFeed, runtime: Controller,
                 wakeup: asyncio.Event, interval: float = 1.0,
                 mesh: Mesh | None = None,
                 task_files: Callable[[Task], Awaitable[dict[str, tuple[bytes, int]]]] | None
                 = None,
                 pull_image: Callable[[str], Awaitable[None]] | None = None) -> None:
        self.node_id = node_id
        self.mesh = mesh  # task networking: attach after start, detach on removal
        # files a task must see besides resolv.conf (secrets/configs), fetched per task
        self.task_files = task_files
        # fetch an image this node lacks from a peer (raises ApiError if none has it)
        self.pull_image = pull_image
        self.store = store
        self.runtime = runtime
        self.wakeup = wakeup
        self.interval = interval
        self._stopping: dict[str, asyncio.Task[None]] = {}
        self._starting: set[str] = set()
        self._closed = False

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
        self.wakeup.set()

    async def reconcile(self) -> None:
        if not self.store.is_ready():
            return
        snap = self.store.snapshot()
        mine = {t.id: t for t in snap.tasks.values() if t.node_id == self.node_id}
        running = self.runtime.tasks()
        reports: list[tuple[Task, TaskStatus]] = []

        for task in mine.values():
            rt = running.get(task.id)
            wants_run = task.desired_state <= TaskState.RUNNING
            if rt is None:
                if task.id in self._starting:
                    continue
                if wants_run and task.status.state < TaskState.RUNNING:
                    reports.append((task, await self._start(task)))
                elif wants_run and not task.status.state.terminal:
                    # it ran here before but the runtime has no trace of it (host reboot?)
                    reports.append((task, TaskStatus(
                        state=TaskState.FAILED, timestamp=time.time(),
                        message="task lost: not found in the runtime after agent restart",
                        err="task lost")))
                elif not wants_run and not task.status.state.terminal:
                    reports.append((task, TaskStatus(
                        state=TaskState.SHUTDOWN, timestamp=time.time(),
                        message="shut down before it started")))
                continue
            if not wants_run and rt.state is RunState.RUNNING:
                self._stop(task.id, task.spec.stop_grace_period)
                continue
            seen = observed_status(rt)
            if seen.state is TaskState.RUNNING:  # (re)attach, e.g. after an agent restart
                addr = await self._attach(task.id, rt.pid) or task.status.addr
                seen = replace(seen, addr=addr)
            if seen.state > task.status.state or (
                    seen.state == task.status.state and seen.state is TaskState.RUNNING
                    and (seen.pid, seen.addr) != (task.status.pid, task.status.addr)):
                reports.append((task, seen))
            if rt.state is RunState.EXITED and task.status.state.terminal and \
                    task.desired_state >= TaskState.SHUTDOWN:
                await self._remove(task.id)

        # runtime tasks that are no longer ours (deleted, or reassigned): stop and forget
        for tid, rt in running.items():
            if tid in mine:
                continue
            if rt.state is RunState.RUNNING:
                self._stop(tid, 10.0)
            elif tid not in self._stopping:
                await self._remove(tid)

        if reports:
            await asyncio.gather(*(self._report(t, s) for t, s in reports))

    async def task_config(self, task: Task) -> TaskConfig:
        """The runtime's view of a task: its spec, with the image's config applied (Docker's
        rules) and the files it must see (resolv.conf naming the node's DNS, secrets)."""
        s = task.spec
        cmd, env, wd, user = tuple(s.command), dict(s.env), s.workdir, s.user
        if s.image:
            image = await self._ensure_image(s.image)
            cmd, env, wd, user = image.apply(cmd, env, wd, user)
            if not cmd:
                raise StartError(f"image {s.image} has no command and the service gives none")
        files: dict[str, tuple[bytes, int]] = dict(self.mesh.task_files()) \
            if self.mesh is not None else {}
        if self.task_files is not None:
            files.update(await self.task_files(task))
        return TaskConfig(
            task_id=task.id,
            hostname=f"{task.service_name}-{task.slot}",
            command=cmd, env=env, workdir=wd, user=user,
            image=s.image, stop_signal=s.stop_signal,
            memory_limit=s.limit_memory, cpu_limit=s.limit_cpu, pids_limit=s.limit_pids,
            mounts=tuple(MountSpec(m.type, m.target, m.source, m.readonly, m.tmpfs_size)
                         for m in s.mounts),
            files=files,
        )

    async def _ensure_image(self, ref: str) -> ImageConfig:
        """The image's config; fetched from a peer first if this node lacks it."""
        try:
            return self.runtime.image_config(ref)
        except StartError:
            if self.pull_image is None:
                raise
        await self.pull_image(ref)
        return self.runtime.image_config(ref)

    async def _start(self, task: Task) -> TaskStatus:
        self._starting.add(task.id)
        addr = ""

        async def network(pid: int) -> None:
            """The task's veth, address and routes, before anything of it runs (as Docker
            and CNI do): its command may use the network from its first instruction."""
            nonlocal addr
            assert self.mesh is not None
            try:
                addr = await self.mesh.attach(task.id, pid)
            except BaseException:
                with contextlib.suppress(Exception):
                    await self.mesh.detach(task.id)  # release the address, drop the veth
                raise
            log.info("task %s attached with address %s", task.id, addr)

        try:
            cfg = await self.task_config(task)
            # (a mesh not up yet: the task starts without a network, a later pass attaches it)
            early = self.mesh is not None and self.mesh.ready
            rt = await self.runtime.start(cfg, before_start=network if early else None)
        except Unavailable as exc:  # no manager/peer reachable yet: retried on the next pass
            log.info("task %s (%s) waits: %s", task.id, task.name, exc.message)
            return TaskStatus(state=TaskState.PREPARING, timestamp=time.time(),
                              message=f"waiting: {exc.message}")
        except ApiError as exc:  # a secret missing, or no peer has the image
            log.warning("task %s (%s) cannot start yet: %s", task.id, task.name, exc.message)
            return TaskStatus(state=TaskState.REJECTED, timestamp=time.time(),
                              message=exc.message, err=exc.message)
        except StartError as exc:
            log.warning("task %s (%s) failed to start: %s", task.id, task.name, exc)
            return TaskStatus(state=TaskState.REJECTED, timestamp=time.time(),
                              message=str(exc), err=str(exc))
        finally:
            self._starting.discard(task.id)
        log.info("started task %s (%s) pid %s", task.id, task.name, rt.pid)
        seen = observed_status(rt)
        if seen.state is TaskState.RUNNING:
            seen = replace(seen, addr=addr or await self._attach(task.id, rt.pid))
        return seen

    async def _attach(self, task_id: str, pid: int | None) -> str:
        """The task's address, attaching it to the node's network if it has none yet ("" while
        the mesh is not up: the next pass retries)."""
        mesh = self.mesh
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

    async def _remove(self, task_id: str) -> None:
        """Forget an ended task in the runtime, then release its address."""
        await self.runtime.remove(task_id)
        if self.mesh is not None:
            try:
                await self.mesh.detach(task_id)
            except Exception as exc:
                log.warning("task %s: releasing its address failed: %s", task_id, exc)

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
        cmd: dict[str, Any] = {"op": "task_status", "task_id": task.id, "node_id": self.node_id,
                               "now": time.time(), "status": to_dict(status)}
        try:
            await self.store.propose(cmd)
        except CommandRejected as exc:
            log.debug("status report for %s refused: %s", task.id, exc)
        except StoreError as exc:
            log.warning("status report for %s not committed (will retry): %s", task.id, exc)

    async def stop_all(self, grace: float = 10.0) -> None:
        """Stop every task (used by `shoal leave`)."""
        for tid, rt in self.runtime.tasks().items():
            if rt.state is RunState.RUNNING:
                self._stop(tid, grace)
        if self._stopping:
            await asyncio.gather(*self._stopping.values(), return_exceptions=True)
        for tid in list(self.runtime.tasks()):
            await self._remove(tid)
