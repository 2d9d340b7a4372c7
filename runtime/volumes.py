"""Volume drivers: what a named volume is on a node, and how it gets there.

Owns: the drivers behind one small interface (``Driver``: ``check(opts)``, ``mount(path,
opts, files)``), the translation of Docker's driver options into a mount, and mounting and
unmounting a volume at ``DATA_DIR/volumes/NAME`` (the runtime then binds that directory into
the task exactly as for any named volume). Must not touch: Raft, the scheduler (the
single-writer rule is placement's: ``single_writer(opts)`` only reads the option), the task's
own mount namespace (shoal.runtime.rootfs).

Drivers (``--mount type=volume,src=NAME,dst=/d,volume-driver=D,volume-opt=K=V,...``):

* ``local`` without options: a plain directory kept per node (what shoal always did);
* ``local`` with ``type``/``o``/``device`` (Docker's local driver): ``mount(2)`` of
  ``device`` with that filesystem type; ``o`` is split into mount flags (``ro``, ``nosuid``,
  ...) and the filesystem's data string, as Docker does. NFS is
  ``volume-opt=type=nfs,volume-opt=o=addr=10.0.0.5,rw,volume-opt=device=:/export``; the
  kernel shoal is tested on has no NFS client, so only the translation is tested;
* ``sshfs`` (like the vieux/sshfs plugin): ``sshcmd=USER@HOST:/PATH`` (required), ``port``,
  ``IdentityFile-secret=NAME`` (the private key: the shoal secret NAME, which the task must
  also use, ``--secret NAME``; it reaches ssh through a memfd, never a file on disk),
  ``KnownHosts-secret=NAME`` (the server's host keys, known_hosts lines, the same way: ssh
  then refuses any other host key; without it the host key is not checked, as the plugin's
  usual ``StrictHostKeyChecking=no``), and a few ssh/sshfs options. Mounted with the
  ``sshfs`` binary, with keep-alives and reconnect so a dead server fails calls instead of
  hanging them for ever.

Every driver takes ``single-writer=true|false``: the scheduler never lets two tasks mount
such a volume read-write at once.

Errors::

    InvalidTaskConfig (shoal.runtime.errors)
    └── VolumeOptionError    a driver or option is unknown or malformed (``field`` names it)
    LaunchFailed
    └── VolumeMountFailed    mount(2) or sshfs failed (the message carries why)
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shoal.runtime.errors import VolumeMountFailed, VolumeOptionError
from shoal.runtime.rootfs import FileValue

DRIVERS = ("local", "sshfs")
SSHFS = "sshfs"
SECRETS_DIR = "/run/secrets"
MOUNT_TIMEOUT = 30.0  # seconds sshfs may take to connect before the start fails

# Docker's mount flags (moby pkg/mount flags.go): names in ``o`` that are flags, not data.
_FLAGS: dict[str, tuple[bool, int]] = {
    "ro": (False, 1), "rw": (True, 1), "nosuid": (False, 2), "suid": (True, 2),
    "nodev": (False, 4), "dev": (True, 4), "noexec": (False, 8), "exec": (True, 8),
    "sync": (False, 16), "async": (True, 16), "dirsync": (False, 128),
    "noatime": (False, 1024), "atime": (True, 1024), "nodiratime": (False, 2048),
    "diratime": (True, 2048), "relatime": (False, 1 << 21), "norelatime": (True, 1 << 21),
    "strictatime": (False, 1 << 24),
}
_KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_SSHCMD_RE = re.compile(r"^(?:[A-Za-z0-9._-]+@)?[A-Za-z0-9.:\[\]-]+:(?:/[^\s,]*)?$")
# ssh/sshfs options a volume may pass on (``-o K=V``), lower-cased name -> sshfs's spelling
_SSHFS_PASS = {k.lower(): k for k in (
    "ServerAliveInterval", "ServerAliveCountMax", "ConnectTimeout", "Compression", "uid", "gid",
    "umask", "follow_symlinks", "transform_symlinks", "cache")}


def _bool(text: str, field: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise VolumeOptionError(field, f"must be true or false, got {text!r}")


def single_writer(opts: Mapping[str, str]) -> bool:
    """Whether a volume with these options admits one read-write task at a time."""
    return _bool(opts.get("single-writer", "false"), "volume-opt single-writer")


@dataclass(frozen=True)
class MountCall:
    """The arguments of mount(2) for a ``local`` volume with a filesystem type."""

    source: str
    fstype: str
    flags: int
    data: str


def local_mount_call(opts: Mapping[str, str]) -> MountCall | None:
    """Docker's local driver: ``type``/``o``/``device`` → mount(2)'s arguments; None for a
    plain directory (no options). For NFS, ``o`` must carry ``addr=`` (the server's address:
    the kernel client does not resolve names) and ``device`` the export (``:/export`` or
    ``host:/export``)."""
    fstype, o, device = opts.get("type", ""), opts.get("o", ""), opts.get("device", "")
    if not (fstype or o or device):
        return None
    if not fstype or not re.match(r"^[a-z0-9._]+$", fstype):
        raise VolumeOptionError("volume-opt type", f"a filesystem type is required, got "
                                f"{fstype!r}")
    if not device:
        raise VolumeOptionError("volume-opt device", "the device (source) to mount is required")
    flags, data = 0, []
    for item in (p for p in o.split(",") if p):
        name = item.split("=", 1)[0]
        if name in _FLAGS and "=" not in item:
            clear, bit = _FLAGS[name]
            flags = flags & ~bit if clear else flags | bit
        else:
            data.append(item)
    if fstype in ("nfs", "nfs4"):
        if not any(d.startswith("addr=") and len(d) > 5 for d in data):
            raise VolumeOptionError("volume-opt o", "an NFS volume needs addr=SERVER in o")
        if ":" not in device:
            raise VolumeOptionError("volume-opt device", "an NFS device is :/export or "
                                    f"host:/export, got {device!r}")
    return MountCall(device, fstype, flags, ",".join(data))


@dataclass(frozen=True)
class SshfsCall:
    """How sshfs is run for a volume: its argv and the secrets holding the key and the
    server's host keys ("" when not given)."""

    argv: tuple[str, ...]
    key_secret: str
    known_hosts_secret: str = ""


_SECRET_OPTS = {"identityfile-secret": "IdentityFile-secret",
                "knownhosts-secret": "KnownHosts-secret"}


def sshfs_call(opts: Mapping[str, str], mountpoint: str, key_path: str = "KEY",
               known_hosts_path: str = "KNOWN_HOSTS") -> SshfsCall:
    """vieux/sshfs's options → the sshfs command line (``key_path``, ``known_hosts_path``:
    where ssh reads the key and the host keys).
    BatchMode (never a prompt), keep-alives and reconnect bound how long a dead server can
    block a call; allow_other lets a task's non-root user in."""
    sshcmd = opts.get("sshcmd", "")
    if not _SSHCMD_RE.match(sshcmd):
        raise VolumeOptionError("volume-opt sshcmd", f"must be [USER@]HOST:[/PATH], got "
                                f"{sshcmd!r}")
    if "password" in opts:
        raise VolumeOptionError("volume-opt password", "passwords are not supported: use "
                                "IdentityFile-secret=SECRET")
    port = opts.get("port", "22")
    if not (port.isdigit() and 0 < int(port) < 65536):
        raise VolumeOptionError("volume-opt port", f"must be a TCP port, got {port!r}")
    o = ["BatchMode=yes", "ServerAliveInterval=5", "ServerAliveCountMax=3", "ConnectTimeout=10",
         "reconnect", "allow_other", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null"]
    passed = {}
    for key, value in opts.items():
        low = key.lower()
        if low in ("sshcmd", "port", "single-writer", *_SECRET_OPTS):
            continue
        if low not in _SSHFS_PASS:
            raise VolumeOptionError(f"volume-opt {key}", "not an sshfs option shoal passes "
                                    f"on (known: sshcmd, port, IdentityFile-secret, "
                                    f"KnownHosts-secret, single-writer, "
                                    f"{', '.join(sorted(_SSHFS_PASS.values()))})")
        if not re.match(r"^[A-Za-z0-9._/-]*$", value):
            raise VolumeOptionError(f"volume-opt {key}", f"unsafe value {value!r}")
        passed[_SSHFS_PASS[low]] = value
    o = [x for x in o if x.split("=", 1)[0] not in passed] + [
        f"{k}={v}" for k, v in sorted(passed.items())]
    named = {}
    for key, value in opts.items():
        if key.lower() in _SECRET_OPTS:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", value):
                raise VolumeOptionError(f"volume-opt {_SECRET_OPTS[key.lower()]}",
                                        f"must name a secret, got {value!r}")
            named[key.lower()] = value
    if "identityfile-secret" in named:
        o.append(f"IdentityFile={key_path}")
    if "knownhosts-secret" in named:
        o = [x for x in o if not x.startswith(("StrictHostKeyChecking=",
                                               "UserKnownHostsFile="))]
        o += ["StrictHostKeyChecking=yes", f"UserKnownHostsFile={known_hosts_path}"]
    argv = (SSHFS, sshcmd, mountpoint, "-p", port, "-o", ",".join(o))
    return SshfsCall(argv, named.get("identityfile-secret", ""),
                     named.get("knownhosts-secret", ""))


def check(driver: str, opts: Mapping[str, str]) -> None:
    """Raise VolumeOptionError if ``driver`` with ``opts`` cannot be mounted (no side
    effects: the API checks specs with it before they are stored)."""
    for key in opts:
        if not _KEY_RE.match(key):
            raise VolumeOptionError("volume-opt", f"malformed option name {key!r}")
    single_writer(opts)
    _driver(driver).check(opts)


def is_network(driver: str, opts: Mapping[str, str]) -> bool:
    """Whether the volume's data lives off the node (so it follows a task elsewhere) and is
    mounted at start rather than kept as a directory."""
    return driver == SSHFS or (driver in ("", "local") and local_mount_call(opts) is not None)


class Driver(Protocol):
    def check(self, opts: Mapping[str, str]) -> None: ...

    def mount(self, path: Path, opts: Mapping[str, str],
              files: Mapping[str, FileValue]) -> tuple[int, ...]:
        """Mount the volume at ``path``; returns fds to keep open while it is mounted."""
        ...


class LocalDriver:
    def check(self, opts: Mapping[str, str]) -> None:
        unknown = sorted(set(opts) - {"type", "o", "device", "single-writer"})
        if unknown:
            raise VolumeOptionError(f"volume-opt {unknown[0]}", "the local driver takes "
                                    "type, o, device (and single-writer)")
        local_mount_call(opts)

    def mount(self, path: Path, opts: Mapping[str, str],
              files: Mapping[str, FileValue]) -> tuple[int, ...]:
        call = local_mount_call(opts)
        if call is None:
            return ()
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        rc = libc.mount(call.source.encode(), str(path).encode(), call.fstype.encode(),
                        ctypes.c_ulong(call.flags), call.data.encode())
        if rc != 0:
            err = ctypes.get_errno()
            raise VolumeMountFailed(f"mount -t {call.fstype} {call.source} {path}: "
                                    f"{os.strerror(err)}")
        return ()


class SshfsDriver:
    def check(self, opts: Mapping[str, str]) -> None:
        sshfs_call(opts, "/")

    def mount(self, path: Path, opts: Mapping[str, str],
              files: Mapping[str, FileValue]) -> tuple[int, ...]:
        call = sshfs_call(opts, str(path))
        fds: list[int] = []
        paths = {}
        try:
            for secret, what, opt in ((call.key_secret, "key", "IdentityFile-secret"),
                                      (call.known_hosts_secret, "known-hosts",
                                       "KnownHosts-secret")):
                if not secret:
                    continue
                data = files.get(f"{SECRETS_DIR}/{secret}")
                if data is None:
                    raise VolumeOptionError(f"volume-opt {opt}", f"the task must use the "
                                            f"secret {secret!r} (--secret {secret})")
                fd = os.memfd_create(f"shoal-volume-{what}-{path.name}", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data[0])
                os.fchmod(fd, 0o600)
                paths[what] = f"/proc/{os.getpid()}/fd/{fd}"
            argv = list(sshfs_call(opts, str(path), paths.get("key", "KEY"),
                                   paths.get("known-hosts", "KNOWN_HOSTS")).argv)
            # (ssh reads them through this process's /proc entries while the fds are open)
            subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True,
                           timeout=MOUNT_TIMEOUT)
        except (OSError, subprocess.SubprocessError, VolumeOptionError) as exc:
            for fd in fds:
                os.close(fd)
            if isinstance(exc, VolumeOptionError):
                raise
            why = getattr(exc, "stderr", b"") or b""
            raise VolumeMountFailed(f"sshfs {call.argv[1]} failed: "
                                    f"{why.decode(errors='replace').strip() or exc}") from exc
        return tuple(fds)


def _driver(name: str) -> Driver:
    if name in ("", "local"):
        return LocalDriver()
    if name == SSHFS:
        return SshfsDriver()
    raise VolumeOptionError("volume-driver", f"unknown driver {name!r} (known: "
                            f"{', '.join(DRIVERS)})")


def mount(path: Path, driver: str, opts: Mapping[str, str],
          files: Mapping[str, FileValue]) -> tuple[int, ...]:
    """Mount a network volume at ``path`` (made if missing); a no-op when it is mounted
    already (e.g. by a task adopted after an agent restart). Returns the fds to keep open
    while it is mounted (sshfs's key and host keys), for ``unmount``."""
    path.mkdir(mode=0o755, exist_ok=True)
    if os.path.ismount(path):
        return ()
    return _driver(driver).mount(path, opts, files)


def unmount(path: Path, fds: tuple[int, ...] = ()) -> None:
    """Unmount ``path`` if it is a mount point (lazily: a call blocked on a dead server does
    not keep it), then close the fds ``mount`` returned."""
    try:
        if os.path.ismount(path):
            libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            if libc.umount2(str(path).encode(), 2) != 0:  # MNT_DETACH
                err = ctypes.get_errno()
                raise VolumeMountFailed(f"umount {path}: {os.strerror(err)}")
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


__all__ = ["DRIVERS", "MountCall", "SshfsCall", "VolumeMountFailed", "VolumeOptionError",
           "check", "is_network", "local_mount_call", "mount", "single_writer", "sshfs_call",
           "unmount"]
