"""An image's content at a path, copied into a volume: how Docker fills an empty volume on
first use (moby's ``copyExistingContents``: the files, then the directory's own owner and
mode), so a non-root image user owns its ``VOLUME /data``.

Owns: reading the merged view of an image's layers (overlayfs form, top layer first:
whiteouts are 0/0 character devices, opaque directories carry ``trusted.overlay.opaque=y``;
runtime/layers.py writes them) without mounting anything, and copying one directory of it
into a destination directory. Must not touch: mounts, the task's namespaces, cluster state;
the layers (read only).

Safety: the path is resolved inside the image as the task would see it (a symlink on the way,
``/var/run -> /run`` or ``/data -> ../../etc``, stays inside the image's root, as
RESOLVE_IN_ROOT); the source side never follows a symlink out of a layer (each component is
looked up with lstat from a directory already found to be one); the destination side works
only through directory descriptors with ``O_NOFOLLOW``, so nothing is written outside it
(shoal.runtime.taskvols copies into a scratch directory of its own, then renames).
Copied: directories, regular files, symlinks, FIFOs and device nodes, with owner, mode and
modification time, and hard links as hard links (as Docker's copy, containerd's
``fs.CopyDir``: an image of one file linked a million times — a few MB of layer — must not
write a million copies into the volume); not extended attributes. A hard link is made by
its path below ``dest`` from ``dest``'s descriptor, through directories this copy made.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

from shoal.runtime.layers import merged_child, merged_entry, resolve_in_layers

_CHUNK = 1 << 20
_this = threading.local()  # .stop: the Event of the copy this thread makes (copy_image_path)


def _check_stop() -> None:
    stop: threading.Event | None = getattr(_this, "stop", None)
    if stop is not None and stop.is_set():
        raise OSError(errno.ECANCELED, "the fill was stopped (the task's start was cancelled)")


def resolve(layers: list[Path], target: str) -> tuple[os.stat_result, list[Path]] | None:
    """The merged view's entry at the absolute ``target``, symlinks on the way resolved
    inside the image's root (``resolve_in_layers``: where the task's mount lands); None when
    there is none (or a loop)."""
    found = resolve_in_layers(layers, target)
    if found is None or any(st is None for st in found[1]):
        return None
    return merged_entry(layers, found[0])


def copy_image_path(layers: list[Path], target: str, dest: Path,
                    stop: threading.Event | None = None) -> bool:
    """Fill the directory ``dest`` with the image's content at ``target`` (its files, then
    ``dest``'s own owner, mode and time from the image's directory), as Docker fills an
    empty volume; nothing when the image has no directory there. Whether it copied.
    ``stop`` set: OSError(ECANCELED) at the next entry or MiB (the agent stops, or the
    start is cancelled: a copy of a huge directory must not outlive either)."""
    entry = resolve(layers, target)
    if entry is None or not stat.S_ISDIR(entry[0].st_mode):
        return False
    fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    _this.stop = stop
    try:
        _copy_dir(entry[1], fd, "", fd, {})
        _meta(fd, entry[0])
    finally:
        _this.stop = None
        os.close(fd)
    return True


def _copy_dir(srcs: list[Path], dfd: int, rel: str, root: int,
              links: dict[tuple[int, int], str]) -> None:
    """Copy the merged directory ``srcs`` into ``dfd`` (``rel`` below ``root``, the
    destination's top); ``links``: (device, inode) of a source file with more than one
    link → where below ``root`` its first copy is."""
    names: dict[str, None] = {}
    for d in srcs:
        for name in sorted(os.listdir(d)):
            names.setdefault(name)
    for name in names:
        _check_stop()
        entry = merged_child(srcs, name)
        if entry is None:
            continue
        st, paths = entry
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(name, 0o700, dir_fd=dfd)
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=dfd)
            try:
                _copy_dir(paths, sub, f"{rel}{name}/", root, links)
                _meta(sub, st)
            finally:
                os.close(sub)
            continue
        if stat.S_ISLNK(mode):
            os.symlink(os.readlink(paths[0]), name, dir_fd=dfd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd,
                     follow_symlinks=False)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:  # (the same inode: its owner, mode, times)
                os.link(links[key], name, src_dir_fd=root, dst_dir_fd=dfd,
                        follow_symlinks=False)
                continue
            _copy_file(paths[0], name, dfd, st)
            if st.st_nlink > 1:
                links[key] = rel + name
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
            node = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:  # (through its descriptor: never a symlink put there meanwhile)
                if stat.S_IFMT(os.fstat(node).st_mode) == stat.S_IFMT(mode):
                    _meta(node, st, f"/proc/self/fd/{node}")
            finally:
                os.close(node)
        # (a socket: nothing to copy, as Docker's)


def _copy_file(src: Path, name: str, dfd: int, st: os.stat_result) -> None:
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fout = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                       0o600, dir_fd=dfd)
        try:
            while os.sendfile(fout, fin, None, _CHUNK):  # (same as read/write, in the kernel)
                _check_stop()
            _meta(fout, st)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


def _meta(fd: int, st: os.stat_result, path: str | None = None) -> None:
    """Owner, then mode (chown clears set-id bits), then times, of what ``fd`` holds open
    (``path``: a name for it, for an O_PATH descriptor that the f* calls refuse)."""
    if path is None:
        os.fchown(fd, st.st_uid, st.st_gid)
        os.fchmod(fd, stat.S_IMODE(st.st_mode))
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        return
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, stat.S_IMODE(st.st_mode))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def is_empty(path: Path) -> bool:
    """Whether the directory ``path`` has no entries (a missing one counts as empty)."""
    try:
        with os.scandir(path) as it:
            return next(it, None) is None
    except FileNotFoundError:
        return True


__all__ = ["copy_image_path", "is_empty", "resolve"]
