"""`shoal cp`: copy files and directories between this machine and a running task, on whichever
node runs it (`docker cp`, `kubectl cp`).

Owns: the command's arguments, Docker's rules for where a copy lands, and the tar streams
both ways. Must not touch: the agent (only its exec API, through shoal.cli.execcli's session),
other commands.

As `kubectl cp` does, the copy runs ``tar`` inside the task through `shoal exec` — as root of
the task (uid 0, with the task's capabilities), from the task's ``/`` — so it needs a ``tar``
in the task's image (busybox's will do) and can reach nothing outside the task: the agent
never reads or writes a task's files itself. A relative task path is taken from the task's
``/``, as Docker's.

Where a copy lands (Docker's rules): out of a task, a file goes to DEST, or into DEST when
that is a directory; a directory becomes DEST when DEST does not exist, else goes into it;
``SRC/.`` copies the directory's contents into DEST (made if missing). Into a task the same,
with the task's DEST probed by ``test -d``. ``-`` as DEST writes the tar archive to stdout;
as SRC it reads one from stdin and unpacks it into the task's directory DEST.

What comes out of a task is untrusted: it is unpacked by tarfile's ``tar`` filter's rules (no
absolute names, nothing through ``..`` or through a link that leads out of the destination,
no setuid bits) plus checks by name (``_Untrusted``: hard links only within the archive)
and device files are refused, then merged into place never through a link already there;
files get the caller's owner unless ``-a/--archive``. What goes in is owned by root of
the task unless ``-a``.

Errors: CliError naming the path that is missing or of the wrong kind, or tar's own message.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import posixpath
import shutil
import stat
import sys
import tarfile
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, BinaryIO

from shoal.cli.client import Client
from shoal.cli.errors import CliError
from shoal.cli.output import decimal_size

NO_TAR = ("the task has no tar: `shoal cp` runs tar inside the task, as `kubectl cp` does "
          "(an image with busybox or coreutils' tar has one)")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "cp", help="copy files between this machine and a running task, on whichever node "
        "runs it (docker cp)",
        usage="%(prog)s [OPTIONS] TASK:SRC_PATH DEST_PATH|-\n"
              "       %(prog)s [OPTIONS] SRC_PATH|- TASK:DEST_PATH",
        description="Copy a file or directory out of a running task or into it. TASK is a "
        "task id, a unique prefix of one, SERVICE.SLOT or SERVICE.SLOT.ID; a local path "
        "with a colon is written ./a:b. Runs tar in the task (as kubectl cp).")
    p.add_argument("-a", "--archive", action="store_true",
                   help="keep the files' uid and gid (default: root's in the task, yours "
                   "here)")
    p.add_argument("-L", "--follow-link", action="store_true",
                   help="copy what a symbolic link SRC_PATH points to, not the link")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="do not print the amount copied")
    p.add_argument("src", metavar="SRC")
    p.add_argument("dest", metavar="DEST")


def split(arg: str) -> tuple[str | None, str]:
    """(task, path) of a TASK:PATH argument, (None, path) of a local one (Docker's rule: a
    path that starts with / or . or has no colon is local)."""
    if arg.startswith(("/", ".")) or ":" not in arg:
        return None, arg
    task, _, path = arg.partition(":")
    if not task:
        raise CliError(f"{arg!r}: a task is named before the colon (TASK:PATH)")
    return task, path


def run(c: Client, args: argparse.Namespace) -> None:
    (src_task, src), (dest_task, dest) = split(args.src), split(args.dest)
    if (src_task is None) == (dest_task is None):
        raise CliError("copying between two tasks or two local paths is not supported: "
                       "one of SRC and DEST must be TASK:PATH")
    if src_task is not None:
        size = copy_out(c, src_task, src, dest, args)
        where = "STDOUT" if dest == "-" else dest
    else:
        assert dest_task is not None
        size = copy_in(c, src, dest_task, dest, args)
        where = f"{dest_task}:{_in_task(dest)}"
    if not args.quiet and "-" not in (args.src, args.dest):
        print(f"Successfully copied {decimal_size(size, 3)} to {where}", file=sys.stderr)


def _in_task(path: str) -> str:
    """A task path as tar in the task sees it: from its ``/``."""
    norm = posixpath.normpath("/" + path.lstrip("/"))  # (not "//x": normpath keeps two)
    return norm + ("/" if path.endswith("/") and norm != "/" else "")


def _exec(c: Client, task: str, cmd: list[str], stdin_fd: int | None,
          stdout: BinaryIO) -> tuple[int, str]:
    """Run ``cmd`` in the task as its root from ``/``: (exit status, its stderr)."""
    import asyncio

    from shoal.cli.execcli import session

    request = {"cmd": cmd, "tty": False, "stdin": stdin_fd is not None, "user": "0:0",
               "workdir": "/", "env": {}, "rows": 24, "cols": 80}
    err = io.BytesIO()
    code = asyncio.run(session(c, task, request, stdin_fd=stdin_fd, resize=False,
                               stdout=stdout, stderr=err))
    return code, err.getvalue().decode(errors="replace").strip()


def _failed(what: str, code: int, stderr: str) -> CliError:
    if code == 127 or "executable file not found" in stderr or "tar: not found" in stderr:
        return CliError(NO_TAR)
    lines = [line.removeprefix("tar: ") for line in stderr.splitlines()
             if "Exiting with failure" not in line and "error exit delayed" not in line]
    return CliError(f"{what}: {'; '.join(lines) or f'tar exited {code}'}")


# --------------------------------------------------------------------------- out of a task

def copy_out(c: Client, task: str, src: str, dest: str, args: argparse.Namespace) -> int:
    path = _in_task(src)
    contents = path.endswith("/.") or path == "/"
    parent, name = (path.rstrip("."), ".") if contents else posixpath.split(path.rstrip("/"))
    cmd = ["tar", "-c", "-f", "-", *(["-h"] if args.follow_link else []), "-C", parent or "/",
           "--", name]  # (a name like -rf is no option)
    with tempfile.TemporaryFile() as tar:
        code, stderr = _exec(c, task, cmd, None, tar)
        if code != 0:
            raise _failed(f"cannot copy {task}:{path}", code, stderr)
        size = tar.tell()
        tar.seek(0)
        if dest == "-":
            shutil.copyfileobj(tar, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return size
        unpack(tar, Path(dest), name, contents, args.archive, dest.endswith("/"))
    return size


def _refused(why: str) -> CliError:
    """A member of a task's archive that is not unpacked, and why."""
    return CliError(f"refused what the task sent: {why}")


class _Untrusted:
    """The check of one archive from a task, member by member, as tarfile's ``tar`` filter
    but on every Python shoal runs on (the filters came in 3.11.4; Debian 12's is 3.11.2):
    no absolute names (the leading / stripped), nothing out of the destination (by realpath
    and, not trusting realpath, which long link chains fool before 3.12.11, by name: no
    ``..``, nothing under or over a link of the archive), a hard link only to a regular file
    unpacked before it (the ``tar`` filter checks no hard link: one to /etc/shadow was
    linked, chmodded and written through), no setuid/setgid/sticky or group/other write
    bits, no devices or FIFOs, the owner this user's unless ``keep_owner``."""

    def __init__(self, dest: str, keep_owner: bool) -> None:
        self.dest = os.path.realpath(dest)
        self.keep_owner = keep_owner
        self.links: set[str] = set()
        self.files: set[str] = set()

    def __call__(self, member: tarfile.TarInfo) -> tarfile.TarInfo:
        if member.ischr() or member.isblk() or member.isfifo():
            raise _refused(f"{member.name!r} is a special file")
        name = _plain(member.name.lstrip("/"))
        real = os.path.realpath(os.path.join(self.dest, name))
        parts = name.split("/")
        if (os.path.commonpath([real, self.dest]) != self.dest or name in self.links
                or any("/".join(parts[:i]) in self.links for i in range(1, len(parts)))):
            raise _refused(f"{member.name!r} would be written outside the destination")
        if member.islnk() and _plain(member.linkname) not in self.files:
            raise _refused(f"{member.name!r} is a hard link to {member.linkname!r}, not to a "
                          "file of the archive")
        if member.issym() or member.islnk():
            self.links.add(name)
        elif member.isreg():
            self.files.add(name)
        member = copy.copy(member)
        member.name, member.mode = name, member.mode & 0o755
        if not self.keep_owner:
            member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
        return member


def _plain(name: str) -> str:
    """``name`` normalised, refused if absolute or climbing with ``..``."""
    norm = posixpath.normpath(name)
    if norm.startswith("/") or norm == ".." or norm.startswith("../") or "/../" in norm:
        raise _refused(f"{name!r} would be written outside the destination")
    return norm


def _extract(archive: tarfile.TarFile, staging: Path, keep_owner: bool) -> None:
    """extractall of what ``_Untrusted`` lets through, a directory's mode and times set
    last (as extractall: a 0555 directory's files are unpacked into it first)."""
    check = _Untrusted(str(staging), keep_owner)
    trusted: dict[str, Any] = ({"filter": "fully_trusted"}  # (checked above; no warning)
                               if hasattr(tarfile, "fully_trusted_filter") else {})
    dirs: list[tarfile.TarInfo] = []
    for member in archive:
        member = check(member)
        if member.isdir():
            dirs.append(member)
        archive.extract(member, str(staging), set_attrs=not member.isdir(), **trusted)
    for member in sorted(dirs, key=lambda m: m.name, reverse=True):
        path = os.path.join(staging, member.name)
        archive.chown(member, path, False)
        archive.utime(member, path)
        archive.chmod(member, path)


def unpack(tar: IO[bytes], dest: Path, name: str, contents: bool, keep_owner: bool,
           slash: bool = False) -> None:
    """The task's archive (one top entry ``name``, or ``.`` for ``contents``) placed by
    Docker's rules at ``dest`` (``slash``: written DEST/, so a file needs it a directory):
    unpacked next to where it lands, then moved into place."""
    into_dir = dest.is_dir() and not contents
    target = dest / name if into_dir else dest
    if not target.parent.is_dir():
        raise CliError(f"{target.parent}: no such directory")
    try:
        staging = Path(tempfile.mkdtemp(prefix=".shoal-cp-", dir=target.parent))
    except OSError as exc:
        raise CliError(f"cannot write in {target.parent}: {exc.strerror}") from None
    try:
        with tarfile.open(fileobj=tar, mode="r|") as archive:
            try:
                _extract(archive, staging, keep_owner)
            except (OSError, tarfile.TarError) as exc:  # (x/f then x/f/g, a full disk...)
                raise CliError(f"cannot unpack what the task sent: {exc}") from None
        got = staging if contents else staging / name
        if not (got.exists() or got.is_symlink()):
            raise CliError(f"refused what the task sent: its archive did not hold {name!r}")
        if slash and not dest.is_dir() and not (got.is_dir() and not got.is_symlink()):
            raise CliError(f"{dest}/: no such directory")
        if got.is_dir() and not got.is_symlink():
            if into_dir and target.is_symlink():  # (DEST/NAME is the task's name: a link
                target.unlink()                     # there is replaced, never followed)
            if target.exists() and not target.is_dir():
                raise CliError(f"cannot copy a directory onto the file {target}")
            try:
                _merge(got, target)
            except OSError as exc:
                raise CliError(f"cannot copy to {target}: {exc}") from None
        else:
            if target.is_dir() and not target.is_symlink():
                raise CliError(f"cannot copy a file onto the directory {target}")
            os.replace(got, target)
    finally:
        _make_removable(staging)
        shutil.rmtree(staging, ignore_errors=True)


def _merge(src: Path, dst: Path) -> None:
    """Copy the unpacked directory ``src`` into ``dst`` as tar places entries: a directory
    merges into a directory there, anything else replaces what is there — a link at ``dst``'s
    entries (a previous copy's) is replaced, never followed. Modes, times and (as root) owners
    come with it; a directory the task sent unreadable (0000) is read all the same."""
    st = src.lstat()
    src.chmod(stat.S_IMODE(st.st_mode) | 0o700)
    if not dst.is_dir():
        dst.mkdir()
    for entry in os.scandir(src):
        s, d = Path(entry.path), dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            if d.is_symlink() or (d.exists() and not d.is_dir()):
                d.unlink()
            _merge(s, d)
            continue
        if d.is_dir() and not d.is_symlink():
            raise CliError(f"cannot copy a file onto the directory {d}")
        if d.is_symlink() or d.exists():
            d.unlink()
        shutil.copy2(s, d, follow_symlinks=False)
        _own(s.lstat(), d)
    shutil.copystat(src, dst, follow_symlinks=False)
    dst.chmod(stat.S_IMODE(st.st_mode))
    _own(st, dst)


def _own(st: os.stat_result, path: Path) -> None:
    if os.geteuid() == 0:
        os.lchown(path, st.st_uid, st.st_gid)


def _make_removable(staging: Path) -> None:
    """Owner rwx on every directory left in ``staging`` (a 0000 one from the task stops
    rmtree of a user without CAP_DAC_OVERRIDE)."""
    for root, dirs, _ in os.walk(staging, onerror=lambda _: None):
        for d in dirs:
            path = os.path.join(root, d)
            if not os.path.islink(path):
                with contextlib.suppress(OSError):
                    os.chmod(path, 0o700)


# ------------------------------------------------------------------------------ into a task

def copy_in(c: Client, src: str, task: str, dest: str, args: argparse.Namespace) -> int:
    path = _in_task(dest)
    if src == "-":  # (a tar archive on stdin, unpacked into the task's directory DEST)
        return _untar_in(c, task, path, 0, args)
    local = Path(src)
    if not (local.exists() or local.is_symlink()):
        raise CliError(f"{src}: no such file or directory")
    contents = src.endswith("/.") or src == "."
    name = local.name  # (-L: the target under the link's name, as Docker's)
    if not contents and local.is_symlink() and args.follow_link:
        local = local.resolve()
    probe, _ = _exec(c, task, ["test", "-d", path], None, io.BytesIO())
    if probe not in (0, 1):  # (no `test`: take DEST as it is written)
        probe = 0 if path.endswith("/") else 1
    if probe == 0:  # an existing directory: into it
        into, top = path, ("." if contents else name)
    elif path.endswith("/") and not local.is_dir():
        raise CliError(f"{task}:{path}: no such directory")
    else:  # DEST is the copy's own name, in its parent
        into, top = posixpath.split(path.rstrip("/"))
        if contents and not local.is_dir():
            raise CliError(f"{src}: not a directory")
    r, w = os.pipe()
    sent = [0]
    failure: list[BaseException] = []

    def pack() -> None:
        try:
            with os.fdopen(w, "wb") as out, tarfile.open(fileobj=out, mode="w|") as archive:
                def owner(info: tarfile.TarInfo) -> tarfile.TarInfo:
                    if not args.archive:
                        info.uid = info.gid = 0
                        info.uname = info.gname = "root"
                    if info.isreg():
                        sent[0] += info.size
                    return info
                archive.add(str(local), arcname=top, filter=owner)
        except BaseException as exc:  # (reported after the session: a broken pipe there)
            failure.append(exc)

    packer = threading.Thread(target=pack, daemon=True)
    packer.start()
    try:
        _untar_in(c, task, into or "/", r, args, (failure, src))
    finally:
        os.close(r)
        packer.join(timeout=5)
    return sent[0]


def _untar_in(c: Client, task: str, into: str, stdin_fd: int, args: argparse.Namespace,
              packing: tuple[list[BaseException], str] | None = None) -> int:
    """tar unpacking what comes on ``stdin_fd`` into the task's directory ``into``."""
    cmd = ["tar", "-x", "-f", "-", "-C", into]  # (root of the task: the archive's owners)
    code, stderr = _exec(c, task, cmd, stdin_fd, io.BytesIO())
    if packing is not None and packing[0]:
        raise CliError(f"cannot read {packing[1]}: {packing[0][0]}")
    if code != 0:
        raise _failed(f"cannot copy to {task}:{into}", code, stderr)
    return 0
