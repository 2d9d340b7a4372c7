"""Mount targets reached through an image's symlinks (runc's rule, securejoin): a target is
resolved inside the task's root as if the root were "/" — every symlink on the way followed
there, ``..`` and absolute links clamped to the root — and a missing end is made, a file or a
directory as the source is, also when it is the dangling end of a symlink chain (a systemd
image's /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf). A malicious image's
links never make the agent (root) create or mount anything outside the root: each test that
points one at a host path checks that path is untouched afterwards.

The images are made here from Debian's busybox-static; nothing is downloaded. Root only.
Each test names the property it checks.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_runtime_images import BUSYBOX, busybox_rootfs
from test_runtime_support import CGROUP_PARENT, needs_root, run_to_end, task

from shoal.runtime.errors import LaunchFailed
from shoal.runtime.process import ProcessController
from shoal.runtime.rootfs import MountSpec

pytest_plugins = ("test_runtime_support",)  # its fixtures
pytestmark = [
    needs_root,
    pytest.mark.skipif(not os.path.exists(BUSYBOX), reason="needs busybox-static"),
]

ENV = {"PATH": "/bin"}


def _tree(path: Path) -> list[str]:
    """Everything under ``path`` (relative names, sorted): what a test's host dir holds."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory a malicious image's links point at; must stay empty."""
    path = tmp_path / "host-side"
    path.mkdir()
    return path


def systemd_like(root: Path, host: Path) -> None:
    """/etc/resolv.conf, /etc/hosts and /etc/hostname as symlinks a systemd-based image has,
    dangling in the image: relative, absolute, and one climbing far above the root."""
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (root / "etc" / "hosts").symlink_to(str(host / "hosts"))  # (absolute: the host's path)
    (root / "etc" / "hostname").symlink_to("../../../../../../../.." + str(host / "hostname"))


async def test_a_dangling_resolv_conf_hosts_and_hostname_get_the_tasks_files_at_their_ends(
    ctl: ProcessController, tmp_path: Path, host: Path
) -> None:
    """With /etc/resolv.conf, /etc/hosts, /etc/hostname dangling symlinks in the image, the
    task starts, reads its own three files through them, and the host path the absolute
    and climbing links name gets nothing."""
    root = busybox_rootfs(tmp_path / "rootfs")
    systemd_like(root, host)
    ctl.images.import_rootfs("sysd", root)
    st, out, err = await run_to_end(ctl, task(
        "sysd", "sh", "-c", "cat /etc/hostname; grep -c localhost /etc/hosts; "
        "cat /etc/resolv.conf | grep -c . ; readlink /etc/resolv.conf; "
        "cat /run/systemd/resolve/stub-resolv.conf | grep -c . ; echo ok", image="sysd",
        env=ENV, hostname="web-1"))
    assert _tree(host) == []
    assert st.exit_code == 0, err
    words = out.split()
    assert words[:2] == ["web-1", "2"] and words[-1] == "ok"
    # (as Docker: the image's link kept, the file at its end)
    assert words[3] == "../run/systemd/resolve/stub-resolv.conf" and words[2] == words[4]


async def test_an_images_symlinked_etc_keeps_its_files_beside_the_tasks_own(
    ctl: ProcessController, tmp_path: Path
) -> None:
    """An image whose /etc -> usr/etc (and /etc/hosts a regular file of it): the task sees
    the image's /etc through the link — passwd, group — with its own hostname, hosts and
    resolv.conf in it (before: the init layer's etc hid the link and all of the image's
    /etc; only those three files were left), and its user is found in that passwd (before:
    "no user 'app'")."""
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "usr").mkdir()
    (root / "etc").rename(root / "usr" / "etc")
    (root / "etc").symlink_to("usr/etc")
    (root / "usr" / "etc" / "hosts").write_text("192.0.2.9 from-image\n")
    ctl.images.import_rootfs("etclink", root)
    st, out, err = await run_to_end(ctl, task(
        "etclink", "sh", "-c", "readlink /etc; ls /etc; cat /etc/hostname /usr/etc/hostname; "
        "grep -c from-image /etc/hosts || true; id -u", image="etclink", env=ENV,
        hostname="web-2", user="app"))
    assert st.exit_code == 0, err
    assert out.split() == ["usr/etc", "group", "hostname", "hosts", "passwd", "resolv.conf",
                           "web-2", "web-2", "0", "1000"]


@pytest.mark.parametrize("readonly", [False, True])
async def test_a_tmpfs_on_run_keeps_the_tasks_resolv_conf_at_the_end_of_the_images_link(
    ctl: ProcessController, tmp_path: Path, host: Path, readonly: bool
) -> None:
    """A systemd image run as such images are (a tmpfs on /run) whose /etc/resolv.conf ->
    ../run/systemd/resolve/stub-resolv.conf and /etc/hosts -> /run/hosts: the task reads
    its own resolv.conf and hosts through the links, made at their ends in the tmpfs, as
    Docker's binds, mounted after the shallower /run, are (before: the init layer's files
    sat under the tmpfs, both links dangled, the task had no DNS set up). A read-only
    tmpfs there cannot take them: the task still starts, its links dangling."""
    root = busybox_rootfs(tmp_path / "rootfs")
    systemd_like(root, host)
    (root / "etc" / "hosts").unlink()
    (root / "etc" / "hosts").symlink_to("/run/hosts")
    ctl.images.import_rootfs("sysd-run", root)
    st, out, err = await run_to_end(ctl, task(
        "sysd-run", "sh", "-c", "test -s /etc/resolv.conf && echo dns; grep -c web-3 /etc/hosts; "
        "cat /etc/hostname", image="sysd-run", env=ENV, hostname="web-3",
        mounts=(MountSpec("tmpfs", "/run", readonly=readonly),)))
    assert _tree(host) == []
    assert st.exit_code == 0, err
    assert out.split() == (["web-3"] if readonly else ["dns", "1", "web-3"])


async def test_the_images_directories_on_the_way_to_the_init_files_keep_owner_and_mode(
    ctl: ProcessController, tmp_path: Path
) -> None:
    """An image whose /etc is 7:8 and whose resolv.conf -> ../run/systemd/resolve/stub-
    resolv.conf, that directory 101:102 mode 0750 (systemd-resolve's): the task sees them
    as the image has them, as under Docker's binds (before: the init layer's copies of both
    made them root's, so systemd-resolve could no longer enter its own directory)."""
    root = busybox_rootfs(tmp_path / "rootfs")
    resolve = root / "run" / "systemd" / "resolve"
    resolve.mkdir(parents=True)
    os.chown(resolve, 101, 102)
    resolve.chmod(0o750)
    os.chown(root / "etc", 7, 8)
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    ctl.images.import_rootfs("owners", root)
    st, out, err = await run_to_end(ctl, task(
        "owners", "sh", "-c", "stat -c %u:%g:%a /run/systemd/resolve /etc; test -s "
        "/etc/resolv.conf && echo dns", image="owners", env=ENV))
    assert st.exit_code == 0, err
    assert out.split() == ["101:102:750", "7:8:755", "dns"]


async def test_init_files_whose_links_end_very_far_down_shadow_the_links(
    ctl: ProcessController, tmp_path: Path
) -> None:
    """An image whose /etc/hosts, /etc/hostname and /etc/resolv.conf are links to paths
    2,000 directories deep: the task starts with its own three files at /etc/NAME (the
    links shadowed, as when they loop). Before: the init layer was to be made 6,000
    directories deep by path, the launcher's spec overflowed, and the start failed with
    "launcher failed: no message"."""
    root = busybox_rootfs(tmp_path / "rootfs")
    for letter, name in zip("abc", ("hosts", "hostname", "resolv.conf"), strict=True):
        (root / "etc" / name).symlink_to("/" + "/".join([letter] * 2000))
    ctl.images.import_rootfs("far", root)
    st, out, err = await run_to_end(ctl, task(
        "far", "sh", "-c", "cat /etc/hostname; grep -c far-1 /etc/hosts", image="far",
        env=ENV, hostname="far-1"))
    assert st.exit_code == 0, err
    assert out.split() == ["far-1", "1"]


@pytest.mark.parametrize("link", ["/", "..", "../.."])
async def test_init_files_linked_to_the_images_root_shadow_the_link(
    ctl: ProcessController, tmp_path: Path, link: str
) -> None:
    """An image whose /etc/hosts is a link to its root ("/", "..", "../.."): the task starts
    with its own hosts at /etc/hosts (a directory cannot hold the file: the link is
    shadowed). Before: the agent's placement of the file raised ValueError ("not enough
    values to unpack") out of the start, not a start error: the worker neither reported
    the task nor gave its address back, and tried again at every pass."""
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "etc" / "hosts").symlink_to(link)
    ctl.images.import_rootfs("toroot", root)
    st, out, err = await run_to_end(ctl, task(
        "toroot", "sh", "-c", "grep -c root-1 /etc/hosts", image="toroot", env=ENV,
        hostname="root-1"))
    assert st.exit_code == 0, err
    assert out.split() == ["1"]


async def test_files_bound_through_dangling_links_are_made_at_the_links_end_inside_the_root(
    ctl: ProcessController, tmp_path: Path, host: Path
) -> None:
    """Secrets/configs whose targets run through dangling symlinks — /etc/nginx ->
    ../opt/nginx/conf (relative), /var -> HOST_DIR (absolute), /opt -> ../../..HOST_DIR
    (climbing) — are made where the links end inside the root: the task reads them through
    the links and at their ends, and HOST_DIR stays empty. /etc/resolv.conf as a file (a build
    RUN's, through its symlink) is the file given."""
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (root / "etc" / "nginx").symlink_to("../srv/nginx/conf")
    (root / "var").symlink_to(host)
    (root / "opt").symlink_to("../../../../../../../.." + str(host / "deep"))
    ctl.images.import_rootfs("links", root)
    files: dict[str, Any] = {
        "/etc/resolv.conf": (b"nameserver 192.0.2.1\n", 0o444, 0, 0),
        "/etc/nginx/nginx.conf": (b"n", 0o444, 0, 0),
        "/var/x.conf": (b"x", 0o444, 0, 0),
        "/opt/y/z.conf": (b"z", 0o444, 0, 0)}
    inside = str(host).lstrip("/")
    st, out, err = await run_to_end(ctl, task(
        "links", "sh", "-c", "cat /etc/resolv.conf /etc/nginx/nginx.conf /var/x.conf "
        f"/opt/y/z.conf; echo; cat /srv/nginx/conf/nginx.conf /{inside}/x.conf "
        f"/{inside}/deep/y/z.conf", image="links", env=ENV, files=files))
    assert _tree(host) == []
    assert st.exit_code == 0, err
    assert out.split("\n")[:3] == ["nameserver 192.0.2.1", "nxz", "nxz"], (out, err)


async def test_volume_bind_and_tmpfs_targets_under_symlinked_parents_stay_in_the_root(
    ctl: ProcessController, tmp_path: Path, host: Path
) -> None:
    """A bind, a volume and a tmpfs whose targets' parents are symlinks — /data -> HOST_DIR
    (absolute, dangling), /cache -> ../../HOST_DIR/c, /srv -> /srv-real (in the image) — are
    mounted where the links lead inside the root; nothing is made on the host."""
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "data").symlink_to(host)
    (root / "cache").symlink_to("../../../../../../" + str(host / "c"))
    (root / "srv-real").mkdir()
    (root / "srv").symlink_to("/srv-real")
    ctl.images.import_rootfs("vols", root)
    src = tmp_path / "bound"
    src.mkdir()
    (src / "in.txt").write_text("bound\n")
    mounts = (MountSpec("bind", "/data/b", str(src), readonly=True),
              MountSpec("volume", "/cache/v", "tv-sym"),
              MountSpec("tmpfs", "/srv/t"))
    inside = str(host).lstrip("/")
    st, out, err = await run_to_end(ctl, task(
        "vols", "sh", "-c", f"cat /data/b/in.txt /{inside}/b/in.txt; echo v > /cache/v/f; "
        f"cat /{inside}/c/v/f; echo t > /srv/t/f; cat /srv-real/t/f; pwd -P", image="vols",
        env=ENV, mounts=mounts, workdir="/data/wd"))
    assert _tree(host) == []
    assert st.exit_code == 0, err
    assert out.split() == ["bound", "bound", "v", "t", f"{host}/wd"]


async def test_links_inside_a_bound_directory_lead_into_the_root_too(
    ctl: ProcessController, tmp_path: Path, host: Path
) -> None:
    """A bound host directory (or a volume) holding links to HOST_DIR — absolute and
    climbing — mounted at /data: files and a tmpfs under /data/esc... are made through those
    links inside the task's root, not in HOST_DIR (the walk continues in the root across the
    mount, as runc's)."""
    root = busybox_rootfs(tmp_path / "rootfs")
    ctl.images.import_rootfs("plain", root)
    src = tmp_path / "bound"
    src.mkdir()
    (src / "esc").symlink_to(host)
    (src / "up").symlink_to("../../../../../../../.." + str(host / "up"))
    inside = str(host).lstrip("/")
    st, out, err = await run_to_end(ctl, task(
        "inbind", "sh", "-c", f"cat /data/esc/a /data/up/b /{inside}/a /{inside}/up/b; "
        "echo; touch /data/esc/t/x && echo tmpfs", image="plain", env=ENV,
        mounts=(MountSpec("bind", "/data", str(src)), MountSpec("tmpfs", "/data/esc/t")),
        files={"/data/esc/a": (b"a", 0o444, 0, 0), "/data/up/b": (b"b", 0o444, 0, 0)}))
    assert _tree(host) == []
    assert st.exit_code == 0, err
    assert out.split() == ["abab", "tmpfs"]


@pytest.mark.parametrize("in_image", [True, False])
async def test_dev_as_a_symlink_to_a_host_path_never_gets_device_nodes_on_the_host(
    ctl: ProcessController, tmp_path: Path, host: Path, in_image: bool
) -> None:
    """An image whose /dev is a symlink to a host path (that the image has too, or not): the
    task's /dev tmpfs, its device nodes and links are made where the link leads inside the
    root; the host path gets no device node (before: with the path in the image, mknodat and
    symlinkat from the root followed the absolute link out, onto the host's directory)."""
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "dev").symlink_to(host)
    if in_image:
        (root / str(host).lstrip("/")).mkdir(parents=True)
    ctl.images.import_rootfs("devlink", root)
    st, out, err = await run_to_end(ctl, task(
        "devlink", "sh", "-c", "echo hi > /dev/null && ls /dev/null /dev/zero /dev/fd && echo ok",
        image="devlink", env=ENV))
    assert _tree(host) == []
    assert st.exit_code == 0, err
    assert out.split()[-1] == "ok"


async def test_an_image_whose_links_walk_back_and_forth_starts_without_stalling_the_agent(
    ctl: ProcessController, tmp_path: Path
) -> None:
    """An image whose /etc -> /a/a/.../a/l (300 directories deep) and l -> x/../x/.. ...
    /l (780 times x/..): the agent's own walks of the image (its passwd and group, where its
    hosts, hostname and resolv.conf go), which run on its event loop before the launcher,
    give up within the launcher's bound, and the task starts at once (a loop there: the
    task's /etc is the init layer's, as an image without /etc). Before: each ``..`` walked
    the whole path again, minutes per walk and five walks per start, the agent frozen."""
    import time

    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "etc").rename(root / "etc-real")
    deep = root.joinpath(*["a"] * 300)
    (deep / "x").mkdir(parents=True)
    (root / "etc").symlink_to("/" + "/".join(["a"] * 300) + "/l")
    (deep / "l").symlink_to("/".join(["x/.."] * 780) + "/l")
    ctl.images.import_rootfs("backforth", root)
    started = time.monotonic()
    st, out, err = await run_to_end(ctl, task(
        "backforth", "sh", "-c", "cat /etc/hostname", image="backforth", env=ENV,
        hostname="bf-1"))
    assert st.exit_code == 0, err
    assert out.split() == ["bf-1"]
    assert time.monotonic() - started < 30  # (before: an hour; here well under a second)


@pytest.mark.parametrize("fs", ["proc", "sys"])
async def test_proc_and_sys_are_never_mounted_through_an_images_symlink(
    ctl: ProcessController, tmp_path: Path, fs: str
) -> None:
    """An image whose /proc (or /sys) is a symlink, /dev/x/../../real (dev/x a directory of
    the image): the start fails naming it, as runc's ("must be mounted on ordinary
    directory"). Before: procfs was mounted at /real through the image's /dev/x, then the
    task's /dev tmpfs hid dev/x, so the masks of /proc/timer_list, /proc/keys, /proc/kcore...
    found nothing at /proc/... and were skipped: the task read the host kernel's timers at
    /real/timer_list."""
    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "dev" / "x").mkdir(parents=True)
    (root / "real").mkdir()
    (root / fs).symlink_to("/dev/x/../../real")
    ctl.images.import_rootfs("proclink", root)
    with pytest.raises(LaunchFailed, match=f"on /{fs}: .*ordinary directory"):
        await ctl.start(task("proclink", "sh", "-c", "cat /real/timer_list", image="proclink",
                             env=ENV))


@pytest.mark.parametrize(("link", "target", "kind", "words"), [
    # a directory mount on a regular file of the image
    ("", "/etc/passwd/sub", "tmpfs", "mount point /etc/passwd/sub: Not a directory"),
    ("", "/etc/passwd", "tmpfs",
     "on /etc/passwd: the root has a file there, this mount needs a directory"),
    # a symlink loop
    ("loop", "/loop/x", "tmpfs", "mount point /loop/x: Too many levels of symbolic links"),
])
async def test_an_impossible_target_fails_the_start_naming_it_and_touches_nothing(
    ctl: ProcessController, tmp_path: Path, host: Path, link: str, target: str, kind: str,
    words: str,
) -> None:
    """A target that cannot be made (below a regular file, a directory mount on a file, a
    symlink loop) fails the start with an error naming the target."""
    root = busybox_rootfs(tmp_path / "rootfs")
    if link:
        (root / link).symlink_to(link)
    ctl.images.import_rootfs("bad", root)
    with pytest.raises(LaunchFailed, match=words):
        await ctl.start(task("bad", "true", image="bad", env=ENV,
                             mounts=(MountSpec(kind, target),)))
    assert _tree(host) == []


async def test_a_build_runs_mounts_follow_dangling_links_inside_the_root_and_leave_no_stub(
    ctl: ProcessController, tmp_path: Path, host: Path
) -> None:
    """A RUN's --mounts share the tasks' rule: on a base whose /etc/nginx -> ../srv/nginx/conf
    and /cache -> HOST_DIR dangle, a tmpfs and a bind of a context file are mounted at the
    links' ends inside the root; the RUN runs, the directories and file made to mount on are
    in no layer (BuildKit's stubs, where they were made), and HOST_DIR stays empty."""
    from test_build import _image_files

    from shoal.runtime.build import Builder, BuildOptions

    root = busybox_rootfs(tmp_path / "rootfs")
    (root / "etc" / "nginx").symlink_to("../srv/nginx/conf")
    (root / "cache").symlink_to(host)
    ctl.images.import_rootfs("base:1", root)
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "conf.txt").write_text("from-context\n")
    (ctx / "Dockerfile").write_text(
        "FROM base:1\n"
        "RUN --mount=type=tmpfs,target=/etc/nginx/t --mount=type=bind,source=conf.txt,"
        "target=/cache/c.txt cat /cache/c.txt > /seen.txt && touch /etc/nginx/t/x && "
        f"grep -q ' /srv/nginx/conf/t tmpfs' /proc/mounts && cat {host}/c.txt >> /seen.txt\n")
    lines: list[str] = []
    await Builder(ctl, ctl.images, tmp_path / "build").build(
        ctx, BuildOptions(tags=("out:1",), network="none"), lines.append)
    files = _image_files(ctl, "out:1")
    assert files["seen.txt"] == "from-context\nfrom-context\n"
    assert not [p for p in files if p.startswith(("srv", "tmp/"))], files  # (HOST_DIR: /tmp/..)
    assert _tree(host) == []


# (run in a mount namespace of its own whose /etc is an overlay over the host's with
# resolv.conf a symlink into /run, as on a systemd-resolved host; the host's is untouched)
_DEFAULT_IMAGE_TASK = """
import asyncio, sys
from pathlib import Path
from shoal.runtime.process import ProcessController
from shoal.runtime.records import RunState, RuntimeConfig, TaskConfig

async def main() -> None:
    data, launcher, parent, resolv = sys.argv[1:5]
    ctl = ProcessController(RuntimeConfig(data_dir=Path(data), launcher_path=launcher,
                                          cgroup_parent=parent, resolv_conf=resolv))
    try:
        await ctl.start(TaskConfig("dflt", "h", ("cat", "/etc/resolv.conf",
                                                  "/run/systemd/resolve/stub-resolv.conf"),
                                   {"PATH": "/usr/bin:/bin"}, ""))
        while ctl.status("dflt").state is not RunState.EXITED:
            await asyncio.sleep(0.01)
        print(ctl.status("dflt").exit_code, repr("".join(line.line + "|"
              for line in ctl.read_logs("dflt"))))
        await ctl.remove("dflt")
    finally:
        await ctl.close()

asyncio.run(main())
"""


def test_the_default_images_resolv_conf_a_symlink_into_the_hosts_run_gets_the_tasks_file(
    tmp_path: Path, data_dir: Path, launcher_bin: str
) -> None:
    """On a host whose /etc/resolv.conf -> ../run/systemd/resolve/stub-resolv.conf (systemd-
    resolved), a default-image task (the host's /etc bound read-only, its own /run) reads its
    resolv.conf through the link: the file is made at the link's end in the task's /run
    (before: the bind was skipped as missing, leaving the link dangling and no DNS setup).
    A host /etc without hostname still starts the task (nothing can be made in the read-only
    /etc: that bind is left out, as before)."""
    upper, work = tmp_path / "etc-upper", tmp_path / "etc-work"
    upper.mkdir()
    work.mkdir()
    (upper / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    os.mknod(upper / "hostname", stat.S_IFCHR, 0)  # (an overlay whiteout: a host without one)
    resolv = tmp_path / "node-resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-ec",
         f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc; "
         'exec "$@"', "sh", sys.executable, "-c", _DEFAULT_IMAGE_TASK, str(data_dir),
         launcher_bin, CGROUP_PARENT, str(resolv)],
        capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "0 'nameserver 192.0.2.53|nameserver 192.0.2.53|'", res
