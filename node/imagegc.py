"""The agent's image garbage collector: which images the cluster still wants on this node,
and a periodic pass of ``ImageStore.gc`` (Kubernetes' kubelet image GC policy).

Owns: deciding the images a node must keep beyond those its runtime uses — the image of
every task assigned here that is not terminal, or whose desired state is still running
(a task waiting for its pull or its restart delay) — and running the collection every
``ImageGCConfig.interval`` seconds in a thread. Must not touch: the image store's files
(``ImageStore.gc``/``prune`` remove images, crash-safe), the cluster state (read only).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

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
            try:
                out = await asyncio.to_thread(self.images.gc, self.config, self.wanted())
            except (ImageError, OSError) as exc:
                log.warning("image GC pass failed: %s", exc)
                continue
            if out["deleted"]:
                log.info("image GC removed %d images (%d bytes)", len(out["deleted"]),
                         out["reclaimed"])


__all__ = ["ImageGC", "wanted_images"]
