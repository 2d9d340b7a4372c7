"""shoal.runtime.cgroups without a kernel: layout detection from mountinfo texts (v2, hybrid,
v1, none) and what a task's groups write on each layout (pure v2 cannot be exercised for real on
the hybrid development machine, so its file writes are checked here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal.runtime import cgroups as cg_mod
from shoal.runtime.cgroups import CgroupLayout, Limits, TaskCgroups, parse_mountinfo
from shoal.runtime.errors import CgroupError

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
V2 = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
V1 = "\n".join(HYBRID.splitlines()[:5]) + "\n"
NONE = "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"


def test_layouts_are_detected_from_mountinfo() -> None:
    hybrid = parse_mountinfo(HYBRID, read_controllers=False)
    assert (hybrid.mode, hybrid.unified, hybrid.limits_version) == (
        "hybrid", Path("/sys/fs/cgroup/unified"), "v1")
    assert hybrid.v1["cpu"] == hybrid.v1["cpuacct"] == Path("/sys/fs/cgroup/cpu,cpuacct")
    assert parse_mountinfo(V1, read_controllers=False).mode == "v1"
    assert parse_mountinfo(NONE, read_controllers=False).mode == "none"
    bare = parse_mountinfo(V2, read_controllers=False)  # no controllers known: no limits
    assert (bare.mode, bare.limits_version, bare.can_limit("memory")) == ("v2", "", False)
    assert cg_mod._unescape("/a\\040b") == "/a b"


def _fake_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[CgroupLayout, dict]:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.subtree_control").write_text("")
    writes: dict[str, str] = {}

    def fake_write(path: Path, value: str) -> None:
        writes[str(path.relative_to(root))] = value
        if path.name == "cgroup.subtree_control":
            path.write_text(" ".join(w[1:] for w in value.split()))

    monkeypatch.setattr(cg_mod, "_write", fake_write)
    layout = CgroupLayout("v2", root, {}, frozenset({"memory", "cpu", "pids", "io"}))
    return layout, writes


def test_v2_limits_go_to_the_unified_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout, writes = _fake_v2(tmp_path, monkeypatch)
    (tmp_path / "cg" / "shoal").mkdir()
    (tmp_path / "cg" / "shoal" / "cgroup.subtree_control").write_text("")
    group = TaskCgroups.create(layout, "shoal", "t1", Limits(64 << 20, 0.5, 100))
    assert group.limits_version == "v2" and set(group.dirs) == {"unified"}
    assert writes["cgroup.subtree_control"] == "+memory +cpu +pids +io"  # (io: io.stat)
    assert writes["shoal/t1/memory.max"] == str(64 << 20)
    assert writes["shoal/t1/cpu.max"] == "50000 100000"
    assert writes["shoal/t1/pids.max"] == "100"
    assert group.procs_files() == [str(tmp_path / "cg" / "shoal" / "t1" / "cgroup.procs")]
    (tmp_path / "cg" / "shoal" / "t1" / "memory.events").write_text("low 0\noom_kill 2\n")
    assert group.oom_kills() == 2
    # BLOCK I/O from io.stat when the io controller is on (else the processes' /proc/PID/io)
    (tmp_path / "cg" / "shoal" / "t1" / "io.stat").write_text("8:0 rbytes=5 wbytes=7 rios=1\n")
    used = group.usage()
    assert (used.block_read_bytes, used.block_write_bytes) == (5, 7)
    (tmp_path / "cg" / "shoal" / "t1" / "io.stat").unlink()
    (tmp_path / "cg" / "shoal" / "t1" / "memory.events").unlink()  # a real cgroup dir is "empty"
    assert group.remove_now() == [] and not (tmp_path / "cg" / "shoal" / "t1").exists()


def test_a_limit_the_host_cannot_enforce_is_refused() -> None:
    layout = CgroupLayout("v2", Path("/nonexistent"), {}, frozenset())
    with pytest.raises(CgroupError, match="memory"):
        TaskCgroups.create(layout, "shoal", "t1", Limits(memory_bytes=64 << 20))
