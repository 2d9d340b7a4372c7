"""Errors raised by shoal.lb.

Owns the balancer's error types and nothing else. Lower-layer failures (OSError from bind(),
from spawning a worker, from the control socket) are translated at the boundary with
``raise ... from exc``. Every error carries a ``code`` (stable, for the API's JSON
``{"error": {"code", "message", "field"}}``) and, where one field is to blame, ``field``.

The tree::

    LBError                        anything shoal.lb raises on purpose
    ├── ConfigError                Config.validate() failed (field names the setting)
    ├── InvalidService             a ServiceLB is malformed (field names the offender)
    ├── FrontendError              a frontend (published port or VIP:port) cannot be opened
    │   ├── PortConflict           another service of this balancer already uses that port
    │   ├── PortInUse              another program on this node holds the port (EADDRINUSE)
    │   ├── AddressNotAvailable    the address (e.g. a VIP) is not on this node (EADDRNOTAVAIL)
    │   └── PortPermissionDenied   a port < 1024 needs root / CAP_NET_BIND_SERVICE (EACCES)
    ├── BalancerUnavailable        not started, closed, or the worker could not be started
    └── ProtocolError              a worker refused or garbled a control message (a bug)
          └── WireError            a control message failed validation (reason: DropReason)

    WorkerGone                     control flow inside lb/client.py: the worker died (or was
                                   killed for not answering) while the client talked to it.
                                   Not an LBError on purpose, so that no ``except LBError``
                                   swallows it on its way to the code that restarts workers.
"""

from __future__ import annotations

from enum import StrEnum


class LBError(Exception):
    """Base of every error shoal.lb raises on purpose."""

    code = "lb_error"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, str | None]:
        """The API's error body: ``{"code", "message", "field"}``."""
        return {"code": self.code, "message": self.message, "field": self.field}


class ConfigError(LBError):
    """Config is unusable (a value out of range, or two settings that contradict)."""

    code = "lb_config"


class InvalidService(LBError, ValueError):
    """A ServiceLB (or one of its frontends/endpoints) is malformed."""

    code = "invalid_service"


class FrontendError(LBError):
    """A frontend socket could not be opened; nothing of the update was applied."""

    code = "frontend"


class PortConflict(FrontendError):
    """Another service of this balancer already publishes that port/protocol."""

    code = "port_conflict"


class PortInUse(FrontendError):
    """Another program on this node already holds the port (EADDRINUSE)."""

    code = "port_in_use"


class AddressNotAvailable(FrontendError):
    """The listen address (typically a VIP) is not assigned on this node (EADDRNOTAVAIL)."""

    code = "address_not_available"


class PortPermissionDenied(FrontendError):
    """Binding a privileged port was refused (EACCES): needs root or CAP_NET_BIND_SERVICE."""

    code = "port_permission_denied"


class BalancerUnavailable(LBError):
    """The balancer is not started, is closed, or its worker process could not be started."""

    code = "balancer_unavailable"


class DropReason(StrEnum):
    """Why a control message was rejected (the keys of the ``control_rejected`` counter)."""

    DECODE = "decode"  # not msgpack, or over the size limits
    TRUNCATED = "truncated"  # the message or its file descriptors did not fit the buffers
    SHAPE = "shape"  # msgpack, but not the expected envelope / field types
    UNKNOWN_TYPE = "unknown_type"  # a message type this worker does not know
    VERSION = "version"  # HELLO with a protocol version outside MIN..MAX
    INVALID = "invalid"  # well-formed, but the content is invalid (e.g. port 0)
    FDS = "fds"  # wrong number or kind of file descriptors attached
    STATE = "state"  # not allowed now (e.g. SET_SERVICE before HELLO)
    INTERNAL = "internal"  # handling it raised unexpectedly (a bug; the worker lives on)


class ProtocolError(LBError):
    """A worker refused a control message or answered something unexpected (a bug)."""

    code = "lb_protocol"


class WireError(ProtocolError):
    """A control message failed validation at the boundary."""

    code = "lb_wire"

    def __init__(self, reason: DropReason, message: str, field: str | None = None) -> None:
        super().__init__(message, field)
        self.reason = reason


class WorkerGone(Exception):
    """The worker died (or was killed for not answering) while we talked to it."""
