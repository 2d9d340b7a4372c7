"""Test doubles for the runtime: ``FakeController``, an in-memory Controller.

Owns: the fake's in-memory tasks, logs and images (what tests put there).
Must not touch: processes, files, cgroups — it starts nothing. Production code never imports
this module (tests/test_layering.py checks it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from shoal.runtime.cgroups import TaskUsage
from shoal.runtime.controller import BeforeStart, Controller, Listener
from shoal.runtime.errors import ImageUnavailable, LaunchFailed, TaskExists, TaskNotFound
from shoal.runtime.images import ImageConfig
from shoal.runtime.logs import LogLine
from shoal.runtime.records import RunState, RuntimeStatus, TaskConfig, describe_exit


class FakeController:
    """In-memory Controller for unit tests of the reconciler. No processes.

    Behaves like ProcessController: start() validates and returns RUNNING (or EXITED 127 for a
    program listed in ``missing_commands``); stop() ends the task with 143 (or, for a task started
    with a program in ``ignores_term``, 137 "killed (SIGKILL after grace period)"); the listener is
    called via loop.call_soon when a task exits. Tests drive exits with :meth:`exit`, logs with
    ``logs[task_id]``, images with ``image_configs[ref]`` (a task with another image is refused
    with ImageUnavailable, like a node that lacks it).
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        missing_commands: frozenset[str] = frozenset(),
        ignores_term: frozenset[str] = frozenset(),
        log_dir: Path = Path("/nonexistent/shoal-fake"),
    ) -> None:
        self._clock = clock
        self.missing_commands = missing_commands
        self.ignores_term = ignores_term
        self._log_dir = log_dir
        self._configs: dict[str, TaskConfig] = {}
        self._status: dict[str, RuntimeStatus] = {}
        self._listener: Listener | None = None
        self._next_pid = 10_000
        self.start_error: Exception | None = None  # raised (once) by the next start()
        self.closed = False
        self.released: set[str] = set()  # exited tasks told to let go of their volumes
        #: Lines read_logs/follow_logs return, per task (tests append to it).
        self.logs: dict[str, list[LogLine]] = {}
        #: Images this fake node has: reference -> config (tests fill it).
        self.image_configs: dict[str, ImageConfig] = {}
        #: What usage() returns for a running task (tests may replace it).
        self.fake_usage = TaskUsage(memory_bytes=1 << 20, memory_peak_bytes=1 << 20,
                                    cpu_seconds=0.0, pids=2)  # fmt: skip

    def set_listener(self, cb: Listener | None) -> None:
        self._listener = cb

    def status(self, task_id: str) -> RuntimeStatus | None:
        return self._status.get(task_id)

    def tasks(self) -> dict[str, RuntimeStatus]:
        return dict(self._status)

    def task_env(self, task_id: str) -> dict[str, str] | None:
        cfg = self._configs.get(task_id)
        return None if cfg is None else dict(cfg.env)

    def config(self, task_id: str) -> TaskConfig:
        """The TaskConfig a task was started with (test helper)."""
        return self._configs[task_id]

    def logs_path(self, task_id: str) -> tuple[Path, Path]:
        if task_id not in self._status:
            raise TaskNotFound(task_id)
        return self._log_dir / task_id / "stdout.log", self._log_dir / task_id / "stderr.log"

    def usage(self, task_id: str) -> TaskUsage | None:
        return self.fake_usage if task_id in self._status else None

    def image_config(self, ref: str) -> ImageConfig:
        if ref not in self.image_configs:
            raise ImageUnavailable(f"image {ref!r} is not on this node")
        return self.image_configs[ref]

    def read_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> list[LogLine]:
        if task_id not in self._status:
            raise TaskNotFound(task_id)
        lines = [x for x in self.logs.get(task_id, []) if since is None or x.ts >= since]
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        if timestamps:
            lines = [x._replace(line=f"{_rfc3339(x.ts)} {x.line}") for x in lines]
        return lines

    async def follow_logs(
        self,
        task_id: str,
        tail: int | None = None,
        since: float | None = None,
        timestamps: bool = False,
    ) -> AsyncIterator[LogLine]:
        for line in self.read_logs(task_id, tail, since, timestamps):
            yield line

    async def recover(self) -> None:
        return None

    async def start(self, cfg: TaskConfig, before_start: BeforeStart | None = None
                    ) -> RuntimeStatus:
        cfg.validate()
        if self.start_error is not None:
            err, self.start_error = self.start_error, None
            raise err
        if cfg.task_id in self._status:
            raise TaskExists(f"task {cfg.task_id} is already known")
        if cfg.image:
            self.image_config(cfg.image)
        now = self._clock()
        self._configs[cfg.task_id] = cfg
        if cfg.command[0] in self.missing_commands:
            status = RuntimeStatus(
                RunState.EXITED, None, now, 127, now, f"command not found: {cfg.command[0]}"
            )
        else:
            self._next_pid += 1
            status = RuntimeStatus(RunState.RUNNING, self._next_pid, now)
            if before_start is not None:
                try:
                    await before_start(self._next_pid)
                except Exception as exc:
                    del self._configs[cfg.task_id]
                    raise LaunchFailed(f"cannot start task {cfg.task_id}: preparing its "
                                       f"namespaces failed: {exc}") from exc
        self._status[cfg.task_id] = status
        return status

    def exit(self, task_id: str, code: int, *, message: str = "", stopped: bool = False) -> None:
        """Make a running task end with ``code`` (test driver); notifies the listener."""
        status = self._status.get(task_id)
        if status is None:
            raise TaskNotFound(task_id)
        if status.state is RunState.EXITED:
            return
        self._status[task_id] = dataclasses.replace(
            status,
            state=RunState.EXITED,
            pid=None,
            exit_code=code,
            finished_at=self._clock(),
            message=message or describe_exit(code),
            stopped=stopped,
        )
        if self._listener is not None:
            asyncio.get_running_loop().call_soon(self._listener, task_id)

    async def stop(self, task_id: str, grace: float) -> RuntimeStatus:
        status = self._status.get(task_id)
        if status is None:
            raise TaskNotFound(task_id)
        if status.state is RunState.RUNNING:
            if self._configs[task_id].command[0] in self.ignores_term:
                self.exit(task_id, 137, message="killed (SIGKILL after grace period)", stopped=True)
            else:
                self.exit(task_id, 143, stopped=True)
        return self._status[task_id]

    async def release(self, task_id: str) -> None:
        self.released.add(task_id)

    async def remove(self, task_id: str) -> None:
        if task_id in self._status:
            await self.stop(task_id, 0.0)
            del self._status[task_id]
            del self._configs[task_id]

    def anonymous_volumes(self) -> dict[str, dict[str, Any]]:
        return {}

    async def remove_anonymous_volume(self, name: str) -> bool:
        return False

    async def prune_anonymous_volumes(self) -> list[str]:
        return []

    async def close(self) -> None:
        self.closed = True


def _rfc3339(ts: float) -> str:
    whole = int(ts)
    frac = int((ts - whole) * 1e9)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{frac:09d}Z"


def _conforms(fake: FakeController) -> Controller:
    """Never called: makes mypy check that FakeController satisfies the Controller protocol."""
    return fake
