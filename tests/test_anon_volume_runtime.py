"""Anonymous volumes for real, at the runtime's level (shoal.runtime.taskvols): made for the
task, filled from its image at the target (owner and mode too, so the image's non-root user
writes there under a read-only root), left empty with nocopy, removed with the task — and
swept when an agent died before it removed them; an image's VOLUME gets one; an empty named
volume is filled once, a filled one never. Images are made from busybox-static."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_runtime_support import needs_root, run_to_end, task, wait_for_output

from shoal.node.worker import image_volumes
from shoal.runtime.errors import LaunchFailed, VolumeInUse
from shoal.runtime.images import ImageConfig
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RuntimeConfig
from shoal.runtime.rootfs import MountSpec
from shoal.runtime.taskvols import anon_name

BUSYBOX = "/bin/busybox"
pytest_plugins = ("test_runtime_support",)
pytestmark = [needs_root,
              pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static")]
APPLETS = ("sh", "ls", "cat", "echo", "id", "stat", "sleep", "touch")


def _image(ctl: ProcessController, tmp: Path, tag: str = "vol",
           config: ImageConfig | None = None) -> None:
    """busybox with /data owned by app (1000), mode 0750, holding seed and sub/link -> seed."""
    root = tmp / f"rootfs-{tag}"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for name in APPLETS:
        (root / "bin" / name).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\napp:x:1000:\n")
    (root / "data" / "sub").mkdir(parents=True)
    (root / "data" / "seed").write_text("from the image\n")
    (root / "data" / "sub" / "link").symlink_to("../seed")
    for p in (root / "data", root / "data" / "seed", root / "data" / "sub"):
        os.chown(p, 1000, 1000)
    (root / "data").chmod(0o750)
    info = ctl.images.import_rootfs(f"{tag}-base", root)
    ctl.images.add_image([(info.layers[0], info.size)], config or ImageConfig(), [tag])


def _anon(task_id: str, target: str = "/data", **kw: bool) -> MountSpec:
    return MountSpec("volume", target, anon_name(task_id, target), anonymous=True, **kw)


async def test_an_anonymous_volume_is_filled_from_the_image_and_removed_with_its_task(
        ctl: ProcessController, config: RuntimeConfig, tmp_path: Path) -> None:
    _image(ctl, tmp_path)
    vol = _anon("a1")
    path = config.volumes_dir / vol.source
    script = ("cat /data/seed /data/sub/link; stat -c '%u %a' /data; echo new > /data/new "
              "&& echo wrote; touch /etc/x 2>/dev/null || echo root read-only")
    st, out, err = await run_to_end(ctl, task("a1", "sh", "-c", script, image="vol",
                                              user="app", read_only=True, mounts=(vol,)))
    assert st.exit_code == 0, err
    assert out.splitlines() == ["from the image", "from the image", "1000 750", "wrote",
                                "root read-only"]
    # kept while the exited task is (its data to look at), refused to `volume rm`
    assert (path / "new").read_text() == "new\n"
    assert ctl.anonymous_volumes() == {vol.source: {"task": "a1", "target": "/data",
                                                    "users": ["a1"]}}
    with pytest.raises(VolumeInUse):
        await ctl.remove_anonymous_volume(vol.source)
    for bad in ("../tasks", "..", "", vol.source.upper()):  # (a request's name: never a path)
        assert not await ctl.remove_anonymous_volume(bad)
    assert (config.data_dir / "tasks" / "a1").exists()
    await ctl.remove("a1")
    assert not path.exists() and ctl.anonymous_volumes() == {}
    # a replacement (another task id) starts with a fresh one: the image's content only
    st, out, _ = await run_to_end(ctl, task("a2", "ls", "/data", image="vol",
                                            mounts=(_anon("a2"),)))
    assert out.split() == ["seed", "sub"]
    await ctl.remove("a2")


async def test_nocopy_leaves_the_volume_empty_and_the_default_image_copies_nothing(
        ctl: ProcessController, tmp_path: Path) -> None:
    _image(ctl, tmp_path)
    st, out, err = await run_to_end(ctl, task("n1", "sh", "-c", "ls -A /data; stat -c '%u %a' "
                                              "/data", image="vol", mounts=(_anon("n1",
                                                                             nocopy=True),)))
    assert st.exit_code == 0 and out.split() == ["0", "755"], err
    st, out, _ = await run_to_end(ctl, task("n2", "sh", "-c", "ls -A /usr/share | wc -l",
                                            mounts=(_anon("n2", "/usr/share"),)))
    assert out.strip() == "0"  # (the host's own directory is no image content)
    for tid in ("n1", "n2"):
        await ctl.remove(tid)
    assert ctl.anonymous_volumes() == {}


async def test_an_images_volume_gets_one_unless_a_mount_is_there(
        ctl: ProcessController, tmp_path: Path) -> None:
    _image(ctl, tmp_path, "declared", ImageConfig(volumes=("/data", "/cache/")))
    image = ctl.image_config("declared")
    assert image.volumes == ("/cache/", "/data")
    mounts = image_volumes(image, [], {}, "i1")
    assert [(m.target, m.anonymous) for m in mounts] == [("/cache", True), ("/data", True)]
    st, out, err = await run_to_end(ctl, task("i1", "sh", "-c", "cat /data/seed; ls -A /cache",
                                              image="declared", read_only=True,
                                              mounts=tuple(mounts)))
    assert st.exit_code == 0 and out == "from the image\n", err
    assert len(ctl.anonymous_volumes()) == 2
    tmpfs = MountSpec("tmpfs", "/data")  # (a user's mount there: no volume for that path)
    assert [m.target for m in image_volumes(image, [tmpfs], {}, "i2")] == ["/cache"]
    await ctl.remove("i1")
    assert ctl.anonymous_volumes() == {}


async def test_an_empty_named_volume_is_filled_once_and_a_filled_one_never(
        ctl: ProcessController, config: RuntimeConfig, tmp_path: Path) -> None:
    _image(ctl, tmp_path)
    named = MountSpec("volume", "/data", "keep")
    st, _, err = await run_to_end(ctl, task("v1", "sh", "-c", "rm /data/seed; echo mine > "
                                            "/data/own", image="vol", mounts=(named,)))
    assert st.exit_code == 0, err
    st, out, _ = await run_to_end(ctl, task("v2", "ls", "/data", image="vol", mounts=(named,)))
    assert out.split() == ["own", "sub"]  # (not empty: left as the task left it)
    for tid in ("v1", "v2"):
        await ctl.remove(tid)
    assert (config.volumes_dir / "keep" / "own").exists()  # (a named volume stays)


async def test_a_restarted_agent_keeps_its_tasks_volumes_and_sweeps_the_orphans(
        config: RuntimeConfig, tmp_path: Path) -> None:
    first = ProcessController(config)
    _image(first, tmp_path)
    vol = _anon("r1")
    await first.start(task("r1", "sh", "-c", "echo up; exec sleep 100", image="vol",
                           mounts=(vol,)))
    await wait_for_output(first, "r1", "up")
    await first.close()  # (the agent dies; the task runs on)
    # what an agent that died mid-way leaves: a record with its directory, a record alone
    orphans = [anon_name("gone", "/x"), anon_name("gone", "/y")]
    for name in orphans:
        (config.anon_dir / name).write_text(json.dumps({"task": "gone", "target": "/x"}))
    (config.volumes_dir / orphans[0]).mkdir()
    second = ProcessController(config)
    try:
        await second.recover()
        assert set(second.anonymous_volumes()) == {vol.source}
        assert not any((config.volumes_dir / n).exists() for n in orphans)
        await second.remove("r1")
        assert second.anonymous_volumes() == {}
        assert not (config.volumes_dir / vol.source).exists()
    finally:
        await second.remove("r1")
        await second.close()


async def test_a_failed_start_leaves_no_anonymous_volume(
        ctl: ProcessController, config: RuntimeConfig) -> None:
    with pytest.raises(Exception, match="not on this node"):
        await ctl.start(task("f1", "true", image="missing", mounts=(_anon("f1"),)))
    # (the launcher's own failure, after the volume was made: no mount point in /usr)
    with pytest.raises(LaunchFailed):
        await ctl.start(task("f2", "true", mounts=(_anon("f2"),
                                                    MountSpec("tmpfs", "/usr/no-such-dir"))))
    assert ctl.anonymous_volumes() == {} and ctl.volumes() == []  # (.fill: no volume)


async def test_a_pods_containers_share_its_anonymous_volume_until_the_last_is_removed(
        ctl: ProcessController, config: RuntimeConfig) -> None:
    """A sidecar that lists the task's anonymous volume's target mounts the same volume
    (named by the task's id: shoal.node.worker); removing it (a sidecar's restart) keeps
    the volume, removing the main container too removes it."""
    vol = _anon("p1")
    await ctl.start(task("p1", "sh", "-c", "echo shared > /data/f; echo up; exec sleep 100",
                         mounts=(vol,)))
    await wait_for_output(ctl, "p1", "up")
    st, out, _ = await run_to_end(ctl, task("p1-side", "cat", "/data/f", mounts=(vol,)))
    assert st.exit_code == 0 and out == "shared\n"
    assert ctl.anonymous_volumes()[vol.source]["users"] == ["p1", "p1-side"]
    await ctl.remove("p1-side")
    assert (config.volumes_dir / vol.source / "f").exists()
    await ctl.remove("p1")
    assert ctl.anonymous_volumes() == {} and not (config.volumes_dir / vol.source).exists()
