"""Layer tarballs into directories: decompression and safe extraction into overlayfs form.

Owns: reading a layer blob as a tar stream (``open_layer``: gzip, zstd through the ``zstd``
command, plain tar; detected from the content) and unpacking it into an empty directory
(``extract_layer``): ``.wh.NAME`` becomes an overlayfs whiteout (a 0/0 character device),
``.wh..wh..opq`` an opaque directory (``trusted.overlay.opaque=y``); member names must be
relative without ``..``, no path is created through a symlink, hard links must point inside
the same layer, device nodes are skipped, symlinks are created as they are and never followed.
And reading that form back without a mount (``is_whiteout``, ``is_opaque``, ``merged_child``:
overlayfs's merge rule, which anonymous volumes' fill and the builder's COPY --from share;
``resolve_in_layers``: where a mount on a path lands, the launcher's rule, and
``merged_entry``: what is there — which the init layer's placement, user resolution, a
volume's fill and a build RUN's mount stubs share).
Must not touch: anything outside the directory it is given (the image store,
shoal.runtime.images, decides where layers go and renames them into place; the builder,
shoal.runtime.build, unpacks build contexts with it).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from shoal.runtime.errors import InvalidImage

_CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_OPAQUE = ".wh..wh..opq"


@contextlib.contextmanager
def open_layer(blob: Path, zstd: str = "zstd") -> Iterator[IO[bytes]]:
    """A layer blob's tar stream: gzip (Python's), zstd (the ``zstd`` command, ``zstd``:
    its path; a separate process, streaming) or plain tar, told apart by the content.
    InvalidImage if zstd is missing or fails."""
    with blob.open("rb") as fh:
        head = os.pread(fh.fileno(), 4, 0)  # leaves the offset at 0 for zstd's stdin
        if head.startswith(GZIP_MAGIC):
            import gzip

            with gzip.open(fh, "rb") as gz:
                yield gz  # type: ignore[misc]
            return
        if head.startswith(ZSTD_MAGIC):
            try:
                proc = subprocess.Popen([zstd, "-dcq"], stdin=fh,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            except OSError as exc:  # fmt: skip
                raise InvalidImage(
                    f"a zstd layer needs the zstd command (Debian: apt install zstd): {exc}"
                ) from exc
            assert proc.stdout is not None and proc.stderr is not None
            try:
                yield proc.stdout
                proc.stdout.read()
            finally:
                proc.stdout.close()
                err = proc.stderr.read().decode(errors="replace").strip()
                proc.stderr.close()
                if proc.wait() != 0:
                    raise InvalidImage(f"zstd failed: {err}")
            return
        yield fh


def _clean_name(name: str) -> str:
    """A member name as a safe relative path ("" for the root itself). InvalidImage if it is
    absolute or has a '..' component."""
    if name.startswith("/"):
        raise InvalidImage(f"absolute path in layer: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidImage(f"'..' in layer path: {name!r}")
    if any("\0" in p for p in parts):
        raise InvalidImage(f"NUL in layer path: {name!r}")
    return "/".join(parts)


def extract_layer(stream: IO[bytes], dest: Path) -> None:
    """Unpack one layer tarball (a stream) into the empty directory ``dest``, safely, with
    whiteouts converted to overlayfs form. See the module docstring."""
    real_dirs: set[str] = {""}
    dir_meta: list[tuple[str, tarfile.TarInfo]] = []

    def parent_dir(rel: str) -> str:
        """Make sure every parent of rel is a real directory of this layer; return its path."""
        parent = posixpath.dirname(rel)
        if parent in real_dirs:
            return parent
        walked = ""
        for part in parent.split("/"):
            walked = f"{walked}/{part}" if walked else part
            if walked in real_dirs:
                continue
            full = dest / walked
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                os.mkdir(full, 0o755)
            else:
                if not stat.S_ISDIR(st.st_mode):
                    raise InvalidImage(f"layer path {rel!r} goes through a non-directory")
            real_dirs.add(walked)
        return parent

    def clear(full: Path) -> None:
        """Remove what is at full (a later entry replaces an earlier one), unless a directory."""
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                raise InvalidImage(f"layer replaces directory {full.name!r} with a non-directory")
            os.unlink(full)

    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115 (the with below closes it)
    except tarfile.TarError as exc:
        raise InvalidImage(f"not a tar archive: {exc}") from exc
    with tar:
        try:
            for member in tar:
                rel = _clean_name(member.name)
                if not rel:
                    continue
                parent = parent_dir(rel)
                base = posixpath.basename(rel)
                full = dest / rel
                if base == _OPAQUE:
                    os.setxattr(dest / parent if parent else dest, "trusted.overlay.opaque",
                                b"y")  # fmt: skip
                    continue
                if base.startswith(".wh."):
                    gone = base[4:]
                    if gone in ("", ".", ".."):  # (.wh... would have removed dest/..)
                        raise InvalidImage(f"whiteout {rel!r} names no entry")
                    gone_rel = f"{parent}/{gone}" if parent else gone
                    target = dest / gone_rel
                    if os.path.lexists(target):
                        # (islink first: isdir follows a link, a stat of a host path)
                        if not os.path.islink(target) and os.path.isdir(target):
                            shutil.rmtree(target)
                        else:
                            os.unlink(target)
                    # (no longer directories of this layer: a later entry at that path may
                    # be a symlink, and nothing may go through it or be chmod'ed through it)
                    real_dirs.difference_update(
                        [d for d in real_dirs if d == gone_rel or d.startswith(gone_rel + "/")])
                    os.mknod(target, stat.S_IFCHR | 0o600, os.makedev(0, 0))
                    continue
                if member.isdir():
                    if rel not in real_dirs:
                        try:
                            st = os.lstat(full)
                            if not stat.S_ISDIR(st.st_mode):
                                os.unlink(full)
                                os.mkdir(full, 0o755)
                        except FileNotFoundError:
                            os.mkdir(full, 0o755)
                        real_dirs.add(rel)
                    dir_meta.append((rel, member))
                    continue
                clear(full)
                if member.isreg():
                    src = tar.extractfile(member)
                    fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600)  # fmt: skip
                    with os.fdopen(fd, "wb") as out:
                        if src is not None:
                            shutil.copyfileobj(src, out, _CHUNK)
                elif member.issym():
                    os.symlink(member.linkname, full)
                elif member.islnk():
                    target_rel = _clean_name(member.linkname)
                    parent_dir(target_rel)
                    target = dest / target_rel
                    if not os.path.lexists(target) or (
                        not os.path.islink(target) and os.path.isdir(target)
                    ):
                        raise InvalidImage(f"hard link {rel!r} to a missing or directory entry")
                    os.link(target, full, follow_symlinks=False)
                    continue  # shares the target's inode: its owner and mode already
                elif member.isfifo():
                    os.mkfifo(full, 0o600)
                else:
                    continue  # device nodes (and anything else): never created
                _apply_meta(full, member)
        except (tarfile.TarError, EOFError) as exc:
            raise InvalidImage(f"corrupt layer: {exc}") from exc
        except OSError as exc:
            raise InvalidImage(f"cannot unpack layer: {exc}") from exc
    for rel, member in reversed(dir_meta):  # deepest last-seen first: children are done
        if rel in real_dirs:  # (a directory a later whiteout removed is none of this layer's)
            _apply_dir_meta(dest / rel, member)


def _apply_dir_meta(path: Path, member: tarfile.TarInfo) -> None:
    """A directory's owner, mode and times, through a descriptor opened without following a
    symlink: whatever is at ``path`` now, the change lands on a directory of the layer or
    nowhere."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise InvalidImage(f"layer directory {member.name!r} is no longer one: {exc}") from None
    try:
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, member.mode & 0o7777)
        with contextlib.suppress(OSError):
            os.utime(fd, (member.mtime, member.mtime))
    finally:
        os.close(fd)


def _apply_meta(path: Path, member: tarfile.TarInfo) -> None:
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(path, member.mode & 0o7777)
    with contextlib.suppress(OSError):
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


# ------------------------------------------------------------- reading the overlay form back
def is_whiteout(st: os.stat_result) -> bool:
    """Whether an entry is an overlayfs whiteout (a 0/0 character device: deleted below)."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_opaque(path: Path) -> bool:
    """Whether a directory is opaque (hides what the layers below have at its path)."""
    try:
        return os.getxattr(path, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def merged_child(dirs: list[Path], name: str) -> tuple[os.stat_result, list[Path]] | None:
    """The merged view's entry ``name`` in the directory the layer directories ``dirs`` (top
    first) make, as overlayfs merges them: its stat and the paths that make it (several for a
    directory that lower layers add to, one otherwise), or None when absent or whited out."""
    found: list[Path] = []
    first: os.stat_result | None = None
    for d in dirs:
        p = d / name
        try:
            st = os.lstat(p)
        except OSError:
            continue
        if is_whiteout(st):  # deleted from here down
            break
        if first is None:
            first = st
        if not stat.S_ISDIR(st.st_mode):
            if not found:
                found.append(p)
            break  # (a non-directory hides what is below; below a directory it is hidden)
        found.append(p)
        if is_opaque(p):
            break
    if first is None or not found:
        return None
    return first, found


MAX_LINKS = 40  # symlinks followed in one lookup (Linux's limit, the launcher's too)
MAX_STEPS = 4096  # path components walked in one lookup (the launcher's make_in_root bound)


def resolve_in_layers(layers: list[Path], path: str
                      ) -> tuple[str, list[os.stat_result | None]] | None:
    """Where a mount on the absolute ``path`` lands in the merged image (layer directories,
    top first), by the launcher's rule (its ``make_in_root``: runc's securejoin): every
    symlink followed inside the image — an absolute one from its root, ``..`` never above
    it, the last one and a dangling one too — and a missing component kept as written (the
    mount makes it). Returns that path and the merged stat of each of its components (None
    from the first missing one on, or below a non-directory), or None after MAX_LINKS links
    (a loop: the start fails there) or MAX_STEPS components (the launcher's bound). Each
    component walked reads each layer at most once (``..`` goes back to the directories
    kept for the one before): an image's links cannot make it read the layers for long."""
    todo = [p for p in reversed(path.split("/")) if p]  # (a stack: the next one last)
    # the components resolved so far: (name, merged stat, the directories it is made of)
    done: list[tuple[str, os.stat_result | None, list[Path]]] = []
    hops = steps = 0
    while todo:
        name = todo.pop()
        steps += 1
        if steps > MAX_STEPS:
            return None
        if name == ".":
            continue
        if name == "..":
            if done:
                done.pop()
            continue
        dirs = done[-1][2] if done else list(layers)
        entry = merged_child(dirs, name) if dirs else None
        if entry is not None and stat.S_ISLNK(entry[0].st_mode):
            hops += 1
            if hops > MAX_LINKS:
                return None
            target = os.readlink(entry[1][0])
            if target.startswith("/"):
                done.clear()
            todo += reversed([p for p in target.split("/") if p])
            continue
        below = entry[1] if entry is not None and stat.S_ISDIR(entry[0].st_mode) else []
        done.append((name, entry[0] if entry is not None else None, below))
    return "/" + "/".join(d[0] for d in done), [d[1] for d in done]


def merged_entry(layers: list[Path], path: str) -> tuple[os.stat_result, list[Path]] | None:
    """The merged image's entry at the absolute ``path`` as ``merged_child`` gives it (its
    stat, the paths that make it; for "/" the layers themselves), walked without following
    a symlink (a path ``resolve_in_layers`` gave); None when absent."""
    try:
        entry: tuple[os.stat_result, list[Path]] | None = os.lstat(layers[0]), list(layers)
    except (OSError, IndexError):
        return None
    for name in [p for p in path.split("/") if p]:
        if entry is None or not stat.S_ISDIR(entry[0].st_mode):
            return None
        entry = merged_child(entry[1], name)
    return entry
