"""The real task controller: runs each task as a container (namespaces, cgroups, its own root
filesystem, reduced capabilities), in the manner of runc / Nomad's exec driver.

Owns: ``RuntimeConfig.data_dir`` / ``tasks`` (one directory per task), ``images`` (the image
store, runtime/images.py), ``volumes`` (named volumes), ``bin`` (the compiled launcher) and
``mnt`` (an empty directory: each task's staging tmpfs is mounted there, in the task's own mount
namespace; see runtime/rootfs.py), the task cgroups (runtime/cgroups.py), and the processes
started from them: one launcher/shim per task (runtime/launcher.c, see its header for the
process tree) and the task under it.
Must not touch: cluster state (the agent's reconciler decides what runs; this module only does it),
networking beyond bringing the task's own ``lo`` up, and anything outside data_dir except the
task's own cgroups.

The agent is never forked to launch a task: the compiled launcher is exec'ed per task
(``subprocess`` uses vfork: 0.13 ms at small RSS where fork costs ~65 ms at 1 GB; and unlike
``os.posix_spawn`` it leaves no signal ignored in the child). The launcher stays outside the task
as its shim: it pumps the task's output into rotated log files, waits for it and writes its exit
code to ``TASKDIR/exit``, so tasks survive an agent restart and a restarted agent learns how they
ended (:meth:`ProcessController.recover`).

Start order (what overlaps what): check what the user can get wrong (image, user, limits), make
the task directory, spawn the launcher (it clones the task's namespaces and waits for its spec
meanwhile), prepare the task (files, config.json, cgroups, runtime.json, the spec), record the
shim in pids.json, send the spec (the "go"), wait for the ready pipe's EOF (tini exec'ed; the
shim reports the init's pid on the same pipe), record the init. A failure before the go closes
the spec pipe unfinished: the launcher starts nothing and is killed and reaped.

This module drives; the pieces it uses live apart (see runtime/controller.py for the map): the
task directory's files (runtime/taskdir.py), the launcher's pipes (runtime/launcher.py), process
identity from /proc (runtime/procfs.py), adoption after a restart (runtime/adoption.py), and the
cgroup, volume and image pass-throughs (runtime/resources.py).

Exit detection uses a pidfd per watched process (``os.pidfd_open`` + ``loop.add_reader``), which
works for adopted shims that are not our children; nothing polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.runtime import cgroups as cg_mod
from shoal.runtime import logs as logs_mod
from shoal.runtime import resources, seccomp
from shoal.runtime.adoption import adopt, read_config
from shoal.runtime.cgroups import CgroupLayout, TaskCgroups, TaskUsage
from shoal.runtime.controller import BeforeStart, Controller, Listener
from shoal.runtime.errors import (
    CgroupError,
    ConfigError,
    ImageNotFound,
    ImageUnavailable,
    InvalidTaskConfig,
    LaunchFailed,
    StartError,
    StopFailed,
    TaskExists,
    TaskNotFound,
)
from shoal.runtime.images import ImageConfig, ImageStore
from shoal.runtime.launcher import Spec, ensure_launcher, read_pid, read_ready, send_spec
from shoal.runtime.logs import LogLine
from shoal.runtime.procfs import UNREAPED, ProcRef, boot_id, children, net_dev_bytes, reap
from shoal.runtime.records import RunState, RuntimeConfig, RuntimeStatus, TaskConfig, parse_signal
from shoal.runtime.rootfs import (
    CAPABILITIES,
    INIT_IN_TASK,
    RootfsPlan,
    User,
    bounding_set,
    build_plan,
    capability_mask,
    hosts_file,
    read_rootfs_file,
    resolv_conf,
    resolve_user,
    root_dir,
)
from shoal.runtime.seccomp import SeccompError
from shoal.runtime.taskdir import (
    TaskRecord,
    atomic_write,
    cgroups_left,
    exited_status,
    keep_only_cgroups,
    read_exit,
    safe_rmtree,
    tail,
    write_new,
)
from shoal.runtime.taskvols import TaskVolumes

log = logging.getLogger(__name__)
# the capabilities this agent can give its tasks (its own bounding set: less than all when
# it runs in a container): what cap_add ALL means here
_BOUNDING = bounding_set(Path("/proc/self/status").read_text())



def task_filter(cfg: TaskConfig) -> bytes | None:
    """The BPF program of ``cfg``'s seccomp setting for the capabilities it keeps (compiled
    once per setting and set: seccomp.compiled); None: unconfined. SeccompError if it
    cannot be made."""
    keep = capability_mask(cfg.cap_add, cfg.cap_drop, _BOUNDING)
    caps = frozenset(name for name, bit in CAPABILITIES.items() if keep >> bit & 1)
    return seccomp.compiled(cfg.seccomp, caps)


# SigIgn bits of SIGTTIN and SIGTTOU: tini ignores them once its signal handling is set up.
_TINI_READY = 1 << (signal.SIGTTIN - 1) | 1 << (signal.SIGTTOU - 1)


@dataclass(frozen=True)
class _Plan:
    """What start() resolved before making anything (see ProcessController._resolve)."""

    layers: list[Path] | None  # image layers, top first; None = the default image
    image_id: str
    user: User
    volumes: tuple[str, ...]  # named volumes the task mounts
    seccomp: bytes | None  # the task's seccomp filter (runtime/seccomp.py); None: unconfined


class ProcessController:
    """Runs tasks as containers. See the module docstring.

    All methods must be called from one event loop thread (the agent's), like the listener.
    ImageStore methods (``self.images``) block: call them from a thread.
    """

    def __init__(self, config: RuntimeConfig) -> None:
        config.validate()
        self._cfg = config
        self._tasks: dict[str, TaskRecord] = {}
        self._starting: set[str] = set()
        self._starting_images: dict[str, str] = {}  # task id -> image id, while starting
        # removed tasks whose cgroups were still busy: task id -> those groups (_discard)
        self._cgroups_left: dict[str, TaskCgroups] = {}
        self._listener: Listener | None = None
        self._boot_id = boot_id()
        self._loop: asyncio.AbstractEventLoop | None = None
        try:
            config.tasks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            config.volumes_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
            config.mnt_dir.mkdir(exist_ok=True, mode=0o700)
            # (network mounts, anonymous volumes, filling from the image)
            self._vols = TaskVolumes(config.volumes_dir, config.anon_dir, lambda name: any(
                name in t.volumes and not t.volumes_released for t in self._tasks.values()))
        except OSError as exc:
            raise ConfigError(f"cannot create {config.data_dir}: {exc}") from exc
        self._launcher = config.launcher_path or str(
            ensure_launcher(Path(config.data_dir) / "bin", config.cc_path)
        )
        self.cgroup_layout: CgroupLayout = (
            cg_mod.detect() if config.cgroups == "auto" else CgroupLayout("none")
        )
        layout = self.cgroup_layout
        if layout.mode == "none":
            # e.g. an agent started with `ip netns exec`, which remounts /sys without cgroups
            log.warning("runtime: no cgroups (%s): tasks run without limits or usage",
                        "turned off" if config.cgroups == "off" else "none mounted")
        else:
            log.info("runtime: cgroups %s (limits: %s, cgroup2 at %s)", layout.mode,
                     layout.limits_version or "none", layout.unified)
        #: This node's image store (blocking methods: call them from a thread).
        self.images = ImageStore(config.images_dir, in_use=self._images_in_use)
        try:
            self._resolv = resolv_conf(Path(config.resolv_conf).read_text())
        except OSError:
            self._resolv = ""

    # -- Controller interface

    def set_listener(self, cb: Listener | None) -> None:
        self._listener = cb

    def status(self, task_id: str) -> RuntimeStatus | None:
        task = self._tasks.get(task_id)
        return task.status if task is not None else None

    def task_env(self, task_id: str) -> dict[str, str] | None:
        task = self._tasks.get(task_id)
        return None if task is None else dict(task.cfg.env)

    def exec_filter(self, pid: int) -> bytes | None:
        """The seccomp filter a command run in the task whose init is ``pid`` must take (its
        own: Docker's exec runs under its container's profile); None: unconfined, or no task
        of this runtime has that init."""
        for task in self._tasks.values():
            if task.status.pid == pid:
                return task_filter(task.cfg)
        return None

    def tasks(self) -> dict[str, RuntimeStatus]:
        return {tid: t.status for tid, t in self._tasks.items()}

    def _task(self, task_id: str) -> TaskRecord:
        task = self._tasks.get(task_id)
        if task is None:
            raise TaskNotFound(task_id)
        return task

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        task = self._task(task_id)
        return task.dir / "stdout.log", task.dir / "stderr.log"

    def usage(self, task_id: str) -> TaskUsage | None:
        task = self._tasks.get(task_id)
        if task is None or (used := resources.usage(task.cgroups)) is None:
            return None
        # network traffic: a task's own namespace only (not a host-network task's, the node's;
        # not a pod sidecar's, its main container's, which counts the pod's)
        own_netns = not task.cfg.host_network and not task.cfg.join_netns
        net = net_dev_bytes(task.init) if own_netns and task.init is not None else None
        return used if net is None else dataclasses.replace(used, net_rx_bytes=net[0],
                                                            net_tx_bytes=net[1])

    def read_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> list[LogLine]:
        return logs_mod.read_logs(self._task(task_id).dir, tail, since, timestamps)

    def follow_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        task = self._task(task_id)
        return logs_mod.follow_logs(
            task.dir, lambda: task.status.state is RunState.RUNNING, tail, since, timestamps
        )

    def image_config(self, ref: str) -> ImageConfig:
        return resources.image_config(self.images, ref)

    def volumes(self) -> list[str]:
        """Named volumes on this node."""
        return resources.list_volumes(self._cfg.volumes_dir)

    def remove_volume(self, name: str) -> None:
        """Delete a named volume and its data. VolumeInUse if a known task mounts it."""
        users = [tid for tid, t in self._tasks.items()
                 if name in t.volumes and not t.volumes_released]
        resources.remove_volume(self._cfg.volumes_dir, name, users)

    def anonymous_volumes(self) -> dict[str, dict[str, Any]]:
        return self._vols.anonymous()

    async def remove_anonymous_volume(self, name: str) -> bool:
        return await self._vols.remove_anonymous(name)

    def _images_in_use(self) -> set[str]:
        # (an exited task kept for its logs needs its image no more: tasks never restart in
        # place — `image prune` and the image GC may take it)
        used = {t.image_id for t in self._tasks.values()
                if t.image_id and t.status.state is not RunState.EXITED}
        return used | set(self._starting_images.values())

    async def start(self, cfg: TaskConfig, before_start: BeforeStart | None = None
                    ) -> RuntimeStatus:
        cfg.validate()
        if cfg.task_id in self._tasks or cfg.task_id in self._starting:
            raise TaskExists(f"task {cfg.task_id} is already known")
        loop = self._bind_loop()
        taskdir = self._cfg.tasks_dir / cfg.task_id
        self._starting.add(cfg.task_id)
        try:
            plan = self._resolve(cfg)  # what the user can get wrong, before anything is made
            self._starting_images[cfg.task_id] = plan.image_id
            await self._vols.mount(cfg)
            await self._vols.prepare(cfg, plan.layers)  # (made, filled from the image)
            try:
                taskdir.mkdir(mode=0o700)
            except FileExistsError as exc:
                raise TaskExists(f"task directory exists: {taskdir} (call recover()?)") from exc
            except OSError as exc:
                raise LaunchFailed(f"cannot create {taskdir}: {exc}") from exc
            task: TaskRecord | None = None
            try:
                # The launcher first: its exec and the clone of the namespaces overlap the
                # preparation below (it waits for the spec, and starts nothing without it).
                task, spec_w, ready_r = self._spawn(loop, cfg, taskdir, plan)
                try:
                    make_spec = self._prepare(cfg, taskdir, plan, task)
                except BaseException:
                    os.close(spec_w)  # an incomplete spec: the launcher starts nothing
                    os.close(ready_r)
                    raise
                return await self._launch(loop, task, spec_w, ready_r, make_spec,
                                          before_start)
            except BaseException:
                if task is not None:
                    await self._abandon(task)  # no-op if the launch already did
                await self._discard(taskdir, task.cgroups if task is not None else None)
                raise
        except BaseException:
            await self._vols.release(cfg.task_id)
            await self._vols.drop(cfg.task_id)
            raise
        finally:
            self._starting.discard(cfg.task_id)
            self._starting_images.pop(cfg.task_id, None)

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        task = self._task(task_id)
        if task.status.state is RunState.EXITED:
            return task.status
        if not task.notes.stop_requested:
            task.notes.stop_requested = True
            task.notes.save(task.dir / "notes.json")
        await self._init_ready(task)  # a stop right after start must not lose its signal
        self._signal_init(task, parse_signal(task.cfg.stop_signal))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task.done), timeout=max(grace, 0.0))
        if not task.done.done():
            if not task.notes.killed:
                task.notes.killed = True
                task.notes.save(task.dir / "notes.json")
            self._signal_init(task, signal.SIGKILL)
            if task.cgroups is not None:
                task.cgroups.kill()  # the final step: nothing of the task escapes
            try:
                await asyncio.wait_for(asyncio.shield(task.done), timeout=self._cfg.kill_timeout)
            except TimeoutError as exc:
                raise StopFailed(f"task {task_id} still running after SIGKILL") from exc
        return task.status

    async def remove(self, task_id: str) -> None:
        self._remove_cgroups_left()
        task = self._tasks.get(task_id)
        if task is None:
            return
        if task.status.state is RunState.RUNNING:
            await self.stop(task_id, self._cfg.remove_grace)
        self._unwatch(task)
        del self._tasks[task_id]
        await self._discard(task.dir, task.cgroups)
        if not task.volumes_released:
            await self._vols.release(task_id, task.volumes)
        await self._vols.drop(task_id)  # (its anonymous volumes, with the container)

    async def release(self, task_id: str) -> None:
        task = self._tasks.get(task_id)
        if task is None or task.status.state is not RunState.EXITED or task.volumes_released:
            return
        task.volumes_released = True
        await self._vols.release(task_id, task.volumes)

    async def _discard(self, taskdir: Path, cgroups: TaskCgroups | None) -> None:
        """Remove a gone task's cgroups and directory. Groups still busy after kill_timeout
        keep the directory, emptied but for their record (taskdir.CGROUPS_LEFT), until a later
        remove() or the next agent's recover() gets them."""
        left = await resources.remove_cgroups(cgroups, self._cfg.kill_timeout) if cgroups else []
        if left and cgroups is not None:
            try:
                keep_only_cgroups(taskdir, cgroups)
            except OSError as exc:  # the whole directory stays: recover() adopts it again
                log.error("runtime: cannot record %s's busy cgroups: %s", taskdir.name, exc)
                return
            self._cgroups_left[taskdir.name] = cgroups
            return
        safe_rmtree(taskdir)

    def _remove_cgroups_left(self) -> None:
        """Try again to remove the groups removed tasks left behind (see _discard)."""
        for task_id, cgroups in list(self._cgroups_left.items()):
            try:
                if resources.remove_cgroups_now(cgroups):
                    continue
            except CgroupError as exc:
                log.warning("runtime: %s", exc)
                continue
            log.info("runtime: removed the cgroups task %s left behind", task_id)
            del self._cgroups_left[task_id]
            safe_rmtree(self._cfg.tasks_dir / task_id)

    async def close(self) -> None:
        for task in self._tasks.values():
            self._unwatch(task)
            if not task.done.done():
                task.done.cancel()
        self._tasks.clear()

    async def recover(self) -> None:
        loop = self._bind_loop()
        try:
            entries = sorted(self._cfg.tasks_dir.iterdir())
        except OSError as exc:
            log.error("runtime: cannot list %s: %s", self._cfg.tasks_dir, exc)
            return
        for taskdir in entries:
            if taskdir.name in self._tasks or not taskdir.is_dir():
                continue
            left = cgroups_left(taskdir)
            if left is not None:
                self._cgroups_left[taskdir.name] = left
                continue
            cfg = read_config(taskdir)
            if cfg is not None:
                self._vols.adopt(cfg)
                self._register(adopt(
                    cfg, taskdir, boot_id=self._boot_id, loop=loop,
                    watch=lambda task, fd, shim: self._watch(task, fd, shim=shim),
                    find_init=self._find_init,
                ))  # fmt: skip
        self._remove_cgroups_left()
        for name in await self._vols.sweep():  # (an agent that died before removing them)
            log.info("runtime: removed anonymous volume %s (no task uses it)", name)

    # -- launching

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("ProcessController used from two event loops")
        return loop

    def _resolve(self, cfg: TaskConfig) -> _Plan:
        """What start() checks before it makes anything: the image, the user, bind sources,
        whether the limits can be enforced here. Raises the user's errors; no side effects."""
        layers: list[Path] | None = None
        image_id = ""
        if cfg.image:
            try:
                info = self.images.resolve(cfg.image)
            except ImageNotFound as exc:
                raise ImageUnavailable(f"image {cfg.image!r} is not on this node") from exc
            layers = self.images.layer_dirs(info)
            image_id = info.id
            passwd = read_rootfs_file(layers, "etc/passwd")
            group = read_rootfs_file(layers, "etc/group")
        else:
            passwd = _read_host("/etc/passwd")
            group = _read_host("/etc/group")
        try:
            user = resolve_user(cfg.user, passwd, group, cfg.group_add)
        except ValueError as exc:
            raise InvalidTaskConfig("group_add" if "--group-add" in str(exc) else "user",
                                    str(exc)) from None
        try:  # (a capability this node cannot give: said now, not as capset's EPERM later)
            capability_mask(cfg.cap_add, cfg.cap_drop, _BOUNDING)
        except ValueError as exc:
            raise InvalidTaskConfig("cap_add", str(exc)) from None
        volumes = []
        for m in cfg.mounts:
            if m.type == "bind" and not os.path.exists(m.source):
                raise InvalidTaskConfig("mounts", f"bind source does not exist: {m.source}")
            if m.type == "volume":
                volumes.append(m.source)
        if self.cgroup_layout.mode != "none":
            cg_mod.check_limits(self.cgroup_layout, cfg.limits())
        elif cfg.limits().any:
            raise CgroupError("resource limits need cgroups, which are off on this node")
        try:  # (libseccomp missing, a rule it refuses: said now, not by the launcher)
            program = task_filter(cfg)
        except SeccompError as exc:
            raise InvalidTaskConfig("seccomp", str(exc)) from None
        return _Plan(layers, image_id, user, tuple(volumes), program)

    def _prepare(self, cfg: TaskConfig, taskdir: Path, plan: _Plan, task: TaskRecord
                 ) -> Callable[[str | None], bytearray]:
        """Everything the launcher needs before the "go": directories, files, config.json, the
        cgroups (set on ``task`` as soon as they exist) and runtime.json; and what makes the
        launch spec once the task's address is known (``before_start``'s answer; None: its
        host name is 127.0.1.1's in /etc/hosts, as a task with no address of its own)."""
        layers, user = plan.layers, plan.user
        try:
            if layers is not None:  # the task's writable overlay layer
                os.mkdir(taskdir / "upper")
                os.mkdir(taskdir / "work")
            write_new(taskdir / "config.json", cfg.to_json())
        except OSError as exc:
            raise LaunchFailed(f"cannot prepare {taskdir}: {exc}") from exc
        cgroups = None
        if self.cgroup_layout.mode != "none":
            cgroups = TaskCgroups.create(
                self.cgroup_layout, self._cfg.cgroup_parent, cfg.task_id, cfg.limits()
            )
            task.cgroups = cgroups  # removed by start() if anything below fails
        try:
            write_new(
                taskdir / "runtime.json",
                json.dumps(
                    {
                        "cgroups": cgroups.to_json() if cgroups else None,
                        "image_id": plan.image_id,
                        "volumes": list(plan.volumes),
                    }
                ),
            )
        except OSError as exc:
            raise LaunchFailed(f"cannot prepare {taskdir}: {exc}") from exc

        def make_spec(addr: str | None) -> bytearray:
            env = cfg.full_env()
            # what Docker sets unless the task does: HOME from the user's passwd entry (runc),
            # HOSTNAME (moby's container environment)
            env.setdefault("HOME", user.home)
            env.setdefault("HOSTNAME", cfg.hostname)
            spec = Spec()
            if cfg.join_netns:  # a pod's extra container: the task's network, not its own
                spec.add("J", cfg.join_netns)
            spec.add("H", cfg.hostname)
            spec.add("W", cfg.workdir or "/")
            spec.add("P", env["PATH"])
            spec.add("I", INIT_IN_TASK)
            spec.add("R", root_dir(self._cfg.mnt_dir))
            spec.add("K", str(capability_mask(cfg.cap_add, cfg.cap_drop, _BOUNDING)))
            spec.fields("U", user.uid, user.gid, ",".join(str(g) for g in user.groups))
            for path in cgroups.procs_files() if cgroups else ():
                spec.add("C", path)
            for name, soft, hard in cfg.ulimits:
                spec.fields("L", name, soft, hard)
            if cfg.oom_score_adj:
                spec.add("S", str(cfg.oom_score_adj))
            if plan.seccomp is not None:
                spec.add("F", plan.seccomp)
            for arg in cfg.command:
                spec.add("A", arg)
            for key, value in env.items():
                spec.add("V", f"{key}={value}")
            build_plan(
                spec,
                RootfsPlan(
                    stage=self._cfg.mnt_dir,
                    taskdir=taskdir,
                    init_files=(
                        ("hostname", cfg.hostname + "\n"),
                        ("hosts", hosts_file(cfg.hostname, cfg.extra_hosts, addr)),
                        ("resolv.conf", self._resolv),
                    ),
                    tini=self._cfg.tini_path,
                    layers=layers,
                    default_binds=self._cfg.default_rootfs,
                    default_masked=self._cfg.default_masked,
                    volumes_dir=self._cfg.volumes_dir,
                    dev_shm_size=self._cfg.dev_shm_size,
                ),
                cfg.mounts,
                cfg.files,
                user,
                workdir=cfg.workdir or "/",
                read_only=cfg.read_only,
                sysctls=cfg.sysctls,
                console=cfg.tty,
            )
            return bytearray(spec.encode())

        return make_spec

    def _spawn(
        self, loop: asyncio.AbstractEventLoop, cfg: TaskConfig, taskdir: Path, plan: _Plan
    ) -> tuple[TaskRecord, int, int]:
        """Start the launcher (it clones the task's init, which waits for the spec); return the
        task record watching it, the spec pipe's write end and the ready pipe's read end."""
        spec_r, spec_w = os.pipe()
        ready_r, ready_w = os.pipe()
        logs = (str(cfg.log_max_bytes or self._cfg.log_max_bytes),  # (0: the runtime's)
                str(cfg.log_max_files or self._cfg.log_max_files))
        started_at = time.time()
        try:
            flags = [name for name, on in (("host-network", cfg.host_network), ("tty", cfg.tty),
                                           ("stdin-open", cfg.stdin_open)) if on]
            proc = subprocess.Popen(
                [self._launcher, "shim", str(taskdir), *logs, *flags],
                stdin=spec_r,
                stdout=ready_w,  # its stderr: TASKDIR/shim.log, which it opens itself
                env={},
                cwd="/",
                close_fds=True,
                start_new_session=True,
                restore_signals=True,
            )
        except OSError as exc:
            for fd in (spec_r, spec_w, ready_r, ready_w):
                os.close(fd)
            raise LaunchFailed(f"cannot spawn the launcher: {exc}") from exc
        os.close(spec_r)
        os.close(ready_w)
        UNREAPED[proc.pid] = proc
        opened = ProcRef.open_pid(proc.pid)
        task = TaskRecord(
            cfg=cfg,
            dir=taskdir,
            started_at=started_at,
            status=RuntimeStatus(RunState.RUNNING, pid=None, started_at=started_at),
            done=loop.create_future(),
            shim=opened[0] if opened else None,
            image_id=plan.image_id,
            volumes=plan.volumes,
        )
        if opened is None:  # cannot happen while it waits for its spec
            os.close(spec_w)
            os.close(ready_r)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            UNREAPED.pop(proc.pid, None)
            raise LaunchFailed(f"task {cfg.task_id}: the launcher died right after spawn")
        self._watch(task, opened[1], shim=True)
        return task, spec_w, ready_r

    async def _launch(
        self,
        loop: asyncio.AbstractEventLoop,
        task: TaskRecord,
        spec_w: int,
        ready_r: int,
        make_spec: Callable[[str | None], bytearray],
        before_start: BeforeStart | None = None,
    ) -> RuntimeStatus:
        """Record the shim, run ``before_start`` on the waiting init, give the launcher the spec
        (the "go") and wait until the task's init is exec'ed (RUNNING), or has failed."""
        cfg, taskdir = task.cfg, task.dir
        prefix = b""
        addr: str | None = None
        if before_start is not None:
            pid: int | None = None
            try:
                prefix, pid = await asyncio.wait_for(read_pid(loop, ready_r),
                                                     self._cfg.start_timeout)
                if pid is not None:  # (None: the launcher failed; the ready pipe tells why)
                    addr = await before_start(pid)
            except BaseException as exc:
                os.close(spec_w)  # no spec: the init starts nothing
                os.close(ready_r)
                await self._abandon(task)
                if isinstance(exc, TimeoutError) and pid is None:
                    raise LaunchFailed(f"cannot start task {cfg.task_id}: the launcher did "
                                       f"not report its init within {self._cfg.start_timeout}"
                                       " s (an overloaded machine?)") from exc
                if isinstance(exc, Exception):
                    raise LaunchFailed(f"cannot start task {cfg.task_id}: preparing its "
                                       f"namespaces failed: {exc}") from exc
                raise
        spec = bytearray()
        try:
            spec = make_spec(addr)
            self._write_pids(task, new=True)
            # The complete spec is the "go": the launcher may start the task now, it is recorded.
            await send_spec(loop, spec_w, spec)
        except Exception as exc:  # (the spec not made, or not all of it sent)
            os.close(ready_r)
            await self._abandon(task)  # a truncated spec: the launcher starts nothing
            if isinstance(exc, StartError):  # (said already: too many records, a mount...)
                raise
            raise LaunchFailed(f"cannot start task {cfg.task_id}: {exc}; "
                               f"shim.log: {tail(taskdir / 'shim.log')!r}") from exc
        finally:
            spec[:] = bytes(len(spec))  # it may hold secrets
            os.close(spec_w)
        try:
            ready, init_pid = await asyncio.wait_for(
                read_ready(loop, ready_r, prefix), self._cfg.start_timeout
            )
        except TimeoutError:
            await self._abandon(task)
            raise LaunchFailed(
                f"task {cfg.task_id}: launcher not ready after {self._cfg.start_timeout}s; "
                f"shim.log: {tail(taskdir / 'shim.log')!r}"
            ) from None
        except BaseException:
            await self._abandon(task)
            raise
        if ready == b"R":
            if task.status.state is RunState.RUNNING:
                self._find_init(task, init_pid)
        elif ready == b"N":
            task.notes.not_found = cfg.command[0]
            task.notes.save(taskdir / "notes.json")
            await self._wait_done(task)
            if task.status.state is RunState.EXITED:  # may have been seen before the notes
                st = task.status
                task.status = exited_status(st.started_at, st.exit_code, st.finished_at, task.notes)
        else:  # EOF: the launcher failed; it has exited or is about to
            await self._wait_done(task)
            self._unwatch(task)
            code, _ = read_exit(taskdir)
            reason = tail(taskdir / "shim.log") or "no message"
            raise LaunchFailed(f"task {cfg.task_id}: launcher failed (exit {code}): {reason}")
        task.registered = True
        self._tasks[cfg.task_id] = task
        if task.status.state is RunState.EXITED and self._listener is not None:
            # it exited before it was registered (_finish told no one): every exit is told
            loop.call_soon(self._notify, cfg.task_id)
        return task.status

    def _notify(self, task_id: str) -> None:
        if self._listener is not None:
            try:
                self._listener(task_id)
            except Exception:
                log.exception("runtime: task listener failed for %s", task_id)

    async def _wait_done(self, task: TaskRecord) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task.done), self._cfg.kill_timeout)

    async def _abandon(self, task: TaskRecord) -> None:
        """Kill a launch that failed half-way (its whole session: shim and init; the task cannot
        have left it yet) and wait until the watched shim is reaped."""
        if not task.done.done() and task.shim is not None:
            # Safe: the shim is our unreaped child until _on_exit resolves `done`.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(task.shim.pid, signal.SIGKILL)
        self._signal_init(task, signal.SIGKILL)
        if task.cgroups is not None:
            task.cgroups.kill()
        await self._wait_done(task)
        self._unwatch(task)

    async def _init_ready(self, task: TaskRecord) -> None:
        """Wait (briefly: well under a millisecond after start, not at all later) until tini has
        set up its signal handling. Before that, a namespace init drops any signal it has no
        handler for: a stop() right after start() would lose its SIGTERM."""
        if task.init is None:
            return
        deadline = time.monotonic() + min(1.0, self._cfg.start_timeout)
        path = f"/proc/{task.init.pid}/status"
        while time.monotonic() < deadline:
            try:
                text = Path(path).read_text()
            except OSError:
                return
            # tini blocks what it forwards, then ignores SIGTTIN and SIGTTOU (it starts with
            # none ignored); while it waits in sigtimedwait() SigBlk reads 0, so look at SigIgn.
            ignored = next((ln for ln in text.splitlines() if ln.startswith("SigIgn:")), "")
            if ignored and int(ignored.split()[1], 16) & _TINI_READY == _TINI_READY:
                return
            await asyncio.sleep(0.0005)

    def _find_init(self, task: TaskRecord, pid: int | None = None) -> None:
        """The shim's only child is the task's init (its pid 1). ``pid``: as the shim reported
        it (the shim also recorded it in init.pid); None: look it up, record it in pids.json."""
        if task.shim is None or task.init is not None:
            return
        reported = pid is not None
        if pid is None:
            inits = children(task.shim.pid)
            if len(inits) != 1:
                return  # already gone (a very short task): its exit is on its way
            pid = inits[0]
        opened = ProcRef.open_pid(pid, parent=task.shim.pid)
        if opened is None:
            return  # already gone (a very short task): its exit is on its way
        task.init, task.init_fd = opened
        if not reported:
            try:
                self._write_pids(task)
            except OSError as exc:
                log.warning("runtime: cannot record init pid of %s: %s", task.cfg.task_id, exc)
        task.status = dataclasses.replace(task.status, pid=task.init.pid)

    def _write_pids(self, task: TaskRecord, new: bool = False) -> None:
        """pids.json: created (``new``, before the go) or replaced atomically."""
        (write_new if new else atomic_write)(
            task.dir / "pids.json",
            json.dumps(
                {
                    "boot_id": self._boot_id,
                    "started_at": task.started_at,
                    "shim": task.shim.to_json() if task.shim else None,
                    "init": task.init.to_json() if task.init else None,
                }
            ),
        )

    def _signal_init(self, task: TaskRecord, sig: int) -> None:
        if task.init is None:
            self._find_init(task)
        if task.init_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(task.init_fd, sig)
        elif sig == signal.SIGKILL and task.shim is not None and task.watching_shim:
            # init unknown (agent died mid-start): the whole session is the task's.
            fd = task.shim.open()
            if fd is not None:
                os.close(fd)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(task.shim.pid, sig)

    # -- watching

    def _watch(self, task: TaskRecord, fd: int, *, shim: bool) -> None:
        assert self._loop is not None
        task.watch_fd = fd
        task.watching_shim = shim
        self._loop.add_reader(fd, self._on_exit, task)

    def _unwatch(self, task: TaskRecord) -> None:
        for attr in ("watch_fd", "init_fd"):
            fd = getattr(task, attr)
            if fd is not None:
                if attr == "watch_fd" and self._loop is not None:
                    self._loop.remove_reader(fd)
                os.close(fd)
                setattr(task, attr, None)

    def _on_exit(self, task: TaskRecord) -> None:
        """The watched pidfd is readable: that process has exited."""
        assert self._loop is not None and task.watch_fd is not None
        fd, was_shim = task.watch_fd, task.watching_shim
        self._loop.remove_reader(fd)
        if was_shim and task.shim is not None:
            reap(task.shim.pid, fd)
        os.close(fd)
        task.watch_fd = None
        code, _ = read_exit(task.dir)
        if was_shim and code is None and task.init is not None:
            init_fd = task.init.open()
            if init_fd is not None:  # the shim died, not the task: watch the task itself
                log.warning("runtime: shim of %s died; watching its init", task.cfg.task_id)
                self._watch(task, init_fd, shim=False)
                return
        lost = (
            "exit status unknown: the shim died before the task"
            if task.init is not None
            else "exit status unknown: the launcher died before recording it"
        )
        self._finish(
            task,
            exited_status(
                task.started_at, code, time.time(), task.notes, lost, resources.oom(task.cgroups)
            ),
        )

    def _finish(self, task: TaskRecord, status: RuntimeStatus) -> None:
        task.status = status
        if task.init_fd is not None:
            os.close(task.init_fd)
            task.init_fd = None
        if not task.done.done():
            task.done.set_result(None)
        if task.registered:
            self._notify(task.cfg.task_id)

    # -- recovery

    def _register(self, task: TaskRecord) -> None:
        task.registered = True
        self._tasks[task.cfg.task_id] = task


# Host files read per start (/etc/passwd, /etc/group): path -> (identity when read, text).
_HOST_FILES: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _read_host(path: str) -> str:
    """A host text file, "" if unreadable; re-read only when its inode, size, mtime or ctime
    changed (every start resolves the task's user against the host's /etc/passwd)."""
    try:
        st = os.stat(path)
        key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        cached = _HOST_FILES.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    _HOST_FILES[path] = (key, text)
    return text


def _conforms(real: ProcessController) -> Controller:
    """Never called: makes mypy check that ProcessController satisfies the Controller protocol."""
    return real
