"""The agent's image garbage collector: which images the cluster still wants on this node,
and a periodic pass of ``ImageStore.gc`` (Kubernetes' kubelet image GC policy).

Owns: deciding the images a node must keep beyond those its runtime uses — the image of
every task assigned here that is not terminal, or whose desired state is still running
(a task waiting for its pull or its restart delay) — and running the collection every
``ImageGCConfig.interval`` seconds in a thread, then the build cache's bound
(``build_cache_keep``: shoal.runtime.buildcache's prune, BuildKit's GC). Must not touch:
the image store's files (``ImageStore.gc``/``prune`` remove images, crash-safe), the build
cache's (buildcache's prune removes them), the cluster state (read only).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from shoal.raft.models import TaskState
from shoal.raft.state import Snapshot
from shoal.runtime.errors import ImageError
from shoal.runtime.images import ImageGCConfig, ImageStore

log = logging.getLogger("shoal.imagegc")


def wanted_images(images: ImageStore, snapshot: Snapshot | None, node_id: str) -> set[str]:
    """Ids of the images the tasks assigned to ``node_id`` need: not terminal, or desired
    running (an image this node lacks yet is not in the set: nothing to keep)."""
    out: set[str] = set()
    if snapshot is None or not node_id:
        return out
    for t in snapshot.tasks.values():
        if t.node_id != node_id or not t.spec.container.image:
            continue
        if t.status.state.terminal and t.desired_state > TaskState.RUNNING:
            continue
        try:
            out.add(images.inspect(t.spec.container.image).id)
        except ImageError:
            continue
    return out


class ImageGC:
    def __init__(self, images: ImageStore, config: ImageGCConfig,
                 wanted: Callable[[], set[str]]) -> None:
        self.images = images
        self.config = config
        self.wanted = wanted

    async def run(self) -> None:
        if self.config.interval <= 0:
            return
        while True:
            await asyncio.sleep(self.config.interval)
            await self.pass_once()

    async def pass_once(self) -> None:
        """One pass: ``ImageStore.gc``, then the build cache's bound (failures logged)."""
        try:
            out = await asyncio.to_thread(self.images.gc, self.config, self.wanted())
        except (ImageError, OSError) as exc:
            log.warning("image GC pass failed: %s", exc)
            return
        if out["deleted"]:
            log.info("image GC removed %d images (%d bytes)", len(out["deleted"]),
                     out["reclaimed"])
        try:
            await self.build_cache_pass()
        except (ImageError, OSError) as exc:
            log.warning("build cache GC pass failed: %s", exc)

    async def build_cache_pass(self) -> tuple[list[str], int]:
        """Bound the build cache (``build_cache_keep``): when it weighs more, what no build
        uses and was not used for ``min_age`` goes, least recently used first — dangling
        records, then the others (``builder prune [-a] --keep-storage``). (The removed
        record ids, the bytes freed.) Nothing, and nothing imported, on a node that never
        built."""
        build_dir = self.images.root.parent / "build"
        keep = build_cache_bound(self.config.build_cache_keep, build_dir)
        if keep <= 0 or not build_dir.is_dir():
            return [], 0
        from shoal.runtime import buildcache  # (image build's: an idle agent never loads it)

        filters = buildcache.Filters(until=time.time() - self.config.min_age)
        deleted: list[str] = []
        freed = 0
        for every in (False, True):
            res = await buildcache.prune(self.images, build_dir, every, filters, keep,
                                         self.wanted())
            deleted, freed = deleted + res.deleted, freed + res.reclaimed
        if deleted:
            log.info("build cache GC removed %d records (%d bytes)", len(deleted), freed)
        return deleted, freed


def build_cache_bound(keep: int, build_dir: Path) -> int:
    """``ImageGCConfig.build_cache_keep`` in bytes: -1 is 10 % of the filesystem holding
    ``build_dir`` (its nearest existing parent's) rounded up to a whole GB, as BuildKit's
    default (2 GB when that cannot be read)."""
    if keep >= 0:
        return keep
    path = build_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        st = os.statvfs(path)
    except OSError:
        return 2 * 10**9
    return (st.f_blocks * st.f_frsize // 10 // 10**9 + 1) * 10**9


__all__ = ["ImageGC", "build_cache_bound", "wanted_images"]
