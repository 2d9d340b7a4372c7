"""pysyncobj's journal file, read and rewritten safely, and its live FileJournal hardened.

Owns: the format of ``raft.journal`` as pysyncobj's FileJournal writes it (``read_journal``,
``rewrite_journal``: a new file fsynced and renamed over the old one), and
``harden_journal``, which replaces four methods on one SyncObj's own journal:

* ``deleteEntriesTo`` (a log compaction's truncation) is atomic
  (``_atomic_delete_entries_to``): pysyncobj's cleared the file in place and re-added the
  kept entries, and a kill -9 inside it lost every acknowledged entry after the first few;
* ``add`` allocates the file's blocks before writing (``_allocating_add``): pysyncobj grew it
  sparse, and the first write into a full disk was a SIGBUS that killed the agent; now it is
  an OSError, and a leader that cannot append hands its leadership over (``_disk_full``);
* ``setRaftCommitIndex`` marks the metadata unsaved only when the index changed, and
  ``onOneSecondTimer`` logs a metadata store failing on a full disk every 10 s instead of a
  traceback every second.

And pysyncobj's own log keeps one traceback of a full disk per 10 s (``FullDiskTracebacks``):
its tick loop logs every append a follower on a full disk fails, ~3 a second.

Must not touch: what the journal should hold (pysyncobj appends and compacts;
shoal.raft.store ``_check_persistence`` decides what a restart keeps), the state machine, the
network. The one step beyond the journal: handing leadership over when it cannot grow.

This reaches into pysyncobj 0.3.x private state (name-mangled ``_FileJournal__*``,
``_ResizableFile__*``). If an attribute is missing (another version), ``harden_journal``
installs only what that version allows and logs a warning: pysyncobj's own behaviour remains.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pysyncobj.pickle as pysyncobj_pickle
from pysyncobj import SyncObj
from pysyncobj.journal import (
    FIRST_RECORD_OFFSET,
    LAST_RECORD_OFFSET_OFFSET,
    FileJournal,
    ResizableFile,
)

log = logging.getLogger("shoal.raft")


def read_journal(path: Path) -> list[tuple[bytes, int, int]]:
    """pysyncobj's FileJournal records, read-only: (command, index, term) in order."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if len(raw) < FIRST_RECORD_OFFSET:
        return []
    end = min(struct.unpack_from("<I", raw, LAST_RECORD_OFFSET_OFFSET)[0], len(raw))
    entries, offset = [], FIRST_RECORD_OFFSET
    while offset + 4 <= end:
        size = struct.unpack_from("<I", raw, offset)[0]
        record = raw[offset + 4:offset + 4 + size]
        if size < 16 or len(record) < size:
            break
        idx, term = struct.unpack_from("<QQ", record)
        entries.append((record[16:], idx, term))
        offset += size + 8
    return entries


def rewrite_journal(path: Path, entries: list[tuple[bytes, int, int]]) -> None:
    """Replace the journal at ``path`` by one holding ``entries``, atomically: written to
    ``raft.journal.repair`` beside it (blocks allocated first), fsynced, renamed over it, the
    directory fsynced. A leftover of a killed rewrite is removed by shoal.raft.store
    ``_check_persistence``."""
    tmp = path.with_name("raft.journal.repair")
    journal = FileJournal(str(tmp))
    try:
        for command, idx, term in entries:
            _allocating_add(journal, journal.add, command, idx, term)
        journal.flush()
    finally:
        journal._destroy()
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class FullDiskTracebacks(logging.Filter):
    """Lets one record carrying a full disk's OSError (ENOSPC) through per ``every`` seconds
    and drops the others; any other record passes. On pysyncobj's logger: its tick loop
    logs a whole traceback for each append a full disk fails (a follower is sent one every
    tick), where ``_disk_full`` already says it once per 10 s."""

    def __init__(self, every: float = 10.0) -> None:
        super().__init__()
        self.every = every
        self._last = -1e9

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


def _quiet_full_disk(logger: logging.Logger) -> None:
    if not any(isinstance(f, FullDiskTracebacks) for f in logger.filters):
        logger.addFilter(FullDiskTracebacks())


def harden_journal(sync: SyncObj) -> None:
    """Install :func:`_atomic_delete_entries_to`, :func:`_allocating_add`,
    :func:`_set_commit_index_if_changed` and :func:`_store_meta_or_log` on this SyncObj's
    journal (only its own, and only if this pysyncobj has the FileJournal internals they
    replace); and :class:`FullDiskTracebacks` on pysyncobj's logger."""
    _quiet_full_disk(logging.getLogger("pysyncobj.syncobj"))
    journal = getattr(sync, "_SyncObj__raftLog", None)
    if not isinstance(journal, FileJournal):
        return
    if isinstance(getattr(journal, "_FileJournal__meta", None), dict):
        journal.setRaftCommitIndex = functools.partial(
            _set_commit_index_if_changed, journal, journal.setRaftCommitIndex)
        journal.onOneSecondTimer = functools.partial(
            _store_meta_or_log, journal, journal.onOneSecondTimer)
    needed = ("_FileJournal__journal", "_FileJournal__journalFile",
              "_FileJournal__currentOffset")
    live: Any = getattr(journal, "_FileJournal__journalFile", None)
    if not all(hasattr(journal, a) for a in needed) or not hasattr(
            live, "_ResizableFile__fileName"):
        log.warning("Raft: unknown pysyncobj FileJournal; log truncation is not crash-safe")
        return
    journal.deleteEntriesTo = functools.partial(
        _atomic_delete_entries_to, journal)
    if not hasattr(live, "_ResizableFile__mm") or not hasattr(live, "_ResizableFile__f"):
        log.warning("Raft: unknown pysyncobj ResizableFile; a full disk may kill the agent")
        return
    try:  # (a journal written before this: its sparse pages get their blocks now)
        os.posix_fallocate(live._ResizableFile__f.fileno(), 0, len(live._ResizableFile__mm))
    except OSError as exc:
        log.warning("Raft: could not allocate the journal's blocks (%s): the disk is full", exc)
    journal.add = functools.partial(_allocating_add, journal, journal.add,
                                    on_full=functools.partial(_disk_full, sync))


def _atomic_delete_entries_to(journal: FileJournal, entry_to: int) -> None:
    """FileJournal.deleteEntriesTo (a log compaction's truncation) made crash-safe.

    pysyncobj's own clears the journal in place and re-adds every kept entry: a kill -9
    inside it leaves a journal with only the first few kept entries, and the restarted
    voter silently lacks every later entry it had acknowledged (a lone voter: committed
    data gone). Here the kept entries go to a new file that is fsynced and renamed over the
    journal: a kill before the rename leaves the old, complete journal (whose interrupted
    truncation shoal.raft.store ``_check_persistence`` finishes), a kill after it the new one."""
    kept = list(journal._FileJournal__journal[entry_to:])
    live = journal._FileJournal__journalFile
    path = Path(live._ResizableFile__fileName)
    rewrite_journal(path, kept)
    live._destroy()  # (the old mapping still pointed at the replaced file)
    journal._FileJournal__journalFile = ResizableFile(
        str(path), defaultContent=journal._FileJournal__getDefaultHeader())
    journal._FileJournal__journal = kept
    journal._FileJournal__currentOffset = struct.unpack_from(
        "<I", journal._FileJournal__journalFile.read(
            LAST_RECORD_OFFSET_OFFSET, 4))[0]


def _allocating_add(journal: FileJournal, add: Callable[[Any, int, int], None],
                    command: Any, idx: int, term: int, *,
                    on_full: Callable[[OSError], None] | None = None) -> None:
    """FileJournal.add with its bytes allocated first (see :func:`_reserve`): on a full disk
    it raises before the entry enters the in-memory log, so memory and file never differ.
    ``on_full(error)`` runs first (the leader hands its leadership over)."""
    record = 8 + 16 + len(pysyncobj_pickle.to_bytes(command))
    try:
        _reserve(journal, journal._FileJournal__currentOffset + record)
    except OSError as exc:
        if on_full is not None:
            on_full(exc)
        raise
    add(command, idx, term)


def _reserve(journal: FileJournal, end: int) -> None:
    """Allocate the journal file's blocks up to byte ``end`` before anything is written there;
    raises OSError (ENOSPC) with nothing changed.

    pysyncobj's ResizableFile grows the file by resizing its memory map: a sparse extension.
    On a full disk the first write into the new pages is a SIGBUS, which kills the whole
    agent (the fault suite's disk-full fault, tests/test_faults_disk.py). Allocated first,
    a full disk is an ordinary error: the append fails, pysyncobj logs it and retries on the
    next tick, and the follower does not acknowledge what it did not store."""
    live = journal._FileJournal__journalFile
    mm = live._ResizableFile__mm
    if end <= len(mm):
        return
    size = max(int(len(mm) * 2), end)
    os.posix_fallocate(live._ResizableFile__f.fileno(), 0, size)
    mm.resize(size)


def _disk_full(sync: SyncObj, exc: OSError) -> None:
    """The journal cannot grow (tick thread). A leader that cannot append would keep
    leading — its heartbeats still reach a majority — while no write commits: it hands
    leadership to the most caught-up follower instead. It cannot win an election again
    before space is freed (storing its term fails, so it never asks for votes)."""
    now = time.monotonic()
    if now - getattr(sync, "_shoal_full_logged", -1e9) >= 10.0:
        sync._shoal_full_logged = now
        log.error("Raft: cannot append to the journal (%s): %s", exc,
                  "handing leadership over" if sync._isLeader() else "not storing entries")
    if sync._isLeader():
        sync.transferLeadership()


def _set_commit_index_if_changed(journal: FileJournal, set_index: Callable[[int], None],
                                 index: int) -> None:
    """FileJournal.setRaftCommitIndex that marks the metadata unsaved only when the index
    changed: a follower sets it on every append-entries, and pysyncobj then rewrote
    ``raft.journal.meta`` (a file write and a rename) every second of an idle cluster."""
    if journal._FileJournal__meta.get("raftCommitIndex") != index:
        set_index(index)


def _store_meta_or_log(journal: FileJournal, store: Callable[[], None]) -> None:
    """FileJournal.onOneSecondTimer (its metadata file: the commit index) with a failure on
    a full disk logged every 10 s instead of a traceback every second; it is retried each
    second until it is stored (pysyncobj keeps the metadata marked unsaved)."""
    try:
        store()
    except OSError as exc:
        now = time.monotonic()
        if now - getattr(journal, "_shoal_meta_logged", -1e9) >= 10.0:
            journal._shoal_meta_logged = now
            log.error("Raft: cannot store the journal's metadata (%s); retrying every second",
                      exc)
