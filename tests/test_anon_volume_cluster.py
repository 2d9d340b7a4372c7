"""Anonymous volumes as a Docker Swarm user drives them, through the CLI on a real agent (a
one-host netns lab): `--mount type=volume,dst=/data` gives each task its own volume, `volume
ls` shows it by the name the node gave it, `volume rm` is refused while its task holds it, a
forced update replaces the task with a fresh volume, `service rm` removes them all from the
node's disk, and `volume prune` one an agent left behind."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from netlab import Host, Lab
from shoal.runtime.taskvols import anon_name

pytestmark = pytest.mark.netns


def _running(h: Host, service: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        tasks = [t for t in h.cli_json("service", "ps", service)
                 if t["desired_state"] == "running"]
        if tasks and all(t["state"] == "running" for t in tasks):
            return tasks
        assert time.monotonic() < deadline, tasks
        time.sleep(0.1)


def _anon_dirs(h: Host) -> set[str]:
    return {p.name for p in (h.data_dir / "volumes").iterdir() if len(p.name) == 64}


def test_a_services_anonymous_volume_lives_and_goes_with_its_task(
        lab_factory: Callable[..., Lab]) -> None:
    lab = lab_factory(1)
    lab.form_cluster(managers=1)
    (h1,) = lab.hosts
    h1.cli("service", "create", "--name", "db", "--mount", "type=volume,dst=/data",
           "--read-only", "--", "sh", "-c", "echo kept > /data/f && exec sleep 1000")
    (task,) = _running(h1, "db")
    name = anon_name(task["id"], "/data")
    deadline = time.monotonic() + 10
    while not (h1.data_dir / "volumes" / name / "f").exists():
        assert time.monotonic() < deadline, _anon_dirs(h1)
        time.sleep(0.05)
    (view,) = [v for v in h1.cli_json("volume", "ls") if v["name"] == name]
    assert view["anonymous"] and view["services"] == ["db"] and view["tasks"] == [task["id"]]
    rm = h1.cli("volume", "rm", name, check=False)
    assert rm.returncode == 1 and "in use" in rm.stderr and "Traceback" not in rm.stderr
    # a replacement (forced update) gets a fresh volume; the old task's goes with its
    # container once the history is trimmed (`service rm` here)
    h1.cli("service", "update", "--force", "db")
    deadline = time.monotonic() + 30
    while True:
        (new,) = _running(h1, "db")
        if new["id"] != task["id"]:
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert anon_name(new["id"], "/data") in _anon_dirs(h1)
    h1.cli("service", "rm", "db")
    deadline = time.monotonic() + 30
    while _anon_dirs(h1) or list((h1.data_dir / "anonymous").iterdir()):
        assert time.monotonic() < deadline, _anon_dirs(h1)  # (directory, then the record)
        time.sleep(0.1)
    assert not [v for v in h1.cli_json("volume", "ls") if v.get("anonymous")]
    # one an agent left behind (it died between making and removing it): `volume prune`
    orphan = anon_name("gone", "/x")
    (h1.data_dir / "volumes" / orphan).mkdir()
    (h1.data_dir / "anonymous" / orphan).write_text('{"task": "gone", "target": "/x"}')
    (view,) = [v for v in h1.cli_json("volume", "ls") if v.get("anonymous")]
    assert view["name"] == orphan and view["tasks"] == []
    assert orphan in h1.cli("volume", "prune", "-f").stdout
    assert _anon_dirs(h1) == set() and not list((h1.data_dir / "anonymous").iterdir())
