"""The volumes of this node's tasks: network volumes mounted while tasks use them, anonymous
volumes made for a task and removed with it, and the filling of an empty volume from the
task's image (Docker's copy on first use).

Owns: ``RuntimeConfig.anon_dir`` (one record per anonymous volume), the anonymous volumes'
directories in ``volumes_dir`` (named by ``anon_name``), the node's network volume mounts
(who uses each, the fds sshfs needs, one lock per volume), on behalf of
runtime/process.py. Must not touch: task processes, task directories, cluster state; what
a named volume holds beyond filling it when empty.

Anonymous volumes (a ``--mount type=volume,dst=/data`` without a source, an image's
``VOLUME``): Docker names them with 64 random hex digits; here the name is the SHA-256 of the
owning task's id and the target (``anon_name``), 64 hex digits too, so every node and manager
computes the same name for a task's spec mount (``volume ls`` shows them by it), and no named
volume can take it (a volume's name is at most 63 characters: shoal.raft.spec.NAME_RE). A
record ``ANON_DIR/NAME`` (JSON: the task, the target) is written *before* the directory is
made and removed *after* it is, so a directory never exists without its record; a record no
task of this runtime uses (the agent died between the two steps, or before it removed the
task) is swept when the agent recovers its tasks, and by ``volume prune``/``volume rm``.
The volume is removed when the last task mounting it is removed (a pod's sidecars share its
main container's volumes, named by the task's id); an exited task keeps it until then (its
data is there to look at, as a stopped container's).

Filling (``prepare``): a volume mount not marked ``nocopy`` whose directory is empty gets the
image's content at its target (runtime/volcopy.py) — anonymous and named local volumes
alike, as Docker; not the default image's (the host's own directories are no image), and not
a network volume (sshfs, NFS: a copy over the network at every start of an empty share, and
ownership a server may refuse; Docker copies into those too — a documented difference). The
copy goes into a scratch directory ``VOLUMES/.fill/*`` (the agent's own, 0700: a task sharing
a named volume cannot reach it; on the volumes' filesystem, which an operator may give its
own disk, as a rename needs) whose entries are then renamed into the volume, so a fill
that fails half-way leaves the volume empty; a scratch directory an agent left is swept.
(``.fill`` is no volume name: names start with a letter or digit.)
Fills and removals of anonymous volumes (and of scratch directories) run on their own
threads (``FILL_THREADS``), never the loop's default executor: an image directory of a
million files takes minutes to copy or delete, and the agent's other blocking calls (keys,
the mesh's iptables, image transfers...) must not queue behind it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from shoal.runtime import volcopy, volumes
from shoal.runtime.errors import LaunchFailed, VolumeInUse
from shoal.runtime.records import TaskConfig
from shoal.runtime.taskdir import atomic_write, safe_rmtree

log = logging.getLogger(__name__)

ANON_NAME_RE = re.compile(r"^[0-9a-f]{64}$")
FILL_THREADS = 2  # fills and removals of volume content at once (the rest wait their turn)
_fills = concurrent.futures.ThreadPoolExecutor(FILL_THREADS, thread_name_prefix="volume-fill")


async def _on_fill_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the fill threads (see the module docstring)."""
    return await asyncio.get_running_loop().run_in_executor(
        _fills, functools.partial(fn, *args))


def anon_name(task_id: str, target: str) -> str:
    """The name of the anonymous volume task ``task_id`` has at ``target``: 64 hex digits."""
    return hashlib.sha256(f"{task_id}\0{target}".encode()).hexdigest()


class TaskVolumes:
    """The volumes of this runtime's tasks (see the module docstring). Called from the
    runtime's event loop only; the copies and removals run in threads."""

    def __init__(self, volumes_dir: Path, anon_dir: Path,
                 in_use: Callable[[str], bool]) -> None:
        self._dir = volumes_dir
        self._anon_dir = anon_dir
        self._in_use = in_use  # whether a known, unreleased task mounts a (network) volume
        # network volumes mounted here: name -> ids of the tasks starting with or using it
        self._net_users: dict[str, set[str]] = {}
        self._fds: dict[str, tuple[int, ...]] = {}  # name -> kept open while mounted
        self._locks: dict[str, asyncio.Lock] = {}  # name -> held while (un)mounting, filling
        # anonymous volumes: name -> ids of the runtime's tasks that mount it
        self._anon: dict[str, set[str]] = {}
        anon_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._scratch = volumes_dir / _SCRATCH  # (see the module docstring)
        self._scratch.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- network volumes

    async def mount(self, cfg: TaskConfig) -> None:
        """Mount the task's network volumes (shoal.runtime.volumes) at VOLUMES/NAME unless
        mounted already; the task counts as a user from here on. Two tasks starting at once
        mount a volume once."""
        for m in cfg.mounts:
            opts = dict(m.driver_opts)
            if m.type != "volume" or not volumes.is_network(m.driver, opts):
                continue
            async with self._lock(m.source):
                self._net_users.setdefault(m.source, set()).add(cfg.task_id)
                path = self._dir / m.source
                if not os.path.ismount(path):
                    fds = await asyncio.to_thread(volumes.mount, path, m.driver, opts,
                                                  cfg.files)
                    if fds:
                        self._fds[m.source] = fds

    async def release(self, task_id: str, names: Iterable[str] = ()) -> None:
        """The task no longer uses its volumes: unmount each network volume no other task
        here uses (an adopted task counts through its record: ``in_use``)."""
        for name in set(names) | {n for n, u in self._net_users.items() if task_id in u}:
            async with self._lock(name):
                users = self._net_users.get(name, set())
                users.discard(task_id)
                if users or self._in_use(name):
                    continue
                self._net_users.pop(name, None)
                try:
                    await asyncio.to_thread(volumes.unmount, self._dir / name,
                                            self._fds.pop(name, ()))
                except volumes.VolumeMountFailed as exc:
                    log.warning("runtime: volume %s: %s", name, exc)

    # -- every volume a task starts with

    async def prepare(self, cfg: TaskConfig, layers: list[Path] | None) -> None:
        """Make the task's volume directories (an anonymous one recorded first), and fill
        each empty one from the image at its target unless ``nocopy`` (``layers``: the
        task's image, top first; None: the default image, never copied from). LaunchFailed
        naming the mount when that fails; the anonymous volumes stay the task's (``drop``)."""
        for m in cfg.mounts:
            if m.type != "volume":
                continue
            if m.anonymous:
                self._anon.setdefault(m.source, set()).add(cfg.task_id)
                record = self._anon_dir / m.source
                if not record.exists():
                    atomic_write(record, json.dumps({"task": cfg.task_id, "target": m.target}),
                                 0o600)
            elif volumes.is_network(m.driver, dict(m.driver_opts)):
                continue  # (mounted by ``mount``; never filled: see the module docstring)
            path = self._dir / m.source
            async with self._lock(m.source):
                stop = threading.Event()  # (the thread outlives a cancel: told to stop)
                try:
                    await _on_fill_thread(_make_and_fill, path, layers, m.target,
                                          not m.nocopy, self._scratch, stop)
                except asyncio.CancelledError:
                    stop.set()
                    raise
                except (OSError, RecursionError) as exc:
                    raise LaunchFailed(f"mounts: volume {m.source} at {m.target}: cannot "
                                       f"make it or fill it from the image: {exc}") from exc

    # -- anonymous volumes

    def adopt(self, cfg: TaskConfig) -> None:
        """A task found again after an agent restart: its anonymous volumes are in use."""
        for m in cfg.mounts:
            if m.type == "volume" and m.anonymous:
                self._anon.setdefault(m.source, set()).add(cfg.task_id)

    async def drop(self, task_id: str) -> None:
        """The task is gone (removed, or its start failed): remove each anonymous volume no
        other task of this runtime mounts."""
        for name, users in list(self._anon.items()):
            if task_id in users:
                users.discard(task_id)
                if not users:
                    await self._remove_anon(name)

    async def sweep(self) -> list[str]:
        """Remove every recorded anonymous volume no task of this runtime mounts (left by an
        agent that died before it removed them), and fills an agent left unfinished; the
        names removed."""
        for scratch in list(self._scratch.iterdir()):
            if not any(lock.locked() for lock in self._locks.values()):
                await _on_fill_thread(safe_rmtree, scratch)
        gone = [name for name in self.anonymous() if not self._anon.get(name)]
        for name in gone:
            await self._remove_anon(name)
        return gone

    async def _remove_anon(self, name: str) -> None:
        async with self._lock(name):
            if self._anon.get(name):  # (a task started with it meanwhile)
                return
            self._anon.pop(name, None)
            await _on_fill_thread(safe_rmtree, self._dir / name)
            with contextlib.suppress(FileNotFoundError):
                (self._anon_dir / name).unlink()  # (after the directory: see the docstring)
        self._locks.pop(name, None)

    def anonymous(self) -> dict[str, dict[str, Any]]:
        """This node's anonymous volumes: name → {"task": the task it was made for,
        "target", "users": ids of the runtime's tasks that mount it}."""
        out: dict[str, dict[str, Any]] = {}
        try:
            names = sorted(os.listdir(self._anon_dir))
        except OSError:
            return out
        for name in names:
            if not ANON_NAME_RE.match(name):
                continue  # (an atomic write's temporary file)
            try:
                raw = json.loads((self._anon_dir / name).read_text())
            except (OSError, ValueError):
                raw = {}
            out[name] = {"task": str(raw.get("task", "")), "target": str(raw.get("target", "")),
                         "users": sorted(self._anon.get(name, ()))}
        return out

    async def remove_anonymous(self, name: str) -> bool:
        """``volume rm`` of an anonymous volume: VolumeInUse while a task of this runtime
        mounts it (an exited one kept in the task history too, as Docker refuses a stopped
        container's); False when this node has no such volume."""
        if not ANON_NAME_RE.match(name) or not (self._anon_dir / name).exists():
            return False  # (never a path: a name comes from a request)
        users = sorted(self._anon.get(name, ()))
        if users:
            raise VolumeInUse(f"volume {name} is used by task(s) {', '.join(users)}")
        await self._remove_anon(name)
        return True


_SCRATCH = ".fill"  # VOLUMES/.fill/: the fills in progress (the volumes' filesystem)


def _make_and_fill(path: Path, layers: list[Path] | None, target: str, copy: bool,
                   scratch_dir: Path, stop: threading.Event | None = None) -> None:
    """The volume's directory (made if missing), filled from the image when empty: copied
    into a scratch directory first and its entries then renamed into the volume, so a fill
    that fails half-way (a full disk) leaves the volume empty, never half-filled."""
    path.mkdir(mode=0o755, exist_ok=True)
    if not copy or layers is None or not volcopy.is_empty(path):
        return
    scratch = Path(tempfile.mkdtemp(dir=scratch_dir))
    try:
        if not volcopy.copy_image_path(layers, target, scratch, stop):
            return
        st = os.stat(scratch)
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        src, dst = os.open(scratch, flags), os.open(path, flags)
        try:
            if not volcopy.is_empty(path) or (stop is not None and stop.is_set()):
                return  # (a task sharing it wrote there meanwhile; the start was cancelled)
            for name in os.listdir(src):
                os.rename(name, name, src_dir_fd=src, dst_dir_fd=dst)
            os.fchown(dst, st.st_uid, st.st_gid)
            os.fchmod(dst, stat.S_IMODE(st.st_mode))
            os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(src)
            os.close(dst)
    finally:
        safe_rmtree(scratch)


__all__ = ["ANON_NAME_RE", "TaskVolumes", "anon_name"]
