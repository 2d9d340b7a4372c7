"""`make demo` runs to the end with the real agent and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import netlab

pytestmark = pytest.mark.netns

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_to_the_end_and_leaves_nothing() -> None:
    res = subprocess.run([sys.executable, str(ROOT / "demo" / "demo.py")], cwd=ROOT,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    for step in ("shoal init", "Joining h2 and h3", "Scaling web to 5",
                 "5/5 tasks untouched", "update completed; 0 of the old tasks left", "SIGKILL",
                 "new leader:", "5/5 tasks running again", "nothing left behind"):
        assert step in out, f"demo output lacks {step!r}:\n{out[-3000:]}"
    m = re.search(r"netns (shoal-lab-[0-9a-f]+)-h1", out)
    assert m, out[:2000]
    prefix = m.group(1)  # other labs may run concurrently: check the demo's own run id
    assert not [ns for ns in netlab.list_netns() if ns.startswith(prefix)]
    assert not Path(f"/tmp/shoal-lab/{prefix}").exists()
    procs = subprocess.run(["pgrep", "-af", prefix], capture_output=True, text=True)
    assert not [line for line in procs.stdout.splitlines() if "pgrep" not in line]
