"""Errors raised by shoal.runtime.

Owns the runtime's error types and nothing else. Lower-layer failures (OSError from spawning,
reading /proc, writing cgroup files or the task directory, tarfile errors) are translated at the
boundary (``raise ... from``).

The tree::

    RuntimeError_                 anything the runtime raises on purpose
    ├── ConfigError               RuntimeConfig is unusable (missing tini, no compiler, bad values)
    ├── StartError                the task could not be started at all (nothing is left running)
    │   ├── InvalidTaskConfig     the TaskConfig is malformed (``field`` names which field)
    │   │   └── VolumeOptionError a volume driver or option is unknown or malformed
    │   ├── TaskExists            a task with this id is already known (or its directory exists)
    │   ├── LaunchFailed          the launcher failed or timed out (message carries its log tail)
    │   │   └── VolumeMountFailed mounting a volume failed (mount(2), sshfs)
    │   ├── CgroupError           the task's cgroups cannot be made, or a limit cannot be enforced
    │   ├── SeccompError          the task's seccomp filter cannot be made (no libseccomp, a rule
    │   │                         it refuses) or a custom profile is not Docker's format
    │   └── ImageUnavailable      the task's image is not in the store (pull it first)
    ├── TaskNotFound              no task with this id is known
    ├── StopFailed                the task's processes outlived SIGKILL + kill_timeout
    ├── VolumeInUse               a volume to remove is mounted by a task this node knows
    └── ImageError                the image store refused an operation
        ├── BuildError            `image build` failed (``line`` of the Dockerfile, ``field``)
        ├── ImageNotFound         no image matches the reference (also a KeyError)
        ├── InvalidImage          a tarball/layout is malformed or unsafe (absolute path, "..",
        │                         link out of the root, unknown compression, bad manifest)
        ├── DigestMismatch        a blob's content does not match its sha256 digest
        ├── ImageInUse            rm of an image a task on this node still uses
        ├── InvalidReference      not an image reference (shoal.runtime.reference's grammar)
        └── RegistryError         a registry refused or failed a pull (shoal.runtime.registry)
            ├── RegistryUnreachable   cannot connect, TLS failure, timeout, 5xx
            ├── RegistryAuthError     401/403: no or wrong credentials
            ├── ManifestUnknown       no such tag, digest or repository (404)
            └── UnsupportedImage      schema-1, unknown media type, no image for this platform

How the API answers each (the mapping lives in node/errors.py, ``http_error``): the user's
mistakes are 4xx (InvalidTaskConfig 400 naming the field, ImageUnavailable/ImageNotFound/
TaskNotFound 404, InvalidImage/DigestMismatch 400, CgroupError 400; registries: ManifestUnknown
404, RegistryAuthError 403, RegistryUnreachable 503, InvalidReference/UnsupportedImage 400),
conflicts with what this
node holds 409 (TaskExists, VolumeInUse, ImageInUse), what a retry may fix 503 (LaunchFailed,
StopFailed), what the node lacks 503 (SeccompError: its libseccomp); only RuntimeError_
itself and ConfigError (the agent's own settings) are 500.

A task whose *command* fails (exit 3, command not found, OOM killed) is not an error: it is a
task that ran and ended, reported as a RuntimeStatus.
"""

from __future__ import annotations


class RuntimeError_(Exception):  # trailing underscore: do not shadow the builtin
    """Base of every error the runtime raises on purpose."""


class ConfigError(RuntimeError_):
    """RuntimeConfig is unusable on this machine."""


class StartError(RuntimeError_):
    """The task could not be started at all; nothing of it is left running."""


class InvalidTaskConfig(StartError):
    """The TaskConfig is malformed. ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class VolumeOptionError(InvalidTaskConfig):
    """A volume driver or option is unknown or malformed (shoal.runtime.volumes)."""


class TaskExists(StartError):
    """A task with this id is already known to the runtime (or its directory exists)."""


class LaunchFailed(StartError):
    """The namespace launcher failed or did not report ready in time."""


class VolumeMountFailed(LaunchFailed):
    """Mounting a volume failed (mount(2), or sshfs could not connect)."""


class CgroupError(StartError):
    """The task's cgroups could not be created, or a requested limit cannot be enforced here."""


class SeccompError(StartError):
    """The task's seccomp filter cannot be made here (shoal.runtime.seccomp)."""


class ImageUnavailable(StartError):
    """The task's image is not in this node's image store."""


class TaskNotFound(RuntimeError_, KeyError):
    """No task with this id is known to the runtime."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "task not found"


class StopFailed(RuntimeError_):
    """The task's init did not die within kill_timeout after SIGKILL."""


class VolumeInUse(RuntimeError_):
    """The volume is mounted by a task this node still knows (remove the task first)."""


class ImageError(RuntimeError_):
    """The image store refused an operation."""


class BuildError(ImageError):
    """`image build` failed: a bad Dockerfile (``line`` names it), a RUN that failed, bad
    build options (``field`` names the request field at fault, "" otherwise)."""

    def __init__(self, message: str, line: int = 0, field: str = "") -> None:
        super().__init__(f"line {line}: {message}" if line else message)
        self.line = line
        self.field = field


class ImageNotFound(ImageError, KeyError):
    """No image matches the reference."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "image not found"


class InvalidImage(ImageError):
    """A rootfs tarball, docker-save archive or OCI layout is malformed or unsafe."""


class DigestMismatch(ImageError):
    """A blob's content does not hash to the digest it was announced with."""


class ImageInUse(ImageError):
    """The image is used by a task this node still knows."""


class InvalidReference(ImageError):
    """A string is not an image reference (the message says why)."""


class RegistryError(ImageError):
    """A registry refused or failed a pull."""


class RegistryUnreachable(RegistryError):
    """The registry (or its token realm) cannot be reached, or keeps failing (5xx)."""


class RegistryAuthError(RegistryError):
    """The registry wants credentials it was not given, or refused the ones it was given."""


class ManifestUnknown(RegistryError):
    """The registry has no such tag, digest or repository."""


class UnsupportedImage(RegistryError):
    """The image exists but shoal cannot run it (format, media type, platform)."""
