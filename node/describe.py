"""This node's description of itself — architecture, memory, CPUs — kept in its node record.

Owns: reading the description (``own_description``: ``uname -m``, MemTotal, the CPUs the agent
may run on), the pure decision of what to send (``describe_command``) and the loop that sends
it (``Describer``). Swarm's nodes send their Description on every session and the dispatcher
updates the record when it changed; shoal's join carries it once (the ``node_add`` command),
so a node that joined below schema 11 has no architecture, and one whose memory or CPUs
changed keeps the old figures. The Describer sends ``node_describe`` for this node's own
record whenever the record differs from what the node reads — once its state has caught up,
and only while the cluster writes schema 11 or later (an older replica does not know the
command: shoal.raft.schema ``GATED_COMMANDS``), so it also goes out when the leader raises
the schema while the agent runs. A manager proposes it to Raft; a worker's goes through a
manager's dispatcher (``worker_report``: its own id only). A failed send is retried with a
growing delay. Must not touch: other nodes' records, the state machine's rules (it validates
the command again: shoal.raft.validate.validate_description), the runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from shoal.node.context import NodeContext
from shoal.node.errors import ApiError
from shoal.node.upgrade import cluster_schema
from shoal.raft.models import Node
from shoal.raft.schema import GATED_COMMANDS

log = logging.getLogger("shoal.describe")

# How often the description is read again and compared with the record when nothing wakes
# the loop, seconds (memory or CPUs changed under a running agent; a record changed by hand).
REFRESH = 60.0
# The least time between two comparisons while the record cannot be compared yet or a send
# is on its way, seconds: the loop is then woken by every applied command, and a comparison
# takes a snapshot of the state (a busy cluster applies hundreds a second). Once the record
# says what the node reads, it compares again only every REFRESH.
CHECK_GAP = 1.0
# The delay before a failed send is retried, seconds: doubled per failure up to RETRY_MAX.
RETRY_MIN = 1.0
RETRY_MAX = 60.0
# The same description is not sent again within this many seconds of a successful send (a
# worker's feed may not have applied it yet when the loop next compares).
RESEND = 30.0


@dataclass(frozen=True)
class Description:
    arch: str  # as ``uname -m``: x86_64, aarch64 (Docker's Platform.Architecture)
    memory_bytes: int  # MemTotal (0 = unknown)
    cpus: float  # CPUs this agent may run on (its affinity)


def total_memory() -> int:
    """MemTotal of /proc/meminfo in bytes; 0 if it cannot be read."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def own_description() -> Description:
    return Description(arch=os.uname().machine, memory_bytes=total_memory(),
                       cpus=float(len(os.sched_getaffinity(0))))


def describe_command(node_id: str, record: Node | None, schema: int, own: Description
                     ) -> dict[str, Any] | None:
    """The ``node_describe`` command this node sends now, or None: its record is not in the
    state yet (not caught up), the cluster writes a schema that does not know the command,
    or the record already says what ``own`` says."""
    if record is None or schema < GATED_COMMANDS["node_describe"]:
        return None
    if (record.arch, record.memory_bytes, record.cpus) == \
            (own.arch, own.memory_bytes, own.cpus):
        return None
    return {"op": "node_describe", "id": node_id, **asdict(own)}


class Describer:
    """Keeps this node's record in step with its description (see the module)."""

    def __init__(self, ctx: NodeContext, node_id: str, wakeup: asyncio.Event,
                 describe: Callable[[], Description] = own_description) -> None:
        self.ctx = ctx
        self.node_id = node_id
        self.wakeup = wakeup  # set after every applied command (the agent's _wake)
        self.describe = describe
        self.sent = 0  # node_describe commands committed (for tests and logs)

    def pending(self, own: Description) -> tuple[dict[str, Any] | None, bool]:
        """What to send now (``describe_command`` on the current state) or None; and whether
        the state can take it — caught up, this node's record in it, the cluster at schema
        11 or later — after which only this node's own description changes what to send."""
        store = self.ctx.store
        if store is None or not store.is_ready():
            return None, False
        snap = store.snapshot()  # (a copy of the state's maps: not after every commit)
        record, schema = snap.nodes.get(self.node_id), cluster_schema(snap)
        return describe_command(self.node_id, record, schema, own), \
            record is not None and schema >= GATED_COMMANDS["node_describe"]

    async def run(self) -> None:
        own, read_at = self.describe(), time.monotonic()
        retry, failing = RETRY_MIN, False
        last: tuple[dict[str, Any], float] | None = None  # the last sent command, when
        while True:
            if time.monotonic() - read_at >= REFRESH:
                own, read_at = self.describe(), time.monotonic()
            cmd, able = self.pending(own)
            if cmd is None and able:  # in step: look again when the description may change
                await asyncio.sleep(REFRESH)
                continue
            if cmd is not None and last is not None and last[0] == cmd and \
                    time.monotonic() - last[1] < RESEND:
                cmd = None  # (sent a moment ago: this replica has not applied it yet)
            if cmd is not None:
                try:
                    await self.ctx.propose({**cmd, "now": time.time()})
                except Exception as exc:  # (one failure must not end the loop)
                    if not failing:
                        log.warning("could not update this node's description (%s): "
                                    "retrying", exc.message if isinstance(exc, ApiError)
                                    else repr(exc))
                    failing = True
                    await asyncio.sleep(retry)  # (not woken early: every commit would)
                    retry = min(retry * 2, RETRY_MAX)
                    continue
                self.sent += 1
                last = (cmd, time.monotonic())
                log.info("this node's record now says arch %s, %d bytes of memory, %g CPUs",
                         cmd["arch"], cmd["memory_bytes"], cmd["cpus"])
                failing, retry = False, RETRY_MIN
            # not caught up, below schema 11, or a send not applied here yet: the next
            # commits may change that (the schema raised while this agent runs)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REFRESH):
                    await self.wakeup.wait()
            self.wakeup.clear()
            await asyncio.sleep(CHECK_GAP)


__all__ = ["Describer", "Description", "describe_command", "own_description",
           "total_memory"]
