"""Anonymous volumes as pure code: the spec's volume mount without a source and nocopy (errors
naming the field), the schema-13 gate (refused naming the field while an older node is in,
on propose and by the state machine; nocopy left out of what older nodes read), Docker's
--mount and Compose forms, `stack config`, the names the worker, the manager's `volume ls`
and the node agree on, an image's VOLUME paths, and the merged image view the volumes are
filled from (whiteouts, opaque directories, symlinks resolved inside the image)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from gates import assert_waits_for, cluster_at, old_release_results, written_below

from shoal.cli import flagvalues
from shoal.cli.errors import CliError
from shoal.raft.errors import ValidationError
from shoal.raft.models import to_dict
from shoal.raft.schema import ANON_VOLUMES, SCHEMA
from shoal.raft.validate import validate_spec
from shoal.runtime.imageconfig import ImageConfig
from shoal.runtime.rootfs import MountSpec
from shoal.runtime.taskvols import ANON_NAME_RE, anon_name
from shoal.runtime.volcopy import copy_image_path, resolve


def _spec(*mounts: dict[str, Any]) -> dict[str, Any]:
    return {"name": "db", "task": {"container": {"command": ["sh"], "mounts": list(mounts)}}}


ANON = {"type": "volume", "target": "/data"}


def test_a_volume_mount_without_a_source_is_an_anonymous_volume_and_bad_ones_name_the_field(
        ) -> None:
    m = validate_spec(_spec(ANON, {"type": "volume", "source": "cache", "target": "/c",
                                   "nocopy": True})).task.container.mounts
    assert (m[0].source, m[0].nocopy, m[1].nocopy) == ("", False, True)
    for mount, field in (({**ANON, "nocopy": True, "type": "tmpfs"}, "nocopy"),
                         ({**ANON, "volume_driver": "sshfs"}, "volume_driver"),
                         ({**ANON, "source": "Bad Name"}, "source")):
        with pytest.raises(ValidationError) as exc:
            validate_spec(_spec(mount))
        assert exc.value.field == f"task.container.mounts[0].{field}", mount


@pytest.mark.parametrize(("mount", "field"), [
    (ANON, "task.container.mounts"),
    ({"type": "volume", "source": "d", "target": "/d", "nocopy": True},
     "task.container.mounts[0].nocopy")])
def test_anonymous_volumes_and_nocopy_wait_for_schema_13(mount: dict[str, Any],
                                                         field: str) -> None:
    """A schema-12 node refuses a volume mount without a source and does not know nocopy:
    while one is in, both are refused naming the field, on propose and by the state
    machine (a service update too); once every node reads 13 they go."""
    assert SCHEMA >= ANON_VOLUMES == 13
    assert_waits_for(13, to_dict(validate_spec(_spec(mount))), to_dict(validate_spec(
        _spec({"type": "volume", "source": "d", "target": "/d"}))), field)


def test_below_13_a_mount_is_written_without_nocopy_as_schema_12_writes_it() -> None:
    full = to_dict(validate_spec(_spec({"type": "volume", "source": "d", "target": "/d"})))
    assert full["task"]["container"]["mounts"][0]["nocopy"] is False
    sent, stored = written_below(13, full)
    assert "nocopy" not in sent["task"]["container"]["mounts"][0]
    assert "nocopy" in full["task"]["container"]["mounts"][0]  # (not mutated)
    assert "nocopy" not in stored["task"]["container"]["mounts"][0]


def test_mount_flag_takes_dockers_anonymous_volume_and_volume_nocopy() -> None:
    assert flagvalues.parse_mount("type=volume,dst=/data") == {"type": "volume",
                                                              "target": "/data"}
    assert flagvalues.parse_mount("dst=/data,volume-nocopy")["nocopy"] is True
    assert flagvalues.parse_mount("src=v,dst=/d,volume-nocopy=false")["nocopy"] is False
    with pytest.raises(CliError, match="volume-nocopy is true or false"):
        flagvalues.parse_mount("dst=/d,volume-nocopy=maybe")
    spec = validate_spec(_spec(flagvalues.parse_mount("type=volume,dst=/data,volume-nocopy")))
    assert spec.task.container.mounts[0].source == "" and spec.task.container.mounts[0].nocopy


COMPOSE = """\
services:
  db:
    image: postgres:16
    volumes:
      - /var/lib/postgresql/data
      - type: volume
        target: /cache
        volume: {nocopy: true}
      - type: volume
        source: logs
        target: /logs
        volume: {nocopy: true}
      - logs:/more:nocopy
volumes:
  logs: {}
"""


def test_compose_anonymous_volumes_short_and_long_and_nocopy(tmp_path: Path) -> None:
    from shoal.cli.compose import load_stack
    from shoal.cli.stack import config_text

    (tmp_path / "compose.yml").write_text(COMPOSE)
    st = load_stack("app", [tmp_path / "compose.yml"], {})
    mounts = st.services[0].task.container.mounts
    assert [(m.source, m.target, m.nocopy) for m in mounts] == [
        ("", "/var/lib/postgresql/data", False), ("", "/cache", True),
        ("app_logs", "/logs", True), ("app_logs", "/more", True)]
    assert not any("anonymous" in w or "volumes.volume" in w for w in st.warnings)
    import yaml
    back = yaml.safe_load(config_text([tmp_path / "compose.yml"], {}))
    assert back["services"]["db"]["volumes"][:2] == [
        "/var/lib/postgresql/data", {"type": "volume", "target": "/cache",
                                     "volume": {"nocopy": True}}]
    (tmp_path / "bad.yml").write_text("services:\n  a:\n    image: x\n    volumes:\n"
                                      "      - type: bind\n        target: /x\n")
    from shoal.cli.compose import ComposeError
    with pytest.raises(ComposeError, match=r"volumes\[0\]\.source"):
        load_stack("app", [tmp_path / "bad.yml"], {})


def test_names_are_64_hex_from_the_task_and_target_and_no_named_volume_can_take_one() -> None:
    from shoal.raft.spec import NAME_RE

    name = anon_name("t1", "/data")
    assert ANON_NAME_RE.match(name) and name == anon_name("t1", "/data")
    assert name != anon_name("t2", "/data") != anon_name("t1", "/logs")
    assert not NAME_RE.match(name)  # (a volume's name is at most 63 characters)
    assert MountSpec("volume", "/data", name, anonymous=True).problem() is None
    assert MountSpec("tmpfs", "/data", anonymous=True).problem() is not None


def test_an_images_volume_paths_are_anonymous_volumes_where_no_mount_or_file_is() -> None:
    from shoal.node.worker import image_volumes

    image = ImageConfig.from_json({"Volumes": {"/data": {}, "/logs/": {}, "/proc/x": {},
                                               "rel": {}, "/run/secrets/k": {}}})
    assert image.volumes == ("/data", "/logs/", "/proc/x", "/run/secrets/k", "rel")
    mine = MountSpec("volume", "/data", "named")
    got = image_volumes(image, [mine], {"/run/secrets/k": (b"", 0o400)}, "t1")
    assert [(m.target, m.source) for m in got] == [("/logs", anon_name("t1", "/logs"))]
    assert image_volumes(None, [], {}, "t1") == []
    assert ImageConfig().to_json().get("Volumes") is None  # (an image's id unchanged)


def test_the_managers_view_names_a_live_tasks_anonymous_volume_as_its_node_does() -> None:
    from shoal.node.volapi import implicit_volumes

    st = cluster_at(SCHEMA)
    st.apply({"op": "node_add", "now": 1.0, "node": {
        "id": "n1", "hostname": "h1", "addr": "10.0.0.1", "api_port": 1, "raft_port": 2,
        "role": "manager", "state": "ready"}})
    spec = to_dict(validate_spec(_spec(ANON, {"type": "volume", "source": "named",
                                              "target": "/n"})))
    assert st.apply({"op": "service_create", "id": "s1", "now": 1.0, "spec": spec})["ok"]
    task = {"id": "t1", "service_id": "s1", "service_name": "db", "slot": 1,
            "spec": spec["task"], "service_version": 1, "node_id": "n1",
            "desired_state": 512, "status": {"state": 512}}
    assert st.apply({"op": "leader", "term": 1, "now": 2.0, "ops": [("create", task)]})["ok"]
    found = implicit_volumes(st.snapshot())
    anon = found[anon_name("t1", "/data")]
    assert anon["anonymous"] and anon["nodes"] == ["h1"] and anon["services"] == ["db"]
    assert "" not in found and "named" in found


def _layer(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if text == "<dir>":
            p.mkdir(exist_ok=True)
        elif text.startswith("->"):
            p.symlink_to(text[2:])
        else:
            p.write_text(text)
    return root


@pytest.mark.skipif(os.geteuid() != 0, reason="whiteouts are device nodes: needs root")
def test_the_volume_is_filled_from_the_merged_image_inside_its_root(tmp_path: Path) -> None:
    low = _layer(tmp_path / "low", {"srv/data/a": "a", "srv/data/gone": "x",
                                    "srv/data/sub/old": "old", "etc/secret": "host?",
                                    "srv/opaque/hidden": "h", "srv/escape": "->../../../..",
                                    "var/run": "->/srv"})
    top = _layer(tmp_path / "top", {"srv/data/b": "b", "srv/opaque/new": "n",
                                    "srv/data/sub/new": "new"})
    os.mknod(top / "srv" / "data" / "gone", 0o600 | 0o020000, os.makedev(0, 0))  # whiteout
    os.setxattr(top / "srv" / "opaque", "trusted.overlay.opaque", b"y")
    layers = [top, low]
    dest = tmp_path / "vol"
    dest.mkdir()
    assert copy_image_path(layers, "/srv/data", dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "a", "b", "sub", "sub/new", "sub/old"]
    opaque = tmp_path / "vol2"
    opaque.mkdir()
    assert copy_image_path(layers, "/var/run/opaque", opaque)  # (through /var/run -> /srv)
    assert [p.name for p in opaque.iterdir()] == ["new"]
    # a symlink climbing out stays in the image's root: /srv/escape is / of the image
    entry = resolve(layers, "/srv/escape/etc")
    assert entry is not None and entry[1] == [low / "etc"]
    assert not copy_image_path(layers, "/nowhere", dest)
    assert not copy_image_path(layers, "/srv/data/a", tmp_path)  # (a file: nothing)


def test_the_schema_12_release_refuses_both_so_the_gate_is_needed() -> None:
    """The schema-12 release's own state machine refuses a volume mount without a source and
    a mount's nocopy key (what a replica of it would do with them were they not gated)."""
    from test_mixed_state_bytes import SCHEMA_12

    results = old_release_results(SCHEMA_12, 12, [_spec(m) for m in (
        ANON, {"type": "volume", "source": "d", "target": "/d", "nocopy": True},
        {"type": "volume", "source": "d", "target": "/d"})])
    assert results[1]["error"]["field"] == "task.container.mounts[0].source"
    assert "nocopy" in results[2]["error"]["message"]
    assert results[3].get("ok")


def test_a_fill_that_fails_half_way_leaves_the_volume_empty(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(A full disk half-way through): the volume stays empty, so the next start fills it
    whole, and no scratch directory is left."""
    import errno

    from shoal.runtime import taskvols, volcopy

    layer = _layer(tmp_path / "l", {"data/a": "a", "data/b": "b", "data/c": "c"})
    real, calls = volcopy._copy_file, []

    def failing(*args: Any) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(volcopy, "_copy_file", failing)
    vol, scratch = tmp_path / "vol", tmp_path / "anon"
    scratch.mkdir()
    with pytest.raises(OSError, match="No space"):
        taskvols._make_and_fill(vol, [layer], "/data", True, scratch)
    assert list(vol.iterdir()) == [] and list(scratch.iterdir()) == []
    monkeypatch.setattr(volcopy, "_copy_file", real)
    taskvols._make_and_fill(vol, [layer], "/data", True, scratch)
    assert sorted(p.name for p in vol.iterdir()) == ["a", "b", "c"]
    (vol / "a").unlink()
    taskvols._make_and_fill(vol, [layer], "/data", True, scratch)  # (not empty: untouched)
    assert sorted(p.name for p in vol.iterdir()) == ["b", "c"]


def test_a_tasks_stored_config_names_anonymous_and_nocopy_only_when_set() -> None:
    """config.json (what a restarted agent adopts from): a task without them reads back in an
    older agent, which knows neither key; one with them round-trips."""
    import json

    from shoal.runtime.records import TaskConfig

    plain = TaskConfig("t1", "h", ("true",), {}, "", mounts=(MountSpec("volume", "/d", "d"),))
    assert set(json.loads(plain.to_json())["mounts"][0]) == {
        "type", "target", "source", "readonly", "tmpfs_size", "driver", "driver_opts"}
    anon = TaskConfig("t1", "h", ("true",), {}, "", mounts=(
        MountSpec("volume", "/d", anon_name("t1", "/d"), anonymous=True, nocopy=True),))
    assert TaskConfig.from_json(anon.to_json()).mounts == anon.mounts


def test_hard_links_in_the_image_stay_links_in_the_volume(tmp_path: Path) -> None:
    """A layer of one file linked many times (a few MB of tar) must not write a copy per
    name into the volume (review: 1 MiB with 200 links filled 200 MiB), as Docker's copy
    keeps them: every name is the one inode, with the image's owner and mode."""
    layer = tmp_path / "layer"
    (layer / "data" / "sub").mkdir(parents=True)
    first = layer / "data" / "f0"
    first.write_bytes(os.urandom(1 << 20))
    os.chmod(first, 0o640)
    os.chown(first, 1234, 5678)
    names = [f"f{i}" for i in range(1, 100)] + [f"sub/g{i}" for i in range(100)]
    for name in names:
        os.link(first, layer / "data" / name)
    dest = tmp_path / "vol"
    dest.mkdir()
    assert copy_image_path([layer], "/data", dest)
    stats = [os.lstat(dest / n) for n in ["f0", *names]]
    assert {s.st_ino for s in stats} == {stats[0].st_ino}
    assert stats[0].st_nlink == 200 and stats[0].st_size == 1 << 20
    assert (stats[0].st_mode & 0o7777, stats[0].st_uid, stats[0].st_gid) == (0o640, 1234, 5678)
    assert (dest / "sub" / "g7").read_bytes() == first.read_bytes()


def test_long_fills_leave_the_agents_default_executor_free(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tasks starting at once with big image directories to copy (review: six fills held
    every thread of asyncio.to_thread's executor on 2 cores, so the agent's other blocking
    calls waited for the copies): the fills queue on their own threads."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    from shoal.runtime import taskvols, volcopy

    layer = _layer(tmp_path / "l", {f"data/f{i}": "x" for i in range(20)})
    real, release = volcopy._copy_file, threading.Event()

    def slow(*args: Any) -> None:  # (a copy that lasts until the test is done)
        release.wait(10)
        real(*args)

    monkeypatch.setattr(volcopy, "_copy_file", slow)
    (tmp_path / "volumes").mkdir()
    tv = taskvols.TaskVolumes(tmp_path / "volumes", tmp_path / "anon", lambda _n: False)

    async def main() -> float:
        starts = []
        for i in range(12):
            task = f"t{i}"
            m = MountSpec("volume", "/data", anon_name(task, "/data"), anonymous=True)
            cfg = SimpleNamespace(task_id=task, mounts=(m,))
            starts.append(asyncio.create_task(tv.prepare(cfg, [layer])))  # type: ignore[arg-type]
        try:
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            await asyncio.wait({asyncio.ensure_future(asyncio.to_thread(lambda: None))},
                               timeout=2)
            return time.monotonic() - t0
        finally:
            release.set()
            await asyncio.gather(*starts)

    assert asyncio.run(main()) < 1.0
    assert all(len(os.listdir(tmp_path / "volumes" / anon_name(f"t{i}", "/data"))) == 20
               for i in range(12))


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs: needs root")
def test_a_fill_works_when_the_volumes_have_a_filesystem_of_their_own(tmp_path: Path) -> None:
    """DATA_DIR/volumes on its own disk (review: the scratch directory was in
    DATA_DIR/anonymous, so every fill's rename failed with EXDEV and every image with a
    VOLUME, every empty named volume, failed to start); ``.fill`` is no volume."""
    import asyncio
    import subprocess
    from types import SimpleNamespace

    from shoal.runtime import resources, taskvols

    layer = _layer(tmp_path / "l", {"data/a": "a", "data/sub/b": "b"})
    vols = tmp_path / "volumes"
    vols.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "shoal-review-vols", str(vols)],
                   check=True)
    try:
        tv = taskvols.TaskVolumes(vols, tmp_path / "anon", lambda _n: False)
        m = MountSpec("volume", "/data", anon_name("t1", "/data"), anonymous=True)
        named = MountSpec("volume", "/data", "pgdata")
        for i, mount in enumerate((m, named)):
            cfg = SimpleNamespace(task_id=f"t{i}", mounts=(mount,))
            asyncio.run(tv.prepare(cfg, [layer]))  # type: ignore[arg-type]
            assert sorted(p.relative_to(vols / mount.source).as_posix()
                          for p in (vols / mount.source).rglob("*")) == ["a", "sub", "sub/b"]
        assert resources.list_volumes(vols) == sorted([m.source, "pgdata"])
        assert list((vols / ".fill").iterdir()) == []
    finally:
        subprocess.run(["umount", str(vols)], check=True)


def test_a_cancelled_start_stops_its_fill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """The agent stops (or the start is cancelled) during the copy of a huge image
    directory: the copy's thread stops at its next file (review: it ran on to the end, and
    the agent's exit waited for it), the volume stays empty, no scratch is left."""
    import asyncio
    import threading
    import time
    from types import SimpleNamespace

    from shoal.runtime import taskvols, volcopy

    layer = _layer(tmp_path / "l", {f"data/f{i}": "x" for i in range(50)})
    real, copied, started = volcopy._copy_file, [], threading.Event()

    def slow(*args: Any) -> None:
        started.set()
        time.sleep(0.05)
        real(*args)
        copied.append(args)

    monkeypatch.setattr(volcopy, "_copy_file", slow)
    (tmp_path / "volumes").mkdir()
    tv = taskvols.TaskVolumes(tmp_path / "volumes", tmp_path / "anon", lambda _n: False)
    m = MountSpec("volume", "/data", anon_name("t", "/data"), anonymous=True)

    async def main() -> None:
        start = asyncio.create_task(tv.prepare(
            SimpleNamespace(task_id="t", mounts=(m,)), [layer]))  # type: ignore[arg-type]
        await asyncio.to_thread(started.wait, 5)
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start

    t0 = time.monotonic()
    asyncio.run(main())
    while os.listdir(tmp_path / "volumes" / ".fill") and time.monotonic() - t0 < 5:
        time.sleep(0.05)  # (the thread ends its current file, then removes its scratch)
    assert time.monotonic() - t0 < 1.5 and len(copied) < 10, len(copied)
    assert os.listdir(tmp_path / "volumes" / m.source) == []
    assert os.listdir(tmp_path / "volumes" / ".fill") == []
