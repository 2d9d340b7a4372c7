"""A Raft voter whose disk is full must not take a term or vote it could not store.

Three real stores on loopback, each with its Raft directory on a small tmpfs of its own; the
leader's is filled to the last byte. A candidate's vote request at a higher term then reaches
the leader. pysyncobj (the control) set the term in memory and failed to store it: the
exception skipped the step down, and the leader went on leading *in the candidate's term*,
which it never won — two leaders in one term, the fork tests/test_faults_disk.py saw. shoal's
``_SafeSyncObj`` stores first and changes nothing when that fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import fill_filesystem, free_ports, until
from test_raft_append_trim import _on_tick
from test_raft_term_ack import _service

from shoal.raft import store as store_mod
from shoal.raft.store import RaftConfig, RaftStore

CONFIG = RaftConfig(write_timeout=2.0)


@contextlib.contextmanager
def _small_disks(top: Path, n: int) -> Iterator[list[Path]]:
    dirs = [top / f"n{i}" for i in range(n)]
    mounted: list[Path] = []
    try:
        for d in dirs:
            d.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                            str(d)], check=True)
            mounted.append(d)
        yield dirs
    finally:
        for d in mounted:
            subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("handler", ["shoal", "pysyncobj"])
async def test_a_leader_that_cannot_store_a_higher_term_keeps_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        handler: str) -> None:
    if handler == "pysyncobj":  # the control: pysyncobj's own term setter
        monkeypatch.delattr(store_mod._SafeSyncObj, "_SyncObj__setCurrentTerm")
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    with _small_disks(tmp_path, 3) as dirs:
        stores = [RaftStore(a, addrs, d, "secret", config=CONFIG)
                  for a, d in zip(addrs, dirs, strict=True)]
        try:
            await until(lambda: any(s.is_leader() for s in stores) and all(
                s.is_ready() for s in stores), 60.0, "a leader and ready replicas")
            leader = next(s for s in stores if s.is_leader())
            candidate = next(s for s in stores if s is not leader)
            assert "ok" in await leader.propose(_service("before"))
            term = leader.term()
            disk = dirs[stores.index(leader)]
            fill_filesystem(disk / "filler")

            def vote_request(sync: Any) -> OSError | None:
                journal = sync._SyncObj__raftLog
                node = next(n for n in sync._SyncObj__otherNodes
                            if str(n.id) == candidate.self_addr)
                try:
                    sync._SyncObj__transport._onMessageReceived(node, {
                        "type": "request_vote", "term": term + 1,
                        "last_log_index": journal[-1][1], "last_log_term": journal[-1][2]})
                except OSError as exc:
                    return exc
                return None

            failure = _on_tick(leader, vote_request)
            assert isinstance(failure, OSError), failure  # the store did fail: disk full
            term_now, leading, stored = _on_tick(leader, lambda sync: (
                sync._getTerm(), sync._isLeader(),
                sync._SyncObj__raftLog._FileJournal__meta.get("currentTerm")))
            if handler == "pysyncobj":
                # the hazard: leading in a term it never won (the candidate may win it too)
                assert (term_now, leading) == (term + 1, True)
                return
            assert (term_now, stored) == (term, term)
            # a commit while full: the journal's metadata (commit index) cannot be stored;
            # logged once in 10 s, not a traceback each second from pysyncobj's tick thread
            caplog.clear()
            with caplog.at_level(logging.ERROR):
                with contextlib.suppress(Exception):
                    await leader.propose(_service("while-full"), timeout=2.0)
                await asyncio.sleep(3.5)
            ticks = [r for r in caplog.records if "failed _onTick" in r.getMessage()]
            metas = [r for r in caplog.records if "journal's metadata" in r.getMessage()]
            assert ticks == [] and len(metas) <= 1, [r.getMessage() for r in caplog.records]
            (disk / "filler").unlink()  # space again: the cluster goes on, the write is kept
            await until(lambda: any(s.is_leader() for s in stores), 30.0, "a leader")
            writer = next(s for s in stores if s.is_leader())
            with contextlib.suppress(Exception):
                await writer.propose(_service("after"))
            await until(lambda: all({"before", "after"} <= s.snapshot().services.keys()
                                    for s in stores), 30.0, "both writes on every store")
        finally:
            for s in stores:
                s.close()


def test_pysyncobjs_full_disk_tracebacks_come_once_per_ten_seconds() -> None:
    """A follower on a full disk fails every append it is sent, and pysyncobj's tick loop
    logs each as a whole traceback (~3 a second in the fault suite's disk-full fault): one
    per 10 s is kept; any other exception still gets every one."""
    import errno

    from shoal.raft.journal import FullDiskTracebacks

    logger = logging.getLogger("test.pysyncobj.fulldisk")
    quiet = FullDiskTracebacks(every=10.0)
    logger.addFilter(quiet)
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger.addHandler(Keep())
    logger.propagate = False
    for i in range(5):
        for exc in (OSError(errno.ENOSPC, "No space left on device"), ValueError("bug")):
            try:
                raise exc
            except (OSError, ValueError):  # (raised for the record's exc_info)
                logger.exception("failed _onTick %d %s", i, type(exc).__name__)
    assert seen == ["failed _onTick 0 OSError", *(f"failed _onTick {i} ValueError"
                                                  for i in range(5))], seen
