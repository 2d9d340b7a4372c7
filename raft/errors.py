"""Errors of the replicated store.

    StoreError
    ├── ValidationError      a command or spec is malformed (names the field)
    ├── CommandRejected      the state machine refused a well-formed command
    │                        (duplicate name, unknown service, stale leader term, ...)
    ├── WriteTimeout         no commit within the deadline (it may still apply later)
    └── NotReady             this node has no replicated state yet / is not in a cluster

pysyncobj fail reasons are translated into these at the boundary (shoal.raft.store).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error raised by shoal.raft."""

    code = "store_error"

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class ValidationError(StoreError):
    code = "invalid"


class CommandRejected(StoreError):
    """The state machine refused the command; ``code`` says why (e.g. ``not_found``)."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message, field)
        self.code = code


class WriteTimeout(StoreError):
    code = "timeout"


class NotReady(StoreError):
    code = "not_ready"
