"""pysyncobj weak point: FileJournal's truncation (a log compaction's deleteEntriesTo)
is not atomic. A voter killed inside it lost every entry after the first few it re-adds —
entries it had acknowledged. The kill is real (SIGKILL at a chosen write inside the
truncation, tests/faults/kill_in_truncation.py); the fix (shoal.raft.journal
``_atomic_delete_entries_to``) writes the kept entries to a new file renamed over the
journal."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import until
from test_raft_restart import FAST, _port

from shoal.raft.store import RaftStore

HELPER = Path(__file__).parent / "faults" / "kill_in_truncation.py"

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore::ResourceWarning")]


async def test_a_kill_inside_the_journal_truncation_loses_no_acknowledged_entry(
        tmp_path: Path) -> None:
    data = tmp_path / "raft"
    addr = f"127.0.0.1:{_port()}"
    proc = await asyncio.to_thread(subprocess.run, [sys.executable, str(HELPER), str(data),
                                                    addr], capture_output=True, text=True,
                                   timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "written" in proc.stdout  # all 30 writes were acknowledged before the kill
    store = RaftStore(addr, [addr], data, None, config=FAST)
    try:
        await until(lambda: store.is_leader() and store.is_ready(), 20.0)
        await asyncio.sleep(0.3)
        assert len(store.snapshot().services) == 30
    finally:
        store.close()
