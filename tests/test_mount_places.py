"""Where a mount on a path lands in an image, read from its layers without a mount or root
(shoal.runtime.layers ``resolve_in_layers``, the launcher's rule: runc's securejoin), and what
uses it: the init layer's placement of a task's hosts/hostname/resolv.conf
(``rootfs.init_file_place``) and the image's passwd/group as user resolution reads them
(``rootfs.read_rootfs_file``). The launcher's own walk is checked with real tasks in
tests/test_mount_targets.py. Each test names the property it checks.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from shoal.runtime.layers import resolve_in_layers
from shoal.runtime.rootfs import init_file_place, read_rootfs_file


def _whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR, 0)


@pytest.fixture
def layers(tmp_path: Path) -> list[Path]:
    """Two layers, top first. Lower: /etc/{passwd,resolv.conf -> ../run/.../stub-resolv.conf},
    /var -> /x (absolute, dangling), /up -> ../../../x (climbing), /loop -> loop, /f (a file).
    Upper: /etc/hosts -> hostname (relative, to a real file), /etc/hostname."""
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "passwd").write_text("root:x:0:0::/:/bin/sh\n")
    (lower / "etc" / "resolv.conf").symlink_to("../run/systemd/resolve/stub-resolv.conf")
    (lower / "var").symlink_to("/x")
    (lower / "up").symlink_to("../../../x")
    (lower / "loop").symlink_to("loop")
    (lower / "f").write_text("")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "hostname").write_text("img\n")
    (upper / "etc" / "hosts").symlink_to("hostname")
    return [upper, lower]


@pytest.mark.parametrize(("path", "lands", "missing_from"), [
    ("/etc/passwd", "/etc/passwd", None),
    ("/etc/resolv.conf", "/run/systemd/resolve/stub-resolv.conf", 0),  # dangling: made
    ("/etc/hosts", "/etc/hostname", None),  # (a link in the upper to a file there)
    ("/var/lib/x", "/x/lib/x", 0),  # absolute: from the image's root
    ("/up/a", "/x/a", 0),  # climbing: clamped at the root
    ("/etc/../../../../etc/passwd", "/etc/passwd", None),
    ("/f/below", "/f/below", 1),  # through a file: the start fails there (ENOTDIR)
])
def test_a_path_lands_at_the_end_of_the_images_links_never_above_its_root(
    layers: list[Path], path: str, lands: str, missing_from: int | None
) -> None:
    found = resolve_in_layers(layers, path)
    assert found is not None
    assert found[0] == lands
    stats = found[1]
    first_missing = next((i for i, st in enumerate(stats) if st is None), None)
    assert first_missing == missing_from


def test_a_symlink_loop_is_no_place(layers: list[Path]) -> None:
    assert resolve_in_layers(layers, "/loop/x") is None


def test_the_init_files_sit_at_the_links_end_or_shadow_the_link_when_it_cannot_hold_one(
    layers: list[Path], tmp_path: Path
) -> None:
    """resolv.conf at the dangling link's end (the image's /run lacks: 0755 made); hosts
    (-> hostname, a file) at hostname's place; a link ending in a directory, or looping,
    is shadowed by the file at its own path."""
    assert init_file_place(layers, "etc/resolv.conf") == (
        "run/systemd/resolve/stub-resolv.conf", [(0o755, 0, 0)] * 3)
    assert init_file_place(layers, "etc/hosts")[0] == "etc/hostname"
    (layers[0] / "etc" / "dir").mkdir()
    (layers[0] / "etc" / "todir").symlink_to("dir")
    (layers[0] / "etc" / "looped").symlink_to("/loop")
    assert init_file_place(layers, "etc/todir") == ("etc/todir", [(0o755, 0, 0)])
    assert init_file_place(layers, "etc/looped") == ("etc/looped", [(0o755, 0, 0)])


def test_passwd_is_read_through_the_images_links_never_the_hosts(
    layers: list[Path], tmp_path: Path
) -> None:
    """An /etc -> usr/etc image's passwd is read through the link; a passwd linked to a host
    path (absolute, climbing) reads the image's own file at that path, or nothing — never
    the host's; a whiteout in the upper layer deletes it."""
    host = tmp_path / "host-passwd"
    host.write_text("host-secret:x:0:0::/:/bin/sh\n")
    upper, lower = layers
    assert read_rootfs_file(layers, "etc/passwd").startswith("root:")
    (upper / "etc" / "group").symlink_to(str(host))
    (upper / "etc" / "shadow").symlink_to("../../../../../../../.." + str(host))
    assert read_rootfs_file(layers, "etc/group") == ""
    assert read_rootfs_file(layers, "etc/shadow") == ""
    (lower / str(host).lstrip("/")).parent.mkdir(parents=True)
    (lower / str(host).lstrip("/")).write_text("image-own\n")
    assert read_rootfs_file(layers, "etc/group") == "image-own\n"
    assert read_rootfs_file(layers, "etc/shadow") == "image-own\n"
    _whiteout(upper / "etc" / "passwd")
    assert read_rootfs_file(layers, "etc/passwd") == ""
    other = [tmp_path / "l2"]
    (other[0] / "usr" / "etc").mkdir(parents=True)
    (other[0] / "usr" / "etc" / "passwd").write_text("app:x:1000:1000::/:/bin/sh\n")
    (other[0] / "etc").symlink_to("usr/etc")
    assert read_rootfs_file(other, "etc/passwd").startswith("app:")


def _deep_link_image(layer: Path, depth: int, pairs: int) -> None:
    """A malicious image's /etc: a link to /a/a/.../a/l (``depth`` directories), where l ->
    x/../x/../.../l (``pairs`` times x/.., x a directory beside it): a lookup through it
    loops 40 times, each pass walking ``2 * pairs`` components deep in the image."""
    deep = layer.joinpath(*["a"] * depth)
    (deep / "x").mkdir(parents=True)
    (layer / "etc").symlink_to("/" + "/".join(["a"] * depth) + "/l")
    (deep / "l").symlink_to("/".join(["x/.."] * pairs) + "/l")


def test_a_lookup_costs_a_bounded_number_of_reads_whatever_the_images_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lookup reads each layer at most once per component walked, and walks at most 4096
    components (the launcher's bound): deep directories and links full of ``x/..`` cannot
    make the agent (whose event loop runs it before every start of the image's tasks) read
    its layers millions of times (before: each ``..`` walked the whole path again, ~400,000
    lstat calls and seconds here, hours with longer links)."""
    layer = tmp_path / "layer"
    _deep_link_image(layer, depth=100, pairs=100)
    calls = 0
    real_lstat = os.lstat

    def counting_lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        nonlocal calls
        calls += 1
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", counting_lstat)
    assert resolve_in_layers([layer], "/etc/hosts") is None  # (a loop: the start fails there)
    assert calls <= 4096 + 1, calls


def test_a_builds_lookup_of_an_images_path_is_bounded_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COPY --from / RUN --mount from= read an image's files through the same kind of walk
    (LayeredFS.lookup, run in the build's threads): the same malicious links give up after
    the same bound (before: ~400,000 lstat calls here, and a build thread busy for hours
    with longer links)."""
    from shoal.runtime.buildstages import LayeredFS

    layer = tmp_path / "layer"
    _deep_link_image(layer, depth=100, pairs=100)
    (layer / "etc2").mkdir()
    (layer / "etc2" / "f").write_text("f")
    fs = LayeredFS([layer])
    calls = 0
    real_lstat = os.lstat

    def counting_lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        nonlocal calls
        calls += 1
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", counting_lstat)
    assert fs.lookup("/etc/hosts") is None
    assert calls <= 2 * 4096 + 1, calls
    found = fs.lookup("/a/a/../../etc2/./f")
    assert found is not None and found[0] == "/etc2/f" and found[1] == [layer / "etc2" / "f"]


def test_a_build_runs_mount_stubs_cost_one_walk_per_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stubs a RUN's mount leaves to remove (computed on the agent's event loop) come
    from one walk of the target: a base whose /x -> /a/.../a/l (300 deep) and l -> m/m/...
    (300 missing) costs a few hundred reads, not one walk per missing component (before:
    ~90,000 lstat calls, seconds here; minutes with the longest paths an image can hold,
    the agent frozen for each RUN --mount so placed)."""
    from shoal.runtime.buildmounts import stub_paths

    layer = tmp_path / "layer"
    deep = layer.joinpath(*["a"] * 300)
    deep.mkdir(parents=True)
    (layer / "x").symlink_to("/" + "/".join(["a"] * 300) + "/l")
    (deep / "l").symlink_to("/".join(["m"] * 300))
    calls = 0
    real_lstat = os.lstat

    def counting_lstat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        nonlocal calls
        calls += 1
        return real_lstat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", counting_lstat)
    stubs = stub_paths([layer], ["/x/t"])
    assert calls <= 2 * 700, calls
    below = "/".join(["a"] * 300)
    assert stubs[0] == below + "/" + "/".join(["m"] * 300) + "/t"
    assert stubs[-1] == below + "/m" and len(stubs) == 301
