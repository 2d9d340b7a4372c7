"""The real task runtime for the runtime benchmarks (bench/runtime_start.py, bench/image_build.py),
set up and torn down one way.

Owns: ``controller`` — a ProcessController on a fresh temporary data directory under its own
cgroup parent (``shoal-bench``), and on the way out (also after a failure) every task it still
has removed, the controller closed, that cgroup parent removed and the directory deleted.
Must not touch: cgroups or tasks it did not create, the machine's settings.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from shoal.runtime.cgroups import remove_parent
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RuntimeConfig

CGROUP_PARENT = "shoal-bench"


@asynccontextmanager
async def controller(prefix: str, subdir: str = "") -> AsyncIterator[tuple[ProcessController,
                                                                            Path]]:
    """(controller, its temporary directory); the runtime's data in ``subdir`` of it."""
    data = Path(tempfile.mkdtemp(prefix=prefix))
    ctl = ProcessController(RuntimeConfig(data_dir=data / subdir if subdir else data,
                                          cgroup_parent=CGROUP_PARENT))
    try:
        yield ctl, data
    finally:
        for tid in list(ctl.tasks()):
            await ctl.remove(tid)
        await ctl.close()
        remove_parent(ctl.cgroup_layout, CGROUP_PARENT)  # (this run's own parent group)
        shutil.rmtree(data, ignore_errors=True)
