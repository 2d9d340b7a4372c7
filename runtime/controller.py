"""The Controller protocol: what the agent's reconciler uses to run tasks on this node.

Owns: the interface (``Controller``) and its callback types (``Listener``, ``BeforeStart``).
Must not touch: any implementation. The real controller is runtime/process.py
(``ProcessController``: namespaces, cgroups, a launcher/shim per task); the in-memory one for
tests is runtime/testing.py (``FakeController``).

Where the runtime's concerns live::

    records.py    TaskConfig, RuntimeStatus, RuntimeConfig and their validation
    controller.py this protocol
    process.py    ProcessController: start, stop, remove, watch (pidfds), logs
    launcher.py   the compiled launcher and its two pipes (spec in, ready out)
    procfs.py     process identity from /proc (pid + start time), reaping shims
    taskdir.py    the task directory's files, TaskRecord, safe deletion
    adoption.py   taking over tasks a previous agent started (recover())
    resources.py  pass-throughs to cgroups, volumes and images
    testing.py    FakeController
    cgroups.py rootfs.py images.py logs.py errors.py  (unchanged by the split)
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

from shoal.runtime.cgroups import TaskUsage
from shoal.runtime.images import ImageConfig
from shoal.runtime.logs import LogLine
from shoal.runtime.records import RuntimeStatus, TaskConfig

Listener = Callable[[str], None]
# start()'s hook: called with the host pid of the task's init once its namespaces exist and
# before anything of the task runs (the agent attaches the task's network there); returns
# the task's address, if it gave it one (its /etc/hosts names its host name with it)
BeforeStart = Callable[[int], Awaitable[str | None]]


class Controller(Protocol):
    """What the agent uses. ProcessController is real, FakeController in memory."""

    async def recover(self) -> None:
        """After an agent restart: adopt tasks still running, learn how the others ended."""

    async def start(self, cfg: TaskConfig, before_start: BeforeStart | None = None
                    ) -> RuntimeStatus:
        """Launch a task; return its status (RUNNING, or EXITED if it already ended, e.g. command
        not found). Raise StartError if it could not be started at all. ``before_start(pid)``
        runs once the task's namespaces exist (``pid``: its init, as the host sees it) and
        before its command or mounts; if it raises, nothing of the task runs and start raises
        LaunchFailed."""

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        """Send the task's stop signal to its init, SIGKILL after `grace` s; the whole tree (and
        cgroup) dies. Return the final EXITED status. Idempotent. TaskNotFound if unknown."""

    def status(self, task_id: str) -> RuntimeStatus | None: ...

    def task_env(self, task_id: str) -> dict[str, str] | None:
        """The environment a task it knows was started with (an adopted one's too: its
        stored config), None for a task it does not know."""

    def tasks(self) -> dict[str, RuntimeStatus]:
        """Every task known (running or exited, not yet removed)."""

    async def release(self, task_id: str) -> None:
        """An exited task no longer holds its network volumes (unmounted once no other task
        here uses them); its record, directory and logs stay until remove(). Unknown or
        running: no-op."""

    async def remove(self, task_id: str) -> None:
        """Stop (remove_grace) if running, delete its cgroups and directory (its writable layer
        included), forget it. Unknown id: no-op."""

    def set_listener(self, cb: Listener | None) -> None:
        """cb(task_id) is called on the event loop whenever a task this controller watches exits."""

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        """(stdout, stderr) active log files (record format: runtime/logs.py). TaskNotFound."""

    def usage(self, task_id: str) -> TaskUsage | None:
        """Memory (current, peak) and CPU time of a task; None if unknown or no cgroups."""

    def read_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> list[LogLine]:
        """The task's output lines (both streams, time order). TaskNotFound if unknown."""

    def follow_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        """read_logs, then new lines as they come, until the task has ended."""

    def image_config(self, ref: str) -> ImageConfig:
        """The config (Entrypoint, Cmd, Env, WorkingDir, User) of an image on this node, for
        ImageConfig.apply(); ImageUnavailable (a StartError) if it is not here."""

    def anonymous_volumes(self) -> dict[str, dict[str, Any]]:
        """This node's anonymous volumes (shoal.runtime.taskvols): name → {"task": the task
        it was made for, "target", "users": the runtime's tasks that mount it}."""

    async def remove_anonymous_volume(self, name: str) -> bool:
        """Remove an anonymous volume no task uses (VolumeInUse otherwise); False when this
        node has none of that name."""

    async def prune_anonymous_volumes(self) -> list[str]:
        """Remove the anonymous volumes no task uses; their names."""

    async def close(self) -> None:
        """Stop watching. Does NOT stop tasks: they survive the agent."""

