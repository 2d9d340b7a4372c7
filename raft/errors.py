"""Errors of the replicated store.

Owns: the raft package's error tree; nothing else. Must not touch: anything (no imports).

    RaftError                base of everything shoal.raft raises on purpose
    ├── StoreError           a store operation failed (``message``, ``field``)
    │   ├── ValidationError      a command or spec is malformed (names the field)
    │   │   └── SpecError (ValueError)  a rule of a spec Struct failed (shoal.raft.spec);
    │   │                               msgspec wraps it, validate_spec unwraps the field
    │   ├── CommandRejected      the state machine refused a well-formed command
    │   │                        (duplicate name, unknown service, stale leader term, ...)
    │   ├── WriteTimeout         no commit within the deadline (it may still apply later)
    │   ├── NotReady             this node has no replicated state yet / is not in a cluster
    │   └── Rejected             inside ClusterState.apply only: a command is refused (recorded
    │                            as the command's result, never raised out of apply)
    ├── IpamError (ValueError)   a CIDR is malformed, or no free subnet/address is left
    ├── WireError (ValueError)   a serialised state is malformed or too large
    └── PersistenceError (RuntimeError)  the Raft data directory cannot be used safely
                                          (raised before pysyncobj starts)

pysyncobj fail reasons are translated into these at the boundary (shoal.raft.store).
"""

from __future__ import annotations


class RaftError(Exception):
    """Base of every error raised by shoal.raft."""


class StoreError(RaftError):
    """A store operation failed."""

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


class Rejected(StoreError):
    """ClusterState.apply refuses a command (``code`` says why); recorded as its result."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message, field)
        self.code = code


class IpamError(RaftError, ValueError):
    """A CIDR is malformed, or no free subnet or address is left."""


class WireError(RaftError, ValueError):
    """A serialised cluster state is malformed or too large."""


class PersistenceError(RaftError, RuntimeError):
    """The Raft data directory cannot be used safely (raised before pysyncobj starts)."""


class SpecError(ValidationError, ValueError):
    """A rule in a spec Struct's ``__post_init__`` failed (shoal.raft.spec); ``field`` is
    relative to the Struct raising it. A ValueError, so msgspec turns it into its own
    ValidationError at the Struct's path; shoal.raft.validate joins both into one dotted
    field name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field)
