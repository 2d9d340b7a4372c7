"""Helper process for tests/test_faults_journal.py: a lone Raft voter killed (SIGKILL, by
itself) in the middle of a log compaction's journal truncation.

Owns: only the data directory given as argv[1] (argv[2]: its Raft address, which the
restarted voter must reuse). Writes ``BEFORE`` services, forces a
compaction whose dump is slowed down so that ``AFTER`` more services commit behind it, then
kills itself at the ``KILL_AT``-th journal write made inside ``deleteEntriesTo``. Must not
touch: anything else (loopback Raft port only).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pysyncobj.serializer
from pysyncobj.journal import ResizableFile

from shoal.raft.store import RaftConfig, RaftStore

BEFORE, AFTER, KILL_AT = 20, 10, 6
CFG = RaftConfig(log_compaction_min_entries=10**9, log_compaction_min_time=1e9)


def _create(i: int) -> dict[str, Any]:
    return {"op": "service_create", "id": f"s{i}", "now": 1.0,
            "spec": {"name": f"svc{i}", "command": ["true"]}}


async def main(data: Path, addr: str) -> None:
    store = RaftStore(addr, [addr], data, None, config=CFG)
    while not (store.is_leader() and store.is_ready()):
        await asyncio.sleep(0.02)
    for i in range(BEFORE):
        await store.propose(_create(i))

    dump = pysyncobj.serializer.pickle.dump

    def slow_dump(*args: Any, **kwargs: Any) -> Any:  # runs in the compaction's forked child
        time.sleep(1.0)
        return dump(*args, **kwargs)

    pysyncobj.serializer.pickle.dump = slow_dump  # type: ignore[attr-defined]
    writes = {"inside": False, "n": 0}
    write = ResizableFile.write

    def counting_write(self: Any, offset: int, values: bytes) -> None:
        if writes["inside"]:
            writes["n"] += 1
            if writes["n"] == KILL_AT:
                os.kill(os.getpid(), signal.SIGKILL)
        write(self, offset, values)

    ResizableFile.write = counting_write  # type: ignore[method-assign]
    journal = store._sync._SyncObj__raftLog  # type: ignore[attr-defined]
    truncate = journal.deleteEntriesTo

    def marked(entry_to: int) -> None:
        writes["inside"] = True
        truncate(entry_to)

    journal.deleteEntriesTo = marked
    store._sync.forceLogCompaction()
    for i in range(BEFORE, BEFORE + AFTER):  # commit behind the dump being written
        await store.propose(_create(i))
    print("written", flush=True)
    await asyncio.sleep(30)  # the truncation kills this process
    print("not killed", flush=True)


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
