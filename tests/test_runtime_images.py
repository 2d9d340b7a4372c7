"""shoal.runtime.images: importing root filesystems (dir, .tar, .tar.gz, .tar.zst), loading
docker-save and OCI image-layout tarballs (two layers, whiteouts, opaque dirs, config applied),
safe extraction, blob transfer between stores, removal; and tasks running from those images.

The images are made here from Debian's busybox-static (/bin/busybox); nothing is downloaded.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from test_runtime_support import (
    needs_root,
    run_to_end,
    task,
)

from shoal.runtime.errors import (
    DigestMismatch,
    ImageInUse,
    ImageNotFound,
    ImageUnavailable,
    InvalidImage,
)
from shoal.runtime.images import ImageConfig, ImageStore
from shoal.runtime.process import ProcessController

BUSYBOX = "/bin/busybox"
pytest_plugins = ("test_runtime_support",)  # its fixtures
pytestmark = [
    needs_root,
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]
APPLETS = ("sh", "ls", "cat", "echo", "id", "pwd", "env", "hostname", "stat", "touch", "sleep")
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nstaff:x:50:app\n"


def busybox_rootfs(root: Path) -> Path:
    """A ~2 MB root filesystem: /bin/busybox, its applets as symlinks, /etc/passwd, /etc/group."""
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    for name in APPLETS:
        (root / "bin" / name).symlink_to("busybox")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    return root


def _tar_bytes(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _dir(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def two_layers(tmp: Path) -> tuple[bytes, bytes]:
    """Layer 1: busybox + /app/{old,keep}.txt + /data/{a,b}; layer 2: deletes /app/old.txt
    (whiteout), replaces /data (opaque dir) with /data/new.txt, adds /app/hello.txt."""
    root = busybox_rootfs(tmp / "l1")
    (root / "app").mkdir()
    (root / "app" / "old.txt").write_text("old\n")
    (root / "app" / "keep.txt").write_text("keep\n")
    (root / "data").mkdir()
    (root / "data" / "a").write_text("a\n")
    (root / "data" / "b").write_text("b\n")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in sorted(root.iterdir()):
            tar.add(entry, arcname=entry.name)
    layer2 = _tar_bytes([
        _dir("app"), _file("app/.wh.old.txt", b""), _file("app/hello.txt", b"hello\n"),
        _dir("data"), _file("data/.wh..wh..opq", b""), _file("data/new.txt", b"new\n"),
    ])
    return buf.getvalue(), layer2


IMAGE_CONFIG = {
    "Entrypoint": ["/bin/sh", "-c"],
    "Cmd": ["echo $GREETING from $(pwd) as $(id -u); ls /app; ls /data"],
    "Env": ["PATH=/bin", "GREETING=hi"],
    "WorkingDir": "/app",
    "User": "app",
}


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def docker_save(tmp: Path, tag: str = "demo:v1") -> Path:
    l1, l2 = two_layers(tmp)
    config = json.dumps({"config": IMAGE_CONFIG, "rootfs": {"type": "layers",
                         "diff_ids": [_sha(l1), _sha(l2)]}}).encode()
    cfg_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": cfg_name, "RepoTags": [tag],
                            "Layers": ["l1/layer.tar", "l2/layer.tar"]}]).encode()
    out = tmp / "save.tar"
    out.write_bytes(_tar_bytes([
        _file("manifest.json", manifest), _file(cfg_name, config), _dir("l1"),
        _file("l1/layer.tar", l1), _dir("l2"), _file("l2/layer.tar", l2),
    ]))
    return out


def oci_layout(tmp: Path, name: str = "demo-oci:v2") -> Path:
    l1, l2 = two_layers(tmp)
    layers = [gzip.compress(l1), gzip.compress(l2)]  # OCI layers are usually gzipped
    config = json.dumps({"config": IMAGE_CONFIG, "rootfs": {"type": "layers",
                         "diff_ids": [_sha(l1), _sha(l2)]}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": _sha(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": _sha(layer), "size": len(layer)} for layer in layers],
    }).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": _sha(manifest),
        "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": name}}]})
    blobs = [_file(f"blobs/sha256/{_sha(b)[7:]}", b) for b in (config, manifest, *layers)]
    out = tmp / "oci.tar"
    out.write_bytes(_tar_bytes([
        _file("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
        _file("index.json", index.encode()),
        _dir("blobs"), _dir("blobs/sha256"), *blobs,
    ]))
    return out


@pytest.fixture
def store(tmp_path: Path) -> ImageStore:
    return ImageStore(tmp_path / "images")


# ---------------------------------------------------------------------------------- imports


@pytest.mark.parametrize("form", ["dir", "tar", "tar.gz", "tar.zst"])
async def test_a_busybox_rootfs_imported_from_a_dir_or_tarball_runs(
    ctl: ProcessController, tmp_path: Path, form: str
) -> None:
    root = busybox_rootfs(tmp_path / "rootfs")
    src: Path = root
    if form != "dir":
        src = tmp_path / "rootfs.tar"
        subprocess.run(["tar", "-C", str(root), "-cf", str(src), "."], check=True)
        if form == "tar.gz":
            subprocess.run(["gzip", str(src)], check=True)
            src = tmp_path / "rootfs.tar.gz"
        elif form == "tar.zst":
            subprocess.run(["zstd", "-q", "--rm", str(src)], check=True)
            src = tmp_path / "rootfs.tar.zst"
    info = ctl.images.import_rootfs("busybox", src)
    assert info.tags == ("busybox:latest",) and len(info.layers) == 1
    assert ctl.images.inspect("busybox").id == info.id == ctl.images.inspect(info.id[7:19]).id
    st, out, err = await run_to_end(
        ctl, task("bb", "sh", "-c", "ls /bin | head -3; cat /proc/1/comm; id -u; hostname; "
                  "touch /tmp/newfile && echo writable", image="busybox", user="app",
                  env={"PATH": "/bin"}, hostname="bb-1"),
    )
    assert st.exit_code == 0, err
    assert out.splitlines() == ["busybox", "cat", "echo", "init", "1000", "bb-1", "writable"]
    assert "touch" not in err
    await ctl.remove("bb")


async def test_an_images_symlinks_lead_a_tasks_files_into_its_root_never_the_hosts(
    ctl: ProcessController, tmp_path: Path
) -> None:
    """Secrets' and configs' files (Docker's absolute targets) are bound onto mount points
    made inside the task's root: /srv -> HOST_DIR (absolute) and /opt -> ../../HOST_DIR
    (relative) in the image resolve in the root (RESOLVE_IN_ROOT) — to the image's own
    HOST_DIR — so the host's directory gets nothing; one whose HOST_DIR the image lacks
    (dangling in the root) is made at the link's end inside the root, as runc does, and
    still writes nothing there. A file owned by uid:gid is so in the task, and a 0755 one
    runs."""
    outside = tmp_path / "outside"
    outside.mkdir()
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / str(outside).lstrip("/")).mkdir(parents=True)  # (the image's own HOST_DIR)
    (root / "srv").symlink_to(outside)
    (root / "opt").symlink_to("../../../../../../../.." + str(outside))
    (root / "var").symlink_to(tmp_path / "elsewhere")  # (dangling in the image)
    (tmp_path / "elsewhere").mkdir()
    ctl.images.import_rootfs("links", root)
    files: dict[str, Any] = {
        "/srv/a.conf": (b"a", 0o444, 0, 0), "/opt/b.conf": (b"b", 0o444),
        "/etc/app/app.conf": (b"c", 0o440, 101, 102),
        "/usr/local/bin/run.sh": (b"#!/bin/sh\necho ran-as-$(id -u)\n", 0o755, 0, 0)}
    st, out, err = await run_to_end(ctl, task(
        "links", "sh", "-c", "cat /srv/a.conf /opt/b.conf; echo; stat -c '%u:%g %a' "
        "/etc/app/app.conf; /usr/local/bin/run.sh", image="links", user="1000",
        env={"PATH": "/bin"}, files=files))
    assert st.exit_code == 0, err
    assert out.split() == ["ab", "101:102", "440", "ran-as-1000"]
    assert list(outside.iterdir()) == []
    await ctl.remove("links")
    st, out, err = await run_to_end(ctl, task(
        "dangling", "cat", "/var/x.conf", f"{tmp_path}/elsewhere/x.conf", image="links",
        files={"/var/x.conf": (b"x", 0o444, 0, 0)}))
    assert (st.exit_code, out) == (0, "xx\n"), err
    assert list((tmp_path / "elsewhere").iterdir()) == []


@pytest.mark.parametrize("fmt", ["docker-save", "oci"])
async def test_a_loaded_image_runs_with_its_config_and_layers_applied(
    ctl: ProcessController, tmp_path: Path, fmt: str
) -> None:
    path = docker_save(tmp_path) if fmt == "docker-save" else oci_layout(tmp_path)
    [info] = ctl.images.load(path)
    tag = "demo:v1" if fmt == "docker-save" else "demo-oci:v2"
    assert info.tags == (tag,) and len(info.layers) == 2
    assert info.config.workdir == "/app" and info.config.env["GREETING"] == "hi"
    command, env, workdir, user = info.config.apply()
    st, out, err = await run_to_end(
        ctl, task("img", *command, env=env, workdir=workdir, user=user, image=tag)
    )
    assert st.exit_code == 0, err
    # Entrypoint + Cmd, Env, WorkingDir, User; app/old.txt whited out; /data made opaque.
    assert out.split() == ["hi", "from", "/app", "as", "1000", "hello.txt", "keep.txt", "new.txt"]


def test_image_config_apply_follows_dockers_rules() -> None:
    cfg = ImageConfig(entrypoint=("ep",), cmd=("default",), env={"A": "1", "B": "2"},
                      workdir="/w", user="u")
    assert cfg.apply() == (("ep", "default"), {"A": "1", "B": "2"}, "/w", "u")
    assert cfg.apply(("mine",), {"B": "3"}, "/x", "v") == (
        ("ep", "mine"), {"A": "1", "B": "3"}, "/x", "v")
    assert cfg.apply(entrypoint=("other",))[0] == ("other",)  # a new entrypoint drops Cmd
    assert ImageConfig().apply()[0] == ()


def test_whiteouts_become_overlay_whiteouts_in_the_unpacked_layer(
    store: ImageStore, tmp_path: Path
) -> None:
    [info] = store.load(docker_save(tmp_path))
    top = store.layer_dirs(info)[0]
    wh = os.lstat(top / "app" / "old.txt")
    assert (os.major(wh.st_rdev), os.minor(wh.st_rdev)) == (0, 0)
    assert os.getxattr(top / "data", "trusted.overlay.opaque") == b"y"
    assert not (top / "app" / ".wh.old.txt").exists()


@pytest.mark.parametrize(
    ("entries", "problem"),
    [
        ([_file("/etc/evil", b"x")], "absolute"),
        ([_file("../evil", b"x")], "'..'"),
        ([_file("a/../../evil", b"x")], "'..'"),
        ([_link("lnk", "/etc"), _file("lnk/passwd", b"x")], "non-directory"),
        ([_link("hard", "../../etc/passwd", tarfile.LNKTYPE)], "'..'"),
        # a directory whited out, then a symlink at its path (to OUTSIDE: the test's own
        # directory, never the host's /etc): nothing goes through it (before: the layer
        # still took it for its directory and wrote through the symlink)
        ([_dir("d"), _file(".wh.d", b""), _link("d", "OUTSIDE"), _file("d/evil", b"x")],
         "non-directory"),
        ([_dir("a"), _dir("a/b"), _file(".wh.a", b""), _link("a", "OUTSIDE"),
          _file("a/b/evil", b"x")], "non-directory"),
        # a whiteout of nothing, of the layer itself or of its parent (before: .wh... removed
        # the store's tmp directory, other unpacks in progress with it)
        ([_file(".wh...", b"")], "names no entry"),
        ([_file(".wh..", b"")], "names no entry"),
        ([_dir("x"), _file("x/.wh.", b"")], "names no entry"),
    ],
)
def test_unsafe_layers_are_refused(
    store: ImageStore, tmp_path: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]],
    problem: str,
) -> None:
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    for info, _ in entries:
        if info.linkname == "OUTSIDE":
            info.linkname = str(outside)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(_tar_bytes(entries))
    with pytest.raises(InvalidImage, match=problem):
        store.import_rootfs("bad", bad)
    assert not Path("/etc/evil").exists() and list(outside.rglob("*")) == [outside / "b"]
    assert store.ls() == []


def test_a_directorys_mode_never_lands_through_a_symlink_that_replaced_it(
    store: ImageStore, tmp_path: Path
) -> None:
    """A layer's directory modes are set last; one whited out and replaced by a symlink to a
    host file is none of the layer's (before: chmod 0666 followed the symlink to the host)."""
    victim = tmp_path / "shadow"
    victim.write_text("root:x\n")
    victim.chmod(0o600)
    src = tmp_path / "l.tar"
    src.write_bytes(_tar_bytes([_dir("e", 0o666), _file(".wh.e", b""),
                                _link("e", str(victim))]))
    info = store.import_rootfs("chmod", src)
    assert stat.S_IMODE(os.stat(victim).st_mode) == 0o600
    assert os.readlink(store.layer_dirs(info)[0] / "e") == str(victim)


def test_device_nodes_are_skipped_and_symlinks_kept_as_is(
    store: ImageStore, tmp_path: Path
) -> None:
    dev = tarfile.TarInfo("sda")
    dev.type, dev.devmajor, dev.devminor = tarfile.BLKTYPE, 8, 0
    src = tmp_path / "l.tar"
    src.write_bytes(_tar_bytes([(dev, None), _link("etc-link", "/etc/passwd"),
                                _file("f", b"data")]))
    info = store.import_rootfs("devs", src)
    layer = store.layer_dirs(info)[0]
    assert not os.path.lexists(layer / "sda")
    assert os.readlink(layer / "etc-link") == "/etc/passwd"
    assert (layer / "f").read_bytes() == b"data"


# ---------------------------------------------------------------------- transfer and removal


def test_an_image_moves_between_stores_blob_by_blob_with_digests_verified(
    store: ImageStore, tmp_path: Path
) -> None:
    [info] = store.load(docker_save(tmp_path))
    other = ImageStore(tmp_path / "peer")
    transferred = []
    while need := other.blobs_needed(info.id):
        for digest in need:
            with store.export_blob(digest) as fh:
                other.import_blob(digest, fh)
            transferred.append(digest)
    assert transferred[0] == info.id and len(transferred) == 3  # manifest, then 2 layers
    copy = other.commit(info.id, tags=["demo:v1"])
    assert (copy.id, copy.layers, copy.config) == (info.id, info.layers, info.config)
    with pytest.raises(DigestMismatch):
        other.import_blob("sha256:" + "0" * 64, io.BytesIO(b"not that"))
    with pytest.raises(ImageNotFound):
        store.export_blob("sha256:" + "1" * 64)


def test_rm_untags_then_deletes_unused_layers_and_refuses_images_in_use(
    store: ImageStore, tmp_path: Path
) -> None:
    root = busybox_rootfs(tmp_path / "r")
    a = store.import_rootfs("one", root)
    store.commit(a.id, tags=["two:x"])
    store.rm("one")
    assert store.inspect("two:x").id == a.id  # still tagged
    layer = store.layer_dirs(a)[0]
    in_use = {a.id}
    guarded = ImageStore(store.root, in_use=lambda: in_use)
    with pytest.raises(ImageInUse):
        guarded.rm("two:x")
    in_use.clear()
    guarded.rm("two:x")
    assert store.ls() == [] and not layer.exists()
    with pytest.raises(ImageNotFound):
        store.inspect("two:x")


async def test_a_task_with_a_missing_image_is_refused(ctl: ProcessController) -> None:
    with pytest.raises(ImageUnavailable):
        await ctl.start(task("noimg", "true", image="nosuch:latest"))
    assert ctl.tasks() == {}


async def test_an_image_in_use_by_a_task_cannot_be_removed(
    ctl: ProcessController, tmp_path: Path
) -> None:
    ctl.images.import_rootfs("busy", busybox_rootfs(tmp_path / "r"))
    await ctl.start(task("user", "sleep", "1000", image="busy", env={"PATH": "/bin"}))
    with pytest.raises(ImageInUse):
        ctl.images.rm("busy")
    await ctl.remove("user")
    ctl.images.rm("busy")
