"""The controller's pass-throughs to what a task uses besides its processes: cgroups (usage,
OOM evidence, removal), named volumes and images, with their errors translated for callers.

Owns: nothing of its own — each function acts on a store owned elsewhere (runtime/cgroups.py
for cgroups, runtime/images.py for images, ``RuntimeConfig.volumes_dir`` for volumes) on behalf
of runtime/process.py.
Must not touch: task processes or task directories (runtime/process.py, runtime/taskdir.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from shoal.runtime.cgroups import TaskCgroups, TaskUsage
from shoal.runtime.errors import (
    CgroupError,
    ImageNotFound,
    ImageUnavailable,
    InvalidTaskConfig,
    VolumeInUse,
)
from shoal.runtime.images import ImageConfig, ImageStore
from shoal.runtime.rootfs import valid_volume_name
from shoal.runtime.taskdir import safe_rmtree

log = logging.getLogger(__name__)


def usage(cgroups: TaskCgroups | None) -> TaskUsage | None:
    """Memory (current, peak) and CPU time of a task's cgroups; None without cgroups."""
    if cgroups is None or not cgroups.dirs:
        return None
    return cgroups.usage()


def oom(cgroups: TaskCgroups | None) -> bool:
    """Whether the OOM killer killed a process of the task (cgroup evidence)."""
    return cgroups is not None and bool(cgroups.dirs) and cgroups.oom_kills() > 0


async def remove_cgroups(cgroups: TaskCgroups, kill_timeout: float) -> list[Path]:
    """Kill what is left in the groups and rmdir them (a group is busy for a moment after
    its last process died); return those still there after ``kill_timeout`` or an error."""
    deadline = time.monotonic() + kill_timeout
    try:
        while left := remove_cgroups_now(cgroups):
            if time.monotonic() > deadline:
                log.warning("runtime: cgroups still busy, kept for a later try: %s", left)
                return left
            await asyncio.sleep(0.01)
    except CgroupError as exc:
        log.warning("runtime: %s", exc)
        return list(cgroups.dirs.values())
    return []


def remove_cgroups_now(cgroups: TaskCgroups) -> list[Path]:
    """One try: rmdir the groups, kill what is in those still busy, return those. Raises
    CgroupError when a group cannot be removed for another reason than being busy."""
    left = cgroups.remove_now()
    if left:
        cgroups.kill()
    return left


def image_config(images: ImageStore, ref: str) -> ImageConfig:
    """The config of an image in the store; ImageUnavailable (a StartError) if not here."""
    try:
        return images.inspect(ref).config
    except ImageNotFound as exc:
        raise ImageUnavailable(f"image {ref!r} is not on this node") from exc


def list_volumes(volumes_dir: Path) -> list[str]:
    """Named volumes on this node."""
    try:
        return sorted(p.name for p in volumes_dir.iterdir()
                      if p.is_dir() and valid_volume_name(p.name))  # (not .fill: taskvols)
    except OSError:
        return []


def remove_volume(volumes_dir: Path, name: str, users: Iterable[str]) -> None:
    """Delete a named volume and its data. VolumeInUse if ``users`` (ids of the known tasks
    that mount it) is not empty."""
    if not valid_volume_name(name):
        raise InvalidTaskConfig("mounts", f"not a volume name: {name!r}")
    using = sorted(users)
    if using:
        raise VolumeInUse(f"volume {name} is used by task(s) {', '.join(using)}")
    safe_rmtree(volumes_dir / name)
