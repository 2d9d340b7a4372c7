"""Errors raised by shoal.runtime.

Owns the runtime's error types and nothing else. Lower-layer failures (OSError from spawning,
reading /proc or writing the task directory) are translated at the boundary (``raise ... from``).

The tree::

    RuntimeError_                 anything the runtime raises on purpose
    ├── ConfigError               RuntimeConfig is unusable (missing tini/unshare, bad timeouts)
    ├── StartError                the task could not be started at all (nothing is left running)
    │   ├── InvalidTaskConfig     the TaskConfig is malformed (id, hostname, command, env, workdir)
    │   ├── TaskExists            a task with this id is already known (or its directory exists)
    │   └── LaunchFailed          the launcher failed or timed out (message carries its log tail)
    ├── TaskNotFound              no task with this id is known
    └── StopFailed                the task's processes outlived SIGKILL + kill_timeout

A task whose *command* fails (exit 3, command not found, killed) is not an error: it is a task that
ran and ended, reported as a RuntimeStatus.
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


class TaskExists(StartError):
    """A task with this id is already known to the runtime (or its directory exists)."""


class LaunchFailed(StartError):
    """The namespace launcher failed or did not report ready in time."""


class TaskNotFound(RuntimeError_, KeyError):
    """No task with this id is known to the runtime."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "task not found"


class StopFailed(RuntimeError_):
    """The task's init did not die within kill_timeout after SIGKILL."""
