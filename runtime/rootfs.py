"""What a task sees: its root filesystem, /proc, /dev, /sys, mounts and files, its user and its
capabilities, as a mount plan the launcher executes inside the task's mount namespace.

Owns: the plan (pure: computed from the task's config and host facts, no side effects), user
resolution against a rootfs' /etc/passwd and /etc/group, capability names and masks, and the
mount/file types of TaskConfig. Must not touch: the host's mounts (every mount of the plan
happens inside the task's private mount namespace and dies with it; nothing is ever mounted in the
agent's namespace, so nothing can be left in the host's /proc/mounts).

The root filesystem (runc / Nomad exec driver style):

* first a staging tmpfs, mounted on DATA_DIR/mnt inside the task's mount namespace only (on the
  host that directory stays empty; every task has its own tmpfs there): the root's mount point,
  the init layer (the task's own etc/hosts, etc/hostname, etc/resolv.conf; over an image each
  where a mount on it would land, ``init_file_place``: a symlinked /etc or a systemd image's
  resolv.conf link stays the image's) and the task's files (secrets), written by the
  launcher. Nothing of it touches the disk, and the task directory needs no mount points.
* default image (no image): a small tmpfs root, read-only once built, with read-only binds of the
  host's /usr, /etc, /bin, /sbin, /lib* (symlinks like /bin -> usr/bin are recreated as symlinks),
  private writable tmpfs /tmp, /var/tmp and /run; /etc/hosts, /etc/hostname and /etc/resolv.conf
  are the task's own (bound from the init layer), host secrets (/etc/shadow...) are masked.
* image: overlayfs, lowerdir = the init layer over the image's layers, upperdir = TASKDIR/upper
  (the task's writable layer); with ``read_only`` (Docker's --read-only) that mount alone is
  bind-remounted read-only once everything is mounted, just before the pivot.

Then, as Docker does: /proc (the task's sysctls written into it first, then /proc/sys,
/proc/sysrq-trigger... read-only and /proc/kcore, /proc/keys... masked), /dev as a tmpfs with
null, zero, full, random, urandom, tty, a private devpts (/dev/pts, /dev/ptmx), /dev/shm and
/dev/mqueue, and read-only afterwards; /sys read-only;
the user's mounts (bind, volume, tmpfs, in path order); files (secrets) bound read-only from
the staging tmpfs onto their targets (every target resolved inside the root by the launcher,
its symlinks followed there — dangling ones made at their end — never out of it); finally
pivot_root (which detaches the staging tmpfs with the old root: the task reaches only what
was bound or layered from it). Every writable filesystem is
nodev, so a task with CAP_MKNOD cannot use a device node it creates.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from shoal.runtime.kernelparams import ULIMITS, check_sysctl, check_ulimit
from shoal.runtime.launcher import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RDONLY,
    MS_REC,
    Spec,
)
from shoal.runtime.layers import merged_entry, resolve_in_layers

# ---------------------------------------------------------------------------- capabilities

#: Linux capability numbers (linux/capability.h).
CAPABILITIES: dict[str, int] = {
    "CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "FSETID": 4, "KILL": 5,
    "SETGID": 6, "SETUID": 7, "SETPCAP": 8, "LINUX_IMMUTABLE": 9, "NET_BIND_SERVICE": 10,
    "NET_BROADCAST": 11, "NET_ADMIN": 12, "NET_RAW": 13, "IPC_LOCK": 14, "IPC_OWNER": 15,
    "SYS_MODULE": 16, "SYS_RAWIO": 17, "SYS_CHROOT": 18, "SYS_PTRACE": 19, "SYS_PACCT": 20,
    "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_NICE": 23, "SYS_RESOURCE": 24, "SYS_TIME": 25,
    "SYS_TTY_CONFIG": 26, "MKNOD": 27, "LEASE": 28, "AUDIT_WRITE": 29, "AUDIT_CONTROL": 30,
    "SETFCAP": 31, "MAC_OVERRIDE": 32, "MAC_ADMIN": 33, "SYSLOG": 34, "WAKE_ALARM": 35,
    "BLOCK_SUSPEND": 36, "AUDIT_READ": 37, "PERFMON": 38, "BPF": 39, "CHECKPOINT_RESTORE": 40,
}  # fmt: skip

#: Docker's default set: what a task keeps unless cap_add/cap_drop say otherwise.
DEFAULT_CAPABILITIES: tuple[str, ...] = (
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID",
    "SETFCAP", "SETPCAP", "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
)  # fmt: skip


def cap_name(name: str) -> str:
    """Canonical capability name ("net_admin", "CAP_NET_ADMIN" -> "NET_ADMIN"; "ALL").
    Raise ValueError for an unknown one."""
    upper = name.strip().upper()
    upper = upper.removeprefix("CAP_")
    if upper != "ALL" and upper not in CAPABILITIES:
        raise ValueError(f"unknown capability: {name!r}")
    return upper


def capability_mask(cap_add: Iterable[str] = (), cap_drop: Iterable[str] = (),
                    available: int | None = None) -> int:
    """The capability bits a task keeps, Docker's rule (moby's TweakCapabilities): ALL in
    cap_add is every capability but cap_drop's; else ALL in cap_drop is cap_add alone; else
    Docker's default set minus cap_drop, plus cap_add. ``available``: the bits this node can
    give (its own bounding set): ALL means those; a named capability outside them is a
    ValueError naming it (the start would fail with EPERM in capset)."""
    add = {cap_name(c) for c in cap_add}
    drop = {cap_name(c) for c in cap_drop}
    everything = set(CAPABILITIES) if available is None else \
        {n for n, bit in CAPABILITIES.items() if available >> bit & 1}
    if "ALL" in add:
        keep = everything - drop
    elif "ALL" in drop:
        keep = set(add)
    else:
        keep = (set(DEFAULT_CAPABILITIES) - drop) | add
    if available is not None:
        missing = sorted(n for n in add - {"ALL"} if n not in everything)
        if missing:
            raise ValueError(f"{', '.join(missing)}: not in this node's capability bounding "
                             "set (the agent runs without it), so no task here can have it")
        keep &= everything  # (the defaults a restricted node lacks: as runc, left out)
    mask = 0
    for name in keep:
        mask |= 1 << CAPABILITIES[name]
    return mask


def bounding_set(status: str) -> int | None:
    """This process's capability bounding set from /proc/self/status text (None if absent)."""
    for line in status.splitlines():
        if line.startswith("CapBnd:"):
            return int(line.split()[1], 16)
    return None


# ----------------------------------------------------------------------------------- users

_NAME_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?")


@dataclass(frozen=True)
class User:
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups (the primary one included)
    home: str = "/"


def _table(text: str, width: int) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            parts = line.split(":")
            if len(parts) >= width:
                rows.append(parts)
    return rows


def resolve_user(spec: str, passwd: str, group: str, group_add: Iterable[str] = ()) -> User:
    """Resolve ``user``, ``uid``, ``user:group`` or ``uid:gid`` against passwd/group texts (the
    task's rootfs' files), as Docker does: a numeric uid not in passwd runs with gid 0;
    supplementary groups come from /etc/group membership, then ``group_add`` (names or
    numbers: Docker's --group-add). Raise ValueError if a *name* is unknown (a number never
    needs to exist)."""
    users = _table(passwd, 7)
    groups = _table(group, 4)
    if not spec:
        spec = "0"
    name, _, grp = spec.partition(":")
    if not name or (":" in grp):
        raise ValueError(f"bad user {spec!r}: expected user, uid, user:group or uid:gid")
    entry: list[str] | None = None
    if name.isdigit():
        uid = int(name)
        entry = next((u for u in users if u[2] == name), None)
    else:
        if not _NAME_RE.fullmatch(name):
            raise ValueError(f"bad user name {name!r}")
        entry = next((u for u in users if u[0] == name), None)
        if entry is None:
            raise ValueError(f"no user {name!r} in the task's /etc/passwd")
        uid = int(entry[2])
    gid = int(entry[3]) if entry is not None and entry[3].isdigit() else 0
    home = entry[5] if entry is not None and entry[5] else "/"
    if grp:
        if grp.isdigit():
            gid = int(grp)
        else:
            g = next((row for row in groups if row[0] == grp), None)
            if g is None:
                raise ValueError(f"no group {grp!r} in the task's /etc/group")
            gid = int(g[2])
    extra = [gid]
    if entry is not None and not grp:
        for row in groups:
            if entry[0] in row[3].split(",") and row[2].isdigit():
                extra.append(int(row[2]))
    for more in group_add:
        if more.isdigit():
            extra.append(int(more))
            continue
        g = next((row for row in groups if row[0] == more and row[2].isdigit()), None)
        if g is None:
            raise ValueError(f"no group {more!r} in the task's /etc/group (--group-add)")
        extra.append(int(g[2]))
    return User(uid, gid, tuple(dict.fromkeys(extra)), home)


def read_rootfs_file(layers: list[Path], rel: str) -> str:
    """A text file of a layered rootfs (top layer first) as the task sees it: the image's
    symlinks on the way followed inside it (an /etc -> usr/etc, an /etc/passwd ->
    ../usr/share/...: ``resolve_in_layers``), never out of it; "" if absent, deleted or not
    a regular file. Used for etc/passwd and etc/group of images."""
    found = resolve_in_layers(layers, "/" + rel)
    last = found[1][-1] if found is not None and found[1] else None
    if found is None or last is None or not stat.S_ISREG(last.st_mode):
        return ""
    entry = merged_entry(layers, found[0])
    if entry is None:
        return ""
    try:
        fd = os.open(entry[1][0], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return ""
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read(4 << 20).decode(errors="replace")
    finally:
        os.close(fd)


# ------------------------------------------------------------------------ mounts and files

# one of TaskConfig.files: (content, mode) owned by the task's user, or (content, mode, uid,
# gid) owned by those numbers (Docker's uid/gid of a secret or config)
FileValue = tuple[bytes, int] | tuple[bytes, int, int, int]

MOUNT_TYPES = ("bind", "volume", "tmpfs")
_VOLUME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_FORBIDDEN_TARGETS = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class MountSpec:
    """A filesystem mounted into the task (same fields as raft.models.Mount)."""

    type: str  # "bind" (host path), "volume" (named, DATA_DIR/volumes/NAME), "tmpfs"
    target: str  # absolute path inside the task
    source: str = ""  # host path (bind) or volume name (volume); "" for tmpfs
    readonly: bool = False
    tmpfs_size: int = 0  # bytes; 0 = kernel default (half of RAM)
    driver: str = ""  # volume driver (shoal.runtime.volumes); "" = local
    driver_opts: tuple[tuple[str, str], ...] = ()  # the driver's options, sorted
    # an anonymous volume (``source``: shoal.runtime.taskvols.anon_name): made for the task,
    # removed with the last task that mounts it
    anonymous: bool = False
    nocopy: bool = False  # a volume: never filled from the image (Docker's volume-nocopy)

    def problem(self) -> str | None:
        """Why this mount is malformed, or None."""
        if self.type not in MOUNT_TYPES:
            return f"type must be one of {', '.join(MOUNT_TYPES)}: {self.type!r}"
        bad = check_task_path(self.target)
        if bad:
            return f"target {bad}"
        if self.target == "/" or any(
            self.target == f or self.target.startswith(f + "/") for f in _FORBIDDEN_TARGETS
        ):
            return f"target cannot be / or under /proc, /sys, /dev: {self.target!r}"
        if self.type == "bind" and (not self.source.startswith("/") or "\0" in self.source):
            return f"bind source must be an absolute host path: {self.source!r}"
        if self.type == "volume" and not _VOLUME_RE.fullmatch(self.source):
            return f"volume name must match [A-Za-z0-9][A-Za-z0-9_.-]*: {self.source!r}"
        if (self.anonymous or self.nocopy) and self.type != "volume":
            return "only a volume is anonymous or nocopy"
        if self.anonymous and (self.driver or self.driver_opts):
            return "an anonymous volume takes no driver"
        if self.type == "tmpfs" and (self.source or self.tmpfs_size < 0):
            return "tmpfs takes no source and a size >= 0"
        return None


def check_task_path(path: str) -> str | None:
    """Why ``path`` is not a clean absolute path inside a task, or None."""
    if not isinstance(path, str) or not path.startswith("/"):
        return f"must be an absolute path: {path!r}"
    if "\0" in path or "\n" in path:
        return f"must not contain NUL or newline: {path!r}"
    if posixpath.normpath(path) != path or path.startswith("//"):
        return f"must be normalised (no '..', '.', '//' or trailing '/'): {path!r}"
    return None


def valid_volume_name(name: str) -> bool:
    return bool(_VOLUME_RE.fullmatch(name))


# ---------------------------------------------------------------------------------- the plan

#: Read-only inside every task (Docker's readonlyPaths).
READONLY_PROC = ("proc/bus", "proc/fs", "proc/irq", "proc/sys", "proc/sysrq-trigger")
#: Hidden inside every task (Docker's maskedPaths).
MASKED = (
    "proc/acpi", "proc/kcore", "proc/keys", "proc/latency_stats", "proc/timer_list",
    "proc/timer_stats", "proc/sched_debug", "proc/scsi", "sys/firmware",
)  # fmt: skip

_DEVICES = (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
            ("urandom", 1, 9), ("tty", 5, 0))  # fmt: skip
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
              ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
              ("ptmx", "pts/ptmx"))  # fmt: skip

#: Where tini appears inside every task.
INIT_IN_TASK = "/dev/init"


@dataclass(frozen=True)
class RootfsPlan:
    """Inputs of the plan that are not in the TaskConfig."""

    stage: Path  # where the staging tmpfs is mounted (DATA_DIR/mnt, an empty dir on the host)
    taskdir: Path  # holds upper/ and work/, the overlay's writable layer (image tasks)
    init_files: tuple[tuple[str, str], ...]  # (name, text) of the init layer's etc/: "hosts"...
    tini: str  # host path of a static tini
    layers: list[Path] | None  # image layers, top first; None = the default image
    default_binds: tuple[str, ...]  # host dirs of the default image
    default_masked: tuple[str, ...]  # host paths hidden in the default image
    volumes_dir: Path
    dev_shm_size: int  # bytes


def build_plan(
    spec: Spec,
    plan: RootfsPlan,
    mounts: Iterable[MountSpec],
    files: Mapping[str, FileValue],
    user: User,
    workdir: str = "/",
    *,
    read_only: bool = False,
    sysctls: Iterable[tuple[str, str]] = (),
    console: bool = False,
) -> None:
    """Append the mount plan for one task to ``spec``. A ``workdir`` the root (or a mount)
    lacks is created, owned by root, mode 0755, as Docker does; one that exists is left as it
    is. ``read_only``: an image's root is made read-only last, that mount only (the default
    root always is). ``sysctls``: (dotted key, value) written through the task's /proc.
    ``console``: an empty dev/console, where the launcher binds a tty task's terminal."""
    root, init, stage = root_dir(plan.stage), f"{plan.stage}/init", f"{plan.stage}/files"
    nosuid_nodev = MS_NOSUID | MS_NODEV
    # 0. the staging tmpfs: the root's mount point, the init layer, the files. Over an
    #    image, each init file sits where a mount on its /etc/NAME would land (a later one
    #    at the same place wins, as Docker's later bind covers an earlier one)
    texts: dict[str, bytes] = {}
    dirs: dict[str, tuple[int, int, int]] = {}  # (mode, uid, gid)
    places: dict[str, str] = {}  # an init file's name -> its place in the init layer
    for name, text in plan.init_files:
        rel, metas = (f"etc/{name}", [(0o755, 0, 0)]) if plan.layers is None else \
            init_file_place(plan.layers, f"etc/{name}")
        texts[rel] = text.encode()
        places[name] = rel
        parts = rel.split("/")[:-1]
        for i, meta in enumerate(metas):
            dirs.setdefault("/".join(parts[: i + 1]), meta)
    size = sum(len(raw) + 4096 for raw in [*texts.values(), *(v[0] for v in files.values())])
    size += 4096 * len(dirs)
    spec.mount("host", str(plan.stage), "tmpfs", "shoal-stage", nosuid_nodev | MS_NOEXEC,
               f"mode=755,size={size + 8192}", "none")  # fmt: skip
    for path in (root, init, *([stage] if files else [])):
        spec.mkdir("host", path, 0o755)
    for rel, (mode, uid, gid) in sorted(dirs.items(), key=lambda d: d[0].count("/")):
        spec.mkdir("host", f"{init}/{rel}", mode, (uid, gid))
    for rel, raw in texts.items():
        spec.write("host", f"{init}/{rel}", 0o644, 0, 0, raw)
    staged = sorted(files.items())
    for i, (_, entry) in enumerate(staged):
        # (owned as it is staged, so the bind shows it so: uid:gid, else the task's user)
        uid, gid = (entry[2], entry[3]) if len(entry) == 4 else (user.uid, user.gid)
        spec.write("host", f"{stage}/{i}", entry[1], uid, gid, entry[0])
    # 1. the root
    if plan.layers is None:
        spec.mount("host", root, "tmpfs", "shoal-root", nosuid_nodev, "mode=755,size=1m", "none")
        for host in plan.default_binds:
            rel = host.lstrip("/")
            try:
                st = os.lstat(host)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                spec.symlink(rel, os.readlink(host))
            elif stat.S_ISDIR(st.st_mode):
                spec.bind(host, rel, kind="dir", flags=MS_RDONLY | nosuid_nodev)
        for host in plan.default_masked:
            _mask(spec, host, host.lstrip("/"))
        for name in ("tmp", "var/tmp"):
            spec.mount("root", name, "tmpfs", "tmpfs", nosuid_nodev, "mode=1777")
        spec.mount("root", "run", "tmpfs", "tmpfs", nosuid_nodev, "mode=755")
        # (the host's /etc/resolv.conf may be a symlink into its /run, a systemd-resolved
        # host's: dangling in the task, whose /run is its own; the file is made at its end
        # there, as runc does. One the read-only /etc lacks is left out)
        for name, _ in plan.init_files:
            spec.bind(
                f"{init}/etc/{name}", f"etc/{name}", kind="file",
                flags=nosuid_nodev | MS_NOEXEC, optional=True,
            )  # fmt: skip
    else:
        lower = ":".join(str(p) for p in [init, *plan.layers])
        options = (
            f"lowerdir={lower},upperdir={plan.taskdir / 'upper'},workdir={plan.taskdir / 'work'}"
        )
        spec.mount("host", root, "overlay", "overlay", nosuid_nodev, options, "none")
    # 2. /proc
    spec.mount("root", "proc", "proc", "proc", nosuid_nodev | MS_NOEXEC)
    # The task's sysctls, here: the launcher runs in the task's own network and IPC
    # namespaces already (cloned with them, or a pod's joined before the plan), and a write
    # to /proc/sys acts on the writer's namespaces, so its fresh /proc reaches exactly the
    # task's settings; it is writable only until /proc/sys is bound read-only just below.
    # Being ops of the plan, they need no record of their own, never use the host's /proc
    # (read-only when the agent itself runs in a container) and run before anything of the
    # task does. A key the kernel lacks fails the start, naming it.
    for key, value in sysctls:
        spec.sysctl(key, value)
    for rel in READONLY_PROC:
        spec.bind(
            f"{root}/{rel}", rel, kind="none", flags=MS_RDONLY | nosuid_nodev | MS_NOEXEC,
            optional=True,
        )  # fmt: skip
    # 3. /dev
    dev_flags = MS_NOSUID | MS_NOEXEC
    spec.mount("root", "dev", "tmpfs", "tmpfs", dev_flags, "mode=755,size=64k")
    for name, major, minor in _DEVICES:
        spec.mknod(f"dev/{name}", stat.S_IFCHR | 0o666, major, minor)
    for name, value in _DEV_LINKS:
        spec.symlink(f"dev/{name}", value)
    spec.mount(
        "root", "dev/pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620,gid=5",
    )  # fmt: skip
    spec.mount(
        "root", "dev/shm", "tmpfs", "shm", nosuid_nodev | MS_NOEXEC,
        f"mode=1777,size={plan.dev_shm_size}",
    )  # fmt: skip
    spec.mount("root", "dev/mqueue", "mqueue", "mqueue", nosuid_nodev | MS_NOEXEC, optional=True)
    spec.bind(plan.tini, INIT_IN_TASK.lstrip("/"), kind="file", flags=MS_RDONLY | nosuid_nodev)
    if console:
        spec.write("root", "dev/console", 0o600, 0, 0, b"")
    spec.remount("root", "dev", MS_RDONLY | dev_flags, "mode=755,size=64k")
    # 4. /sys (read-only; this net namespace's view)
    spec.mount("root", "sys", "sysfs", "sysfs", MS_RDONLY | nosuid_nodev | MS_NOEXEC,
               optional=True)  # fmt: skip
    for rel in MASKED:
        _mask(spec, "/" + rel, rel)
    # 5. the user's mounts, parents before children
    mounts = sorted(mounts, key=lambda m: m.target.count("/"))
    for m in mounts:
        rel = m.target.lstrip("/")
        ro = MS_RDONLY if m.readonly else 0
        if m.type == "tmpfs":
            data = "mode=1777" + (f",size={m.tmpfs_size}" if m.tmpfs_size else "")
            spec.mount("root", rel, "tmpfs", "tmpfs", nosuid_nodev | ro, data)
        else:
            source = m.source if m.type == "bind" else str(plan.volumes_dir / m.source)
            kind = "dir" if m.type == "volume" or os.path.isdir(source) else "file"
            spec.bind(source, rel, kind=kind, flags=nosuid_nodev | ro)
    # 5b. an image's init file whose place a user's mount covers (a tmpfs on /run under a
    #     systemd image's resolv.conf -> ../run/...): bound through the link onto the mount
    #     now, as Docker's bind, mounted after the shallower /run, lands in it. (A read-only
    #     mount there: left out, the file hidden under it; a mount on the place itself is
    #     the user's file for it)
    if plan.layers is not None and mounts:
        covers = [found[0] for m in mounts
                  if (found := resolve_in_layers(plan.layers, m.target)) is not None]
        for name, rel in places.items():
            if any(f"/{rel}".startswith(c.rstrip("/") + "/") for c in covers):
                spec.bind(f"{init}/{rel}", f"etc/{name}", kind="file",
                          flags=nosuid_nodev | MS_NOEXEC, optional=True)  # fmt: skip
    # 6. files: each bound read-only from the staging tmpfs onto its target, resolved inside
    #    the root as every mount point is (RESOLVE_IN_ROOT: an image's symlink on the way,
    #    /srv -> /host/dir, leads to the root's /host/dir, never the host's; missing
    #    directories are made there). Executable as their mode says: Docker's secrets and
    #    configs are (its read-only remount of their tmpfs drops noexec, and runc's bind
    #    keeps that), so a 0755 config can be the command; never suid or a device
    for i, (target, _) in enumerate(staged):
        spec.bind(f"{stage}/{i}", target.lstrip("/"), kind="file",
                  flags=MS_RDONLY | nosuid_nodev)  # fmt: skip
    # 7. the working directory (after the mounts: it may be inside one)
    if workdir.strip("/"):
        spec.mkdir("root", workdir.lstrip("/"), 0o755)
    # 8. a read-only root (always for the default image; for an image, Docker's --read-only:
    #    a bind remount changes this mount only, not the overlay's superblock nor the mounts
    #    above, which keep their own modes), then pivot
    if plan.layers is None:
        spec.remount("host", root, MS_RDONLY | nosuid_nodev, "mode=755,size=1m")
    elif read_only:
        spec.remount("host", root, MS_BIND | MS_RDONLY | nosuid_nodev)
    spec.pivot()


#: Bytes of an init file's place in an image at most (a systemd image's is 38: /run/systemd/
#: resolve/stub-resolv.conf); a longer one, only an image's links make, is shadowed instead.
MAX_INIT_PLACE = 1024


def init_file_place(layers: list[Path], rel: str) -> tuple[str, list[tuple[int, int, int]]]:
    """Where the init layer holds the task's /REL (etc/hosts...) over an image whose layers
    are ``layers`` (top first), and the mode, uid and gid of the directories on the way (the
    image's where it has them, else 0755 root's: the init layer's directories give the
    merged ones theirs, so they must be the image's): where a mount on /REL lands
    (``resolve_in_layers``: the end of the image's symlinks, a dangling one's too, as Docker
    binds the file there), so the image's links and a symlinked /etc stay as they are (an
    init ``etc`` over an /etc -> usr/etc would hide all of it); REL itself — the file
    shadows the link — when that end cannot hold a file (a directory there, a file on the
    way), the links loop, or it is longer than MAX_INIT_PLACE (the launcher makes the init
    layer by path on the host, one op per directory)."""
    found = resolve_in_layers(layers, "/" + rel)
    fallback = (rel, [(0o755, 0, 0)] * rel.count("/"))
    if found is None or not found[1] or len(found[0]) > MAX_INIT_PLACE:
        return fallback  # (no components: the image's root, a directory)
    path, stats = found
    *on_way, end = stats
    if (end is not None and stat.S_ISDIR(end.st_mode)) or any(
        st is not None and not stat.S_ISDIR(st.st_mode) for st in on_way
    ):
        return fallback
    metas = [(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) if st is not None
             else (0o755, 0, 0) for st in on_way]
    return path.lstrip("/"), metas


def root_dir(stage: Path) -> str:
    """The mount point of the task's root inside the staging tmpfs (the launcher's R record)."""
    return f"{stage}/rootfs"


def _mask(spec: Spec, host: str, rel: str) -> None:
    """Hide a path: /dev/null over a file, an empty read-only tmpfs over a directory."""
    try:
        st = os.lstat(host)
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        spec.mount("root", rel, "tmpfs", "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                   "size=0", "none", optional=True)  # fmt: skip
    elif not stat.S_ISLNK(st.st_mode):
        spec.mount("root", rel, "", "/dev/null", MS_BIND, "", "none",
                   MS_RDONLY | MS_NOSUID | MS_NOEXEC, optional=True)  # fmt: skip


def hosts_file(hostname: str, extra: Iterable[tuple[str, str]] = (),
               addr: str | None = None) -> str:
    """/etc/hosts of a task: its host name on its own address (as Docker's, so a program
    that tells peers its resolved host name tells them a reachable address), or on
    127.0.1.1 when it has none (no network of its own). A name with a domain
    (mail.example.com) is followed by the bare host name (mail), as Docker writes it."""
    names = hostname if "." not in hostname else f"{hostname} {hostname.split('.', 1)[0]}"
    lines = [
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
        f"{addr or '127.0.1.1'}\t{names}",
    ]
    lines += [f"{ip}\t{name}" for name, ip in extra]
    return "\n".join(lines) + "\n"


def resolv_conf(host_text: str) -> str:
    """The host's resolv.conf without loopback name servers (unreachable from the task's own
    network namespace), like Docker."""
    out = []
    for line in host_text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] == "nameserver" and (
            words[1].startswith("127.") or words[1] == "::1"
        ):
            continue
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


__all__ = [
    "CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "INIT_IN_TASK",
    "MS_BIND",
    "MS_REC",
    "ULIMITS",
    "FileValue",
    "MountSpec",
    "RootfsPlan",
    "User",
    "bounding_set",
    "build_plan",
    "cap_name",
    "capability_mask",
    "check_sysctl",
    "check_task_path",
    "check_ulimit",
    "hosts_file",
    "init_file_place",
    "read_rootfs_file",
    "resolv_conf",
    "resolve_user",
    "root_dir",
    "valid_volume_name",
]
