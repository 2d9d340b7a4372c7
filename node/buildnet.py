"""The task network of `image build`'s RUN steps: shoal.runtime.buildnet's ``RunNetwork``
on this node's Mesh.

Owns: attaching a RUN (a runtime task of shoal.runtime.build, ``build…`` id) to the node's
default task network exactly as the worker attaches a task of the default network — a veth
on the task bridge, an address from the node's subnet (node/network.py: masqueraded when
it leaves the cluster network), /etc/resolv.conf naming the node's DNS server (which forwards
other names to the node's resolvers, node/mesh.py ``task_files``) — and releasing it. Must
not touch: the build (the builder decides when), the cluster state, other tasks' addresses.

The Mesh is looked up at each call (``mesh_of``): it exists once the node is in a swarm and
is replaced when it leaves one; without it (or before its network is up) a RUN of network
mode ``default`` fails with a clear message and ``--network none|host`` still builds.

An agent restart cuts its builds short, but not their RUN steps (a task's shim outlives the
agent): ``remove_cut_short`` removes them as the agent starts — no build waits for them any
more — before the Mesh starts, whose ``forget_except`` then releases their addresses (a
silent RUN would otherwise run on, on the task network, holding its address).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.node.errors import NetworkError
from shoal.runtime.controller import Controller
from shoal.runtime.records import BUILD_TASK_PREFIX, FileValue

if TYPE_CHECKING:
    from shoal.node.mesh import Mesh
    from shoal.node.network import NodeNetwork

log = logging.getLogger("shoal.buildnet")


async def remove_cut_short(runtime: Controller, build_tmp: Path | None = None) -> list[str]:
    """Remove the RUN steps of builds an agent restart cut short (call it at the agent's start,
    before the Mesh starts, and before any build), and what those builds had in ``build_tmp``
    (DATA_DIR/build/tmp: their contexts, copies of bind and private cache mounts, layer
    tarballs in progress); the RUN steps' ids."""
    if build_tmp is not None and build_tmp.is_dir():
        def sweep() -> None:
            for entry in os.scandir(build_tmp):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)

        await asyncio.to_thread(sweep)
    gone = []
    for tid in [t for t in runtime.tasks() if t.startswith(BUILD_TASK_PREFIX)]:
        try:
            await runtime.remove(tid)
        except Exception as exc:  # (the next build's sweep tries again: runtime/build.py)
            log.warning("build step %s left by a restart: cannot remove it: %s", tid, exc)
            continue
        gone.append(tid)
    if gone:
        log.info("removed %d build step(s) an agent restart cut short", len(gone))
    return gone


class MeshRunNetwork:
    """``RunNetwork`` on the Mesh that ``mesh_of()`` answers (None: not in a swarm)."""

    def __init__(self, mesh_of: Callable[[], Mesh | None]) -> None:
        self._mesh_of = mesh_of

    def _ready(self) -> tuple[Mesh, NodeNetwork]:
        mesh = self._mesh_of()
        if mesh is None or not mesh.ready or mesh.network is None:
            raise NetworkError("this node has no task network (it is in no swarm, or its "
                               "network is still starting)")
        return mesh, mesh.network

    def files(self) -> Mapping[str, FileValue]:
        mesh, _ = self._ready()
        return mesh.task_files(None)  # (a task without DNS settings of its own)

    async def attach(self, task_id: str, pid: int) -> str:
        _, net = self._ready()
        try:
            addr = await net.attach(task_id, pid)
        except BaseException:  # (a half-made veth, the address taken: both back)
            with contextlib.suppress(Exception):
                await net.detach(task_id)
            raise
        log.info("build step %s attached with address %s", task_id, addr)
        return addr

    async def detach(self, task_id: str) -> None:
        mesh = self._mesh_of()
        if mesh is not None and mesh.network is not None:
            await mesh.network.detach(task_id)
