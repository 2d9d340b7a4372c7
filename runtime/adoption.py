"""Adoption after an agent restart: what a previous agent left in each task directory becomes
a TaskRecord again — a running task is watched anew (its shim, or its init if the shim died),
an ended one gets its exit code (from the shim's exit file) or an honest "unknown".

Owns: the reading of ``config.json``, ``runtime.json``, ``pids.json``, ``init.pid`` and
``notes.json`` of existing task directories, and the decision, per task, of what still runs.
Must not touch: task directories' contents (it only reads them), new tasks, signals; it watches
through the callbacks runtime/process.py gives it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.runtime.cgroups import TaskCgroups
from shoal.runtime.procfs import ProcRef
from shoal.runtime.records import RunState, RuntimeStatus, TaskConfig
from shoal.runtime.resources import oom
from shoal.runtime.taskdir import Notes, TaskRecord, exited_status, read_exit

log = logging.getLogger(__name__)

#: watch(task, pidfd, shim): watch that pidfd for the task's exit (the shim's or the init's).
Watch = Callable[[TaskRecord, int, bool], None]


def read_config(taskdir: Path) -> TaskConfig | None:
    """The TaskConfig stored in a task directory; None (logged) if missing or unreadable."""
    try:
        cfg = TaskConfig.from_json((taskdir / "config.json").read_text())
        if cfg.task_id != taskdir.name:
            raise ValueError(f"task_id {cfg.task_id!r} does not match the directory")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("runtime: ignoring %s: unreadable config.json (%s)", taskdir, exc)
        return None
    return cfg


def adopt(
    cfg: TaskConfig,
    taskdir: Path,
    *,
    boot_id: str,
    loop: asyncio.AbstractEventLoop,
    watch: Watch,
    find_init: Callable[[TaskRecord], None],
) -> TaskRecord:
    """The record of a task a previous agent started: RUNNING and watched (``watch``) if its
    shim or init still runs in this boot, EXITED otherwise. ``find_init(task)`` looks up the
    init of a running shim whose recorded init is gone or was never recorded."""
    notes = Notes.load(taskdir / "notes.json")
    done: asyncio.Future[None] = loop.create_future()
    try:
        rt = json.loads((taskdir / "runtime.json").read_text())
        cgroups: TaskCgroups | None = (
            TaskCgroups.from_json(rt["cgroups"]) if rt.get("cgroups") else None
        )
        image_id = str(rt.get("image_id", ""))
        volumes = tuple(str(v) for v in rt.get("volumes", ()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        cgroups, image_id, volumes = None, "", ()
    extra: dict[str, Any] = {"cgroups": cgroups, "image_id": image_id, "volumes": volumes}
    try:
        pids = json.loads((taskdir / "pids.json").read_text())
        started_at = float(pids["started_at"])
        same_boot = pids.get("boot_id") == boot_id
        shim = ProcRef.from_json(pids.get("shim"))
        init = ProcRef.from_json(pids.get("init")) or ProcRef.read(taskdir / "init.pid")
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        # The agent died before recording the shim, so the shim never got its spec.
        started_at = (taskdir / "config.json").stat().st_mtime
        status = exited_status(started_at, None, started_at, notes, "never started: agent died")
        done.set_result(None)
        return TaskRecord(cfg, taskdir, started_at, status, done, None, notes=notes, **extra)
    running = RuntimeStatus(RunState.RUNNING, pid=None, started_at=started_at)
    task = TaskRecord(cfg, taskdir, started_at, running, done, shim, init, notes, **extra)
    shim_fd = shim.open() if shim is not None and same_boot else None
    if shim_fd is not None:  # still running: watch the shim, it records the exit code
        task.init_fd = init.open() if init is not None else None
        if task.init_fd is None:
            task.init = None
            find_init(task)
        elif init is not None:
            task.status = dataclasses.replace(running, pid=init.pid)
        watch(task, shim_fd, True)
        return task
    code, mtime = read_exit(taskdir)
    finished_at = max(mtime, started_at) if mtime is not None else None
    init_fd = init.open() if init is not None and same_boot and code is None else None
    if init is not None and init_fd is not None:  # the shim died, the task runs on
        log.warning("runtime: shim of %s is gone; watching its init", cfg.task_id)
        task.init_fd = init.open()
        task.status = dataclasses.replace(running, pid=init.pid)
        watch(task, init_fd, False)
    else:
        reason = (
            "exit status unknown: the shim died without recording it"
            if same_boot
            else "exit status unknown: the host rebooted"
        )
        task.status = exited_status(started_at, code, finished_at, notes, reason, oom(cgroups))
        done.set_result(None)
    return task
